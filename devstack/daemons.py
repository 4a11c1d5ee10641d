"""The project's daemons run as their own processes, as systemd would run them."""

from __future__ import annotations

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


def cloud_ingest(env: dict[str, str], log: Path) -> Daemon:
    return Daemon([str(BIN / "cloud-ingest"), "run"], env, log)
