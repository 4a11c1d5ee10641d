"""Where the consumer actors run, and which of them a driver may adopt.

The actors are *detached* and named (``{group}-consumer-{i}`` in namespace
``cloud_ingest``): they outlive the driver that started them. A driver that is killed
(``kill -9``, an evicted pod) and started again finds them by name and adopts them when
they were built from the same code and settings (their fingerprint matches); otherwise it
retires them (stop, wait for the drain, kill) and starts new ones. A clean stop kills them
after the drain, as a non-detached actor's death would. They are spread over the nodes
(``SPREAD``), so one node's loss takes only its share of the consumers with it; Ray
restarts those elsewhere (``max_restarts=-1``).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import ray

from cloud_ingest.config import IngestSettings
from shared.settings import secret_values

NAMESPACE = "cloud_ingest"
WHEREABOUTS_PERIOD_S = 10.0  # how often a consumer says where it runs
DRIVER_ONLY = ("consumers", "http_bind", "http_token")  # settings no actor reads


def actor_name(group: str, index: int) -> str:
    return f"{group}-consumer-{index}"


def index_of(group: str, name: str) -> int | None:
    """The index in an actor's name, for the actors of ``group``; None for any other."""
    match = re.fullmatch(re.escape(group) + r"-consumer-(\d+)", name)
    return None if match is None else int(match.group(1))


def fingerprint(consumer_class: type, settings: IngestSettings) -> str:
    """The code (every source file of ours, so a code-only release is not adopted), the
    consumer class and every setting (secrets included, hashed). Computed by the driver
    and handed to the actor, which returns it as given."""
    # What only the driver uses does not count: scaling INGEST_CONSUMERS or moving the
    # health endpoint adopts the actors that stay.
    theirs = settings.model_copy(update=dict.fromkeys(DRIVER_ONLY))
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.read_bytes() + b"\0")
    for part in (
        f"{consumer_class.__module__}.{consumer_class.__qualname__}",
        theirs.model_dump_json(),
        *secret_values(theirs),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def _sources() -> list[Path]:
    root = Path(__file__).resolve().parent.parent
    return sorted(p for pkg in ("cloud_ingest", "shared") for p in (root / pkg).rglob("*.py"))


def whereabouts() -> dict[str, str]:
    """This process's Ray node and PID (inside an actor)."""
    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
        "pid": str(os.getpid()),
    }


def our_actors(group: str) -> dict[int, str]:
    """index -> name of every live named actor of ``group`` in our namespace."""
    found: dict[int, str] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor.get("namespace") != NAMESPACE:
            continue
        index = index_of(group, actor["name"])
        if index is not None:
            found[index] = actor["name"]
    return found
