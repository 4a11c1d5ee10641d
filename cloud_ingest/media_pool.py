"""Media work in worker processes that can be stopped for real.

A thread cannot be killed: a decode that overruns ``INGEST_PROCESS_TIMEOUT_S`` under
``asyncio.wait_for`` only stops being awaited, keeps its thread, and enough of them
fill the actor's executor. Here each actor keeps ``size`` worker processes, each doing
one task at a time; on the time limit the worker is killed (SIGKILL) and replaced, and
only that attempt fails. The limit counts from when a worker has the task, not while
the task waits for a free worker.

A worker is a fresh interpreter (``python -m cloud_ingest.media_pool``): the spawn start
method, without multiprocessing re-running the parent's ``__main__`` (in a Ray actor,
Ray's own worker script). It preloads the media libraries before saying it is ready,
talks over a socket pair (length-prefixed pickles: the actor's own code on both ends),
and dies with its parent (``PR_SET_PDEATHSIG``), so a kill -9 of the actor leaves no
orphan decoding on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pickle
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

START_TIMEOUT_S = 60.0  # interpreter start and imports, on a busy node
_HEADER = struct.Struct(">Q")
_PR_SET_PDEATHSIG = 1


class ProcessTimeout(Exception):
    """The media work of one attempt ran past the limit; its worker was killed."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"media work exceeded INGEST_PROCESS_TIMEOUT_S={limit_s:g}s")
        self.limit_s = limit_s


class WorkerDied(Exception):
    """The worker died during the task (a crash in a decoder, the OOM killer): that attempt
    failed."""


class WorkerStartFailed(Exception):
    """No worker could be started: the node's environment, not any chunk."""


class WorkerError(Exception):
    """The task raised an unexpected exception inside the worker (our bug, not the chunk's):
    carries the original type's name and traceback."""

    def __init__(self, kind: str, message: str, trace: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.trace = trace


@dataclass(eq=False)
class _Worker:
    proc: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def call(self, task: tuple[Any, ...], limit_s: float) -> tuple[Any, ...]:
        payload = await asyncio.to_thread(pickle.dumps, task, pickle.HIGHEST_PROTOCOL)
        try:
            self.writer.write(_HEADER.pack(len(payload)))
            self.writer.write(payload)
            await self.writer.drain()
        except ConnectionError:
            raise WorkerDied(await self.exit_status()) from None
        try:  # the clock starts once the worker has the task
            reply: tuple[Any, ...] = await asyncio.wait_for(_read(self.reader), limit_s)
        except TimeoutError:
            raise ProcessTimeout(limit_s) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            raise WorkerDied(await self.exit_status()) from None
        return reply

    async def exit_status(self) -> str:
        try:
            code = await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            return "media worker closed its socket"
        if code < 0:
            return f"media worker killed by {signal.Signals(-code).name}"
        return f"media worker exited with status {code}"

    def kill(self) -> None:
        """SIGKILL now (no await: also safe while the calling task is being cancelled); the
        event loop's child watcher reaps it."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.writer.close()


class MediaPool:
    """``size`` worker processes; ``run(fn, *args)`` runs ``fn(*args)`` in one of them."""

    def __init__(self, size: int, limit_s: float) -> None:
        self.size = size
        self.limit_s = limit_s
        self.busy = 0  # workers running a task
        self.waiting = 0  # tasks waiting for a free worker
        self.killed = 0  # workers killed on the time limit (or a cancelled task)
        self.broken: str | None = None  # why the last worker start failed
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._slots = asyncio.Semaphore(size)

    def pids(self) -> list[int]:
        return sorted(w.proc.pid for w in self._workers)

    async def start(self) -> None:
        """Start every worker now (a failure is kept in ``broken`` and met again on use)."""
        started = await asyncio.gather(
            *(self._spawn() for _ in range(self.size - len(self._workers))),
            return_exceptions=True,
        )
        self._idle.extend(w for w in started if isinstance(w, _Worker))

    async def check(self) -> str | None:
        """For the environment probe: None once a worker can start (again)."""
        if self.broken is None:
            return None
        try:
            worker = await self._spawn()
        except WorkerStartFailed as exc:
            return str(exc)
        self._idle.append(worker)
        return None

    async def close(self) -> None:
        for worker in list(self._workers):
            worker.kill()
        self._workers.clear()
        self._idle.clear()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            reply = await self._on(await self._take(), (fn, args))
        finally:
            self._slots.release()
        return _unwrap(reply)  # type: ignore[no-any-return]

    async def _take(self) -> _Worker:
        """An idle worker that is still alive (one killed while idle, by the OOM killer say,
        is replaced here rather than failing an innocent chunk), else a new one."""
        while self._idle:
            worker = self._idle.pop()
            if worker.proc.returncode is None:
                return worker
            self._workers.discard(worker)
            worker.kill()
        return await self._spawn()

    async def _on(self, worker: _Worker, task: tuple[Any, ...]) -> tuple[Any, ...]:
        self.busy += 1
        healthy = False
        try:
            reply = await worker.call(task, self.limit_s)
            healthy = True
            return reply
        finally:
            self.busy -= 1
            if healthy:
                self._idle.append(worker)
            else:  # timed out, died, or the attempt was cancelled mid-task: never reused
                self.killed += 1
                self._workers.discard(worker)
                worker.kill()

    async def _spawn(self) -> _Worker:
        """Start one worker and wait until it has loaded the media libraries. Must run on
        the event loop's thread: PR_SET_PDEATHSIG fires when the *thread* that started the
        child ends, and the loop's thread lives as long as the actor."""
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cloud_ingest.media_pool",
                str(theirs.fileno()),
                str(os.getpid()),
                pass_fds=(theirs.fileno(),),
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
        except OSError as exc:
            ours.close()
            self.broken = f"cannot start a media worker: {exc}"
            raise WorkerStartFailed(self.broken) from None
        finally:
            theirs.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=ours, limit=1 << 22)
        except BaseException:
            ours.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        worker = _Worker(proc, reader, writer)
        self._workers.add(worker)  # from now on close() kills it, even mid-start
        try:
            await asyncio.wait_for(_read(reader), START_TIMEOUT_S)
        except BaseException as exc:
            self._workers.discard(worker)
            worker.kill()
            if not isinstance(exc, (TimeoutError, asyncio.IncompleteReadError, ConnectionError)):
                raise  # cancelled: the worker is gone with the attempt
            self.broken = f"a media worker did not start: {await worker.exit_status()}"
            raise WorkerStartFailed(self.broken) from None
        self.broken = None
        return worker


def _unwrap(reply: tuple[Any, ...]) -> Any:
    from shared.manifest import Rejected

    kind = reply[0]
    if kind == "ok":
        return reply[1]
    if kind == "rejected":
        raise Rejected(reply[1], reply[2])
    raise WorkerError(reply[1], reply[2], reply[3])


async def _read(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    reply: tuple[Any, ...] = pickle.loads(await reader.readexactly(n))  # noqa: S301 (our own worker)
    return reply


# -- the worker process -----------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _send(sock: socket.socket, reply: tuple[Any, ...]) -> None:
    payload = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def _answer(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    from shared.manifest import Rejected

    try:
        return ("ok", fn(*args))
    except Rejected as exc:
        return ("rejected", exc.reason, exc.detail)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc)[:1000], traceback.format_exc()[-4000:])


def main() -> None:
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the actor's to handle
    from cloud_ingest.preprocess import warm_up  # preload: av, numpy, pyarrow, the filters

    warm_up()

    sock = socket.socket(fileno=fd)
    _send(sock, ("ready", os.getpid()))
    while (header := _recv_exact(sock, _HEADER.size)) is not None:
        body = _recv_exact(sock, _HEADER.unpack(header)[0])
        if body is None:
            return
        fn, args = pickle.loads(body)  # noqa: S301 (the actor that started us)
        _send(sock, _answer(fn, args))


if __name__ == "__main__":
    main()
