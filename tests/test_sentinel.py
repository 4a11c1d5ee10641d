"""Redis behind Sentinel on real servers: a primary, a replica, three sentinels.

The real `edge-agent` (four file-replay cameras, 1 s chunks) and the real
`cloud-ingest run` both find the master through the sentinels, authenticated by
passwords they read from files (data nodes and sentinels). The replica replicates
through a TCP proxy; the proxy goes silent for ``LAG_S`` (replication lags, as on a
congested link) and the primary is SIGKILLed at the end of it. The sentinels promote
the replica; both daemons follow. Jepsen-style accounting afterwards: which manifests
the edge recorded as announced (acknowledged) have neither a record nor a stream entry
once the queue has drained (lost by the failover), then `cloud-ingest reconcile`
rebuilds them from the bucket and lost must be 0.

With EDGE_REDIS_MIN_REPLICAS=0 an XADD is acknowledged when the primary has it: what
it had not passed to the replica when it died is lost until reconcile (how many depends
on timing; only the invariant after reconcile is asserted). With =1 an XADD counts only
once WAIT says the replica has it, so every announced manifest survives the failover.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError

from devstack.sentinel import MASTER, SentinelCluster
from devstack.servers import free_port
from shared.queue import connect
from shared.redis_client import RedisConnection
from tests.support import (
    BIN,
    S3,
    Daemon,
    SilentProxy,
    Stack,
    cloud_ingest,
    edge_agent,
    eventually,
    queue_state,
    report_figures,
)

# The test's timings (seconds unless named): short sentinel timeouts, a replication lag
# long enough for a few chunks to be announced inside it, bounds on every wait.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 2000
LAG_S = 1.5
MIN_REPLICAS_TIMEOUT_S = 0.5
CAMERAS = 4
ANNOUNCED_BEFORE_KILL = 8
FOLLOW_BOUND_S = 20.0  # each daemon's first success after the kill, at most this long
SETTLE_S = 45.0  # the queue drained (visibility timeouts included), reconcile's work done
DATA_PASSWORD = "data-nodes-pass-41c7"
SENTINEL_PASSWORD = "sentinels-pass-9e2b"


@dataclass
class Cluster:
    sentinels: SentinelCluster
    proxy: SilentProxy
    env_edge: dict[str, str]
    env_cloud: dict[str, str]

    def master_url(self) -> str:
        port = self.sentinels.master_port()
        assert port is not None, "the sentinels name no master"
        return f"redis://:{DATA_PASSWORD}@127.0.0.1:{port}/0"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    sentinels = SentinelCluster(
        tmp_path / "redis",
        down_after_ms=DOWN_AFTER_MS,
        failover_timeout_ms=FAILOVER_TIMEOUT_MS,
        password=DATA_PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
    )
    sentinels.start()
    primary, replica = sentinels.nodes
    proxy = SilentProxy("127.0.0.1", primary.port)
    try:
        with proxy:
            # The replica follows the primary through the proxy (a partial resync).
            with sentinels.data_client(replica.port) as c:
                c.execute_command("REPLICAOF", "127.0.0.1", str(proxy.port))
            await asyncio.to_thread(sentinels.wait_replicas, 1)
            files = _password_files(tmp_path)
            common = {"REDIS_SENTINELS": sentinels.addresses, "REDIS_SENTINEL_MASTER": MASTER}
            common |= files
            # The URL's host is never used with sentinels: only its user, database, TLS.
            common["REDIS_URL"] = "redis://unused.invalid:1/0"
            yield Cluster(
                sentinels,
                proxy,
                {f"EDGE_{k}": v for k, v in common.items()},
                {f"INGEST_{k}": v for k, v in common.items()},
            )
    finally:
        sentinels.stop()


def _password_files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, secret in (
        ("REDIS_PASSWORD_FILE", DATA_PASSWORD),
        ("REDIS_SENTINEL_PASSWORD_FILE", SENTINEL_PASSWORD),
    ):
        path = tmp_path / name.lower()
        path.write_text(secret + "\n")
        path.chmod(0o600)
        out[name] = str(path)
    return out


def ledger(spool: Path) -> dict[str, str]:
    """chunk_id -> ledger state, from the edge's own ledger."""
    db = sqlite3.connect(spool / "ledger.sqlite3")
    try:
        return dict(db.execute("SELECT chunk_id, state FROM chunks").fetchall())
    finally:
        db.close()


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def _announced(edge: Daemon) -> list[dict[str, Any]]:
    return [e for e in edge.events("chunk") if e.get("outcome") == "announced"]


async def _stream_ids(url: str) -> set[str]:
    client = connect(url, 5)
    try:
        entries: Any = await client.xrange("chunks")
    finally:
        await client.aclose()
    return {json.loads(f[b"manifest"])["chunk_id"] for _, f in entries if b"manifest" in f}


async def _recorded(s3: S3, stack: Stack) -> set[str]:
    return {r["manifest"]["chunk_id"] for r in await s3.records(stack.out_bucket)}


async def _failover_run(
    stack: Stack, s3: S3, cluster: Cluster, clip: Path, min_replicas: int
) -> dict[str, Any]:
    sentinels = cluster.sentinels
    workdir = stack.workdir
    cloud = cloud_ingest(
        stack,
        workdir / "cloud.log",
        **cluster.env_cloud,
        INGEST_VISIBILITY_TIMEOUT_S="5",
        INGEST_HTTP_BIND=f"127.0.0.1:{free_port()}",
    )
    cams = [{"id": f"cam{i}", "url": f"file://{clip}?loop=1"} for i in range(1, CAMERAS + 1)]
    edge = edge_agent(
        stack,
        cams,
        workdir / "edge.log",
        **cluster.env_edge,
        EDGE_SEGMENT_SECONDS="1",
        EDGE_HTTP_BIND=f"127.0.0.1:{free_port()}",
        EDGE_REDIS_MIN_REPLICAS=str(min_replicas),
        EDGE_REDIS_MIN_REPLICAS_TIMEOUT_S=str(MIN_REPLICAS_TIMEOUT_S),
    )
    try:

        async def running(n: int) -> bool:
            for d in (edge, cloud):
                if not d.running():
                    raise AssertionError(f"{d.log.name} exited:\n{d.text()[-3000:]}")
            return len(_announced(edge)) >= n and len(await _recorded(s3, stack)) >= 2

        await eventually(lambda: running(ANNOUNCED_BEFORE_KILL), 60, "chunks flowing")
        # Replication lags for LAG_S; the primary dies at the end of it.
        old = sentinels.master_port()
        assert old is not None
        cluster.proxy.go_silent()
        await asyncio.sleep(LAG_S)  # the fault's duration, not a wait for an outcome
        killed_at = time.time()
        dead = sentinels.kill_master()
        new = await asyncio.to_thread(sentinels.wait_promoted, old, FOLLOW_BOUND_S)
        promoted_s = time.time() - killed_at
        # The old primary comes back, as a replica of the new one (MIN_REPLICAS=1 needs one).
        await asyncio.to_thread(sentinels.restart_as_replica, dead)
        await asyncio.to_thread(sentinels.wait_replicas, 1, FOLLOW_BOUND_S)
        replica_back_s = time.time() - killed_at

        def after_kill(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """Events of work done on the new master: no failover completes before the
            sentinels' down-after period, so what succeeded earlier went to the old one
            (an XADD answered just before the kill and logged just after)."""
            return [e for e in events if _ts(e) > killed_at + DOWN_AFTER_MS / 1000]

        def from_new_master() -> list[float]:
            """When the cloud processed chunks the edge announced on the new master (a
            chunk line after that announcement: not work begun before the kill)."""
            fresh = {e["chunk_id"]: _ts(e) for e in after_kill(_announced(edge))}
            return [
                _ts(e)
                for e in cloud.events("chunk")
                if e["chunk_id"] in fresh and _ts(e) > fresh[e["chunk_id"]]
            ]

        async def followed() -> bool:
            return len(from_new_master()) >= CAMERAS

        await eventually(followed, FOLLOW_BOUND_S + 10, "both daemons to follow the new master")
        edge_first = min(_ts(e) for e in after_kill(_announced(edge)))
        cloud_first = min(from_new_master())
        assert edge.terminate() == 0, edge.text()[-3000:]
        states = ledger(workdir / "spool")
        acknowledged = {c for c, s in states.items() if s == "announced"}

        async def drained() -> bool:
            st = await queue_state(cluster.master_url())
            return (st["length"], st["pending"]) == (0, 0)

        await eventually(drained, SETTLE_S, "the queue drained on the new master")
        lost_before = acknowledged - await _recorded(s3, stack)
        lost_before -= await _stream_ids(cluster.master_url())  # (none: drained)
        reconciled = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "cloud-ingest"), "reconcile"],
            env=stack.ingest_env(**cluster.env_cloud),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert reconciled.returncode == 0, reconciled.stderr
        report = json.loads(reconciled.stdout)

        async def rebuilt() -> bool:
            return acknowledged <= await _recorded(s3, stack) and await drained()

        await eventually(rebuilt, SETTLE_S, "reconcile's entries processed")
        assert cloud.terminate() == 0, cloud.text()[-3000:]
    finally:
        edge.kill()
        cloud.kill()
    recorded = await _recorded(s3, stack)
    state = await queue_state(cluster.master_url())
    errors = [e for e in cloud.events("queue.unavailable") if _ts(e) > killed_at]
    retries = [e for e in edge.events("chunk.retry") if _ts(e) > killed_at - LAG_S]
    return {
        "min_replicas": min_replicas,
        "chunks": len(states),
        "announced": len(acknowledged),
        "lag_s": LAG_S,
        "promoted_s": round(promoted_s, 2),
        "replica_back_s": round(replica_back_s, 2),
        "edge_follow_s": round(edge_first - killed_at, 2),
        "cloud_follow_s": round(cloud_first - killed_at, 2),
        "cloud_errors_until_s": round(
            max((_ts(e) for e in errors), default=killed_at) - killed_at, 2
        ),
        "edge_retries": len(retries),
        "edge_unreplicated": sum("NotReplicated" in str(e.get("error")) for e in retries),
        "lost_before_reconcile": len(lost_before),
        "reconcile_requeued": report["requeued"],
        "lost_after_reconcile": len(acknowledged - recorded),
        "unexpected": len(recorded - set(states)),
        "pending": state["pending"],
        "dlq": state["dlq"],
        "master": f"{old} -> {new}",
    }


@pytest.mark.timeout(150)
@pytest.mark.parametrize("min_replicas", [0, 1])
async def test_sentinel_failover_loses_nothing_after_reconcile(
    stack: Stack, s3: S3, cluster: Cluster, clip: Path, tmp_path: Path, min_replicas: int
) -> None:
    """Replication lags LAG_S, then the primary is SIGKILLed; the sentinels promote the
    replica and both daemons follow within FOLLOW_BOUND_S. After reconcile nothing the
    edge acknowledged is lost; with EDGE_REDIS_MIN_REPLICAS=1 nothing was lost before it
    either; nothing dead-lettered, nothing left pending, nothing processed that the edge
    did not capture."""
    own = replace(stack, workdir=tmp_path / "run")
    own.workdir.mkdir()
    figures = await _failover_run(own, s3, cluster, clip, min_replicas)
    report_figures(f"sentinel_failover_min_replicas_{min_replicas}", figures)
    assert figures["edge_follow_s"] <= FOLLOW_BOUND_S
    assert figures["cloud_follow_s"] <= FOLLOW_BOUND_S
    assert figures["lost_after_reconcile"] == 0
    assert (figures["pending"], figures["dlq"], figures["unexpected"]) == (0, 0, 0)
    if min_replicas:
        assert figures["lost_before_reconcile"] == 0
        assert figures["edge_unreplicated"] > 0  # the lag was seen: WAIT said "not yet"


class _Settings(RedisConnection):
    pass


async def test_sentinel_readonly_from_a_demoted_master_drops_the_connection(
    tmp_path: Path,
) -> None:
    """A master demoted behind the sentinels' back (a partition healing, an operator's
    REPLICAOF) answers writes with READONLY on connections that stay open. The client
    turns that into a ConnectionError (a RedisError every loop of both daemons retries)
    and drops the connection, so the next command asks the sentinels again instead of
    writing to a replica for ever."""
    sentinels = SentinelCluster(tmp_path, down_after_ms=DOWN_AFTER_MS)
    sentinels.start()
    try:
        settings = _Settings(
            redis_url=SecretStr("redis://unused.invalid/0"),
            redis_sentinels=sentinels.addresses,  # type: ignore[arg-type]
            redis_sentinel_master=MASTER,
        )
        client = connect(settings, 5)
        try:
            await client.xadd("s", {"n": b"0"})
            primary, replica = sentinels.nodes
            pool: Any = client.connection_pool
            assert len(pool._available_connections) == 1
            with sentinels.data_client(replica.port) as c:
                c.execute_command("REPLICAOF", "NO", "ONE")
            with sentinels.data_client(primary.port) as c:
                c.execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
            with pytest.raises(RedisConnectionError, match="previous master is now a slave"):
                await client.xadd("s", {"n": b"1"})
            assert [c.is_connected for c in pool._available_connections] == [False]
        finally:
            await client.aclose()
    finally:
        sentinels.stop()
