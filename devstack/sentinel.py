"""A Redis Sentinel setup on free loopback ports: a primary, its replicas, three sentinels.

Every process is tracked by its PID (its own process group, as in ``servers``);
``kill_master`` SIGKILLs the node the sentinels name as master, ``stop`` ends them all.
Sentinel timeouts are short (``down_after_ms`` ~1 s) so that a failover takes seconds.
Sentinels are Debian's ``redis-sentinel`` (the redis-server binary in sentinel mode;
``redis-server --sentinel`` where only redis-server is installed).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import redis

from devstack.servers import RedisServer, Server, StartupError, free_port, tail, wait_until

MASTER = "mymaster"
# A full sync starts at once (Redis waits 5 s for more replicas to share it).
FAST_SYNC = ("--repl-diskless-sync-delay", "0")


class SentinelServer:
    """One sentinel watching ``master`` at ``host:port``; its config file is its own (a
    sentinel rewrites it as it learns the topology)."""

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        *,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        data_password: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = free_port()
        self.password = password
        self.dir = workdir / f"sentinel-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize no",
            'logfile ""',
            f"dir {self.dir}",
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {MASTER} {down_after_ms}",
            f"sentinel failover-timeout {MASTER} {failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER} 1",
        ]
        if data_password is not None:
            lines.append(f"sentinel auth-pass {MASTER} {data_password}")
        if password is not None:  # clients and the other sentinels authenticate with it
            lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.server = Server("redis-sentinel", _sentinel_argv(self.conf), self.dir / "sentinel.log")

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2
        )

    def start(self, timeout: float = 15) -> None:
        self.server.start()

        def pong() -> bool:
            with self.client() as c:
                return bool(c.ping())

        try:
            wait_until(pong, timeout, "redis-sentinel", self.server.proc)
        except StartupError as exc:
            raise StartupError(f"{exc}\n{tail(self.server.log_path)}") from None

    def master(self) -> dict[str, Any]:
        with self.client() as c:
            state: dict[str, Any] = c.sentinel_master(MASTER)
        return state

    def stop(self) -> None:
        self.server.stop()


class SentinelCluster:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority).

    ``addresses`` is what ``*_REDIS_SENTINELS`` takes, ``MASTER`` the master's name.
    ``password`` protects the data nodes (requirepass/masterauth, the sentinels'
    auth-pass), ``sentinel_password`` the sentinels."""

    def __init__(
        self,
        workdir: Path,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.password = password
        primary = RedisServer(workdir, password=password, extra_args=FAST_SYNC)
        follow = [*FAST_SYNC, "--replicaof", "127.0.0.1", str(primary.port)]
        self.nodes = [primary] + [
            RedisServer(workdir, password=password, extra_args=follow) for _ in range(replicas)
        ]
        self.sentinels = [
            SentinelServer(
                workdir,
                primary.port,
                quorum=sentinels // 2 + 1,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                data_password=password,
                password=sentinel_password,
            )
            for _ in range(sentinels)
        ]

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def node(self, port: int) -> RedisServer:
        [found] = [n for n in self.nodes if n.port == port]
        return found

    def data_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=2)

    def start(self, timeout: float = 30) -> None:
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout
        wait_until(
            lambda: self._online(self.nodes[0].port) == len(self.nodes) - 1,
            timeout,
            "replicas in sync",
        )
        for s in self.sentinels:
            s.start()
        wait_until(self._sentinels_agree, max(1.0, deadline - time.monotonic()), "sentinels")

    def _online(self, port: int) -> int:
        """How many replicas of the node at ``port`` are in sync (past their full sync)."""
        with self.data_client(port) as c:
            info: dict[str, Any] = c.info("replication")
        replicas = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]
        return sum(1 for v in replicas if v.get("state") == "online")

    def _sentinels_agree(self) -> bool:
        """Every sentinel knows the others and every replica (the hello messages travel
        through the master every 2 s)."""
        for s in self.sentinels:
            state = s.master()
            if int(state["num-other-sentinels"]) != len(self.sentinels) - 1:
                return False
            if int(state["num-slaves"]) != len(self.nodes) - 1:
                return False
        return True

    def master_port(self) -> int | None:
        """The master's port as a majority of the sentinels name it (None: no majority)."""
        seen: dict[int, int] = {}
        for s in self.sentinels:
            try:
                with s.client() as c:
                    addr = c.sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                continue
            if addr:
                port = int(addr[1])
                seen[port] = seen.get(port, 0) + 1
        for port, votes in seen.items():
            if votes > len(self.sentinels) // 2:
                return port
        return None

    def kill_master(self) -> RedisServer:
        """SIGKILL the node the sentinels name as master, as a crash would."""
        port = self.master_port()
        if port is None:
            raise StartupError("the sentinels name no master")
        node = self.node(port)
        node.kill()
        return node

    def wait_promoted(self, old_port: int, timeout: float = 30) -> int:
        """Wait until the sentinels name another master, and it says it is one."""
        found: list[int] = []

        def promoted() -> bool:
            port = self.master_port()
            if port is None or port == old_port:
                return False
            with self.data_client(port) as c:
                role = c.execute_command("ROLE")
            if role[0] not in (b"master", "master"):
                return False
            found.append(port)
            return True

        wait_until(promoted, timeout, "a replica promoted")
        return found[-1]

    def restart_as_replica(self, node: RedisServer) -> RedisServer:
        """Start a killed node again on its port as a replica of the current master, as
        its configuration (rewritten by the sentinels' reconfiguration) would bring it
        back. (Left alone, the sentinels convert a returning old master after ~10 s.)"""
        master = self.master_port()
        if master is None:
            raise StartupError("the sentinels name no master")
        fresh = RedisServer(
            self.workdir,
            node.port,
            password=self.password,
            extra_args=[*FAST_SYNC, "--replicaof", "127.0.0.1", str(master)],
        )
        self.nodes[self.nodes.index(node)] = fresh
        fresh.start()
        return fresh

    def wait_replicas(self, n: int, timeout: float = 30) -> None:
        """Wait until the current master has ``n`` replicas online."""

        def enough() -> bool:
            port = self.master_port()
            return port is not None and self._online(port) >= n

        wait_until(enough, timeout, f"{n} replica(s) online")

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for node in self.nodes:
            node.stop()


def _sentinel_argv(conf: Path) -> list[str]:
    binary = shutil.which("redis-sentinel")
    if binary is not None:
        return [binary, str(conf)]
    server = shutil.which("redis-server")
    if server is None:
        raise StartupError("redis-sentinel is not installed (make deps installs it)")
    return [server, str(conf), "--sentinel"]
