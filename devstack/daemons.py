"""The project's daemons run as their own processes, as systemd would run them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


class Daemon:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log, name)

    def running(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for a graceful exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, or clean-up after a failed test)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._fh.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def log_events(path: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines with ``event == name`` (Ray prefixes actor lines; skip to the '{')."""
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        start = raw.find("{")
        if start < 0:
            continue
        try:
            doc = json.loads(raw[start:])
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == name:
            out.append(doc)
    return out


def edge_agent(env: dict[str, str], log: Path) -> Daemon:
    return Daemon([str(BIN / "edge-agent"), "run"], env, log)


class CloudIngest(Daemon):
    """``cloud-ingest run``. Its consumer actors are detached: a driver killed with SIGKILL
    leaves them running for the next driver to adopt (as in production). ``kill()`` is also
    the clean-up after a test, so after anything but a clean exit it removes them too
    (through this process's Ray connection, or a short-lived driver of its own);
    ``crash()`` is the kill alone."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        super().__init__([str(BIN / "cloud-ingest"), "run"], env, log)
        self.env = env

    def crash(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def kill(self) -> None:
        crashed = self.proc.poll() != 0  # a clean exit killed its actors itself
        super().kill()
        address = self.env.get("RAY_ADDRESS")
        if not crashed or not address:
            return
        import ray

        group = self.env.get("INGEST_GROUP", "ingest")
        if ray.is_initialized() and ray.get_runtime_context().gcs_address == address:
            _kill_consumers(group)
            return
        # From a driver of our own: this process is connected to another cluster, or none.
        with contextlib.suppress(subprocess.TimeoutExpired):  # a cluster past saving
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _KILL_CONSUMERS,
                    address,
                    group,
                ],
                env=self.env,
                capture_output=True,
                timeout=60,
                check=False,
            )


def _kill_consumers(group: str) -> None:
    import ray

    from cloud_ingest.placement import NAMESPACE, our_actors

    for name in our_actors(group).values():
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # gone meanwhile
            continue


_KILL_CONSUMERS = """
import sys, ray
from devstack.daemons import _kill_consumers
ray.init(address=sys.argv[1], log_to_driver=False)
_kill_consumers(sys.argv[2])
"""


def cloud_ingest(env: dict[str, str], log: Path) -> CloudIngest:
    return CloudIngest(env, log)
