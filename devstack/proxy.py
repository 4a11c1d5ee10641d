"""A real TCP proxy in front of an HTTP/1.1 server (S3), for tests that must see the wire.

``HttpTap`` forwards every byte both ways between its own loopback port and the
upstream server, from a thread of its own (so clients in other processes or in
the test's own event loop can use it). On the way it records what a client's own
tools would show: each request's method, target and headers, when its body's
bytes passed, and the bytes each way over time. It can also damage one chosen
request in transit (one body byte flipped), as a bad NIC or middlebox would.

It parses requests framed by ``Content-Length`` (what botocore sends); a request
with another framing is recorded with ``framing`` set and passed on untouched.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from devstack.servers import free_port


@dataclass
class TappedRequest:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    started: float  # monotonic time the request line arrived
    body_size: int = 0
    body_seen: int = 0
    finished: float | None = None  # when the last body byte passed
    answered: float | None = None  # when the last byte of its answer passed back
    damaged_at: int | None = None  # body offset flipped in transit
    framing: str = "content-length"

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""


@dataclass
class _Damage:
    match: Callable[[TappedRequest], bool]
    offset: int
    done: bool = False


@dataclass
class _Parser:
    """Client → server HTTP/1.1 request framing, fed as bytes arrive."""

    tap: HttpTap
    head: bytearray = field(default_factory=bytearray)
    current: TappedRequest | None = None
    last: TappedRequest | None = None  # answers on a connection come in request order
    left: int = 0  # body bytes still to come for ``current``
    opaque: bool = False  # unknown framing: stop parsing this connection

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        view = memoryview(data)
        while view:
            if self.opaque:
                out += view
                break
            if self.current is not None and self.left:
                n = min(self.left, len(view))
                out += self.tap.body_bytes(self.current, bytes(view[:n]))
                self.left -= n
                view = view[n:]
                if not self.left:
                    self.current.finished = time.monotonic()
                    self.current = None
                continue
            self.head += view
            view = memoryview(b"")
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                break
            raw, rest = bytes(self.head[: end + 4]), bytes(self.head[end + 4 :])
            self.head.clear()
            out += raw
            self._start(raw)
            view = memoryview(rest)
        return bytes(out)

    def _start(self, raw: bytes) -> None:
        lines = raw.decode("latin-1").split("\r\n")
        method, target, *_ = [*lines[0].split(" "), "", ""]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        req = TappedRequest(method, target, headers, time.monotonic())
        self.last = req
        with self.tap.lock:
            self.tap.requests.append(req)
        if "transfer-encoding" in headers:
            req.framing = headers["transfer-encoding"]
            self.opaque = True
            return
        req.body_size = int(headers.get("content-length", "0") or 0)
        if req.body_size:
            self.current, self.left = req, req.body_size
        else:
            req.finished = req.started


class HttpTap:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = free_port()
        self.lock = threading.Lock()
        self.requests: list[TappedRequest] = []
        self.sent: list[tuple[float, int]] = []  # (monotonic time, bytes) client → server
        self.received = 0  # bytes server → client
        self._damage: list[_Damage] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control (from any thread) ----------------------------------------------

    def start(self) -> HttpTap:
        self._thread = threading.Thread(target=self._run, name="http-tap", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the HTTP tap did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)

    def __enter__(self) -> HttpTap:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def damage(self, match: Callable[[TappedRequest], bool], offset: int = 100) -> None:
        """Flip one body byte (at ``offset``) of the next request that ``match``es."""
        with self.lock:
            self._damage.append(_Damage(match, offset))

    def snapshot(self) -> list[TappedRequest]:
        with self.lock:
            return list(self.requests)

    def sent_between(self, start: float, end: float) -> int:
        """Client → server bytes that passed in [start, end) (monotonic times)."""
        with self.lock:
            return sum(n for t, n in self.sent if start <= t < end)

    @staticmethod
    def most_in_flight(chosen: list[TappedRequest]) -> int:
        """The most of ``chosen`` that were in flight at once (request started, answer not
        yet fully back)."""
        events = []
        for r in chosen:
            events += [(r.started, 1), (r.answered or r.started, -1)]
        most = now = 0
        for _, step in sorted(events):  # at a tie an end (-1) sorts before a start
            now += step
            most = max(most, now)
        return most

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.sent.clear()
            self.received = 0

    # -- the proxy (its own thread and loop) ------------------------------------

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        parser = _Parser(self)

        def answer(data: bytes) -> bytes:
            if parser.last is not None:  # the bytes back belong to the latest request
                parser.last.answered = time.monotonic()
            return data

        await asyncio.gather(
            self._pipe(reader, up_writer, parser.feed, outbound=True),
            self._pipe(up_reader, writer, answer, outbound=False),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        transform: Callable[[bytes], bytes],
        *,
        outbound: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                with self.lock:
                    if outbound:
                        self.sent.append((time.monotonic(), len(data)))
                    else:
                        self.received += len(data)
                writer.write(transform(data))
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def body_bytes(self, req: TappedRequest, data: bytes) -> bytes:
        """Body bytes of ``req`` in transit: counted, and damaged if a damage is armed."""
        start = req.body_seen
        req.body_seen += len(data)
        with self.lock:
            armed = next((d for d in self._damage if not d.done and d.match(req)), None)
            if armed is None or not start <= armed.offset < req.body_seen:
                return data
            armed.done = True
        req.damaged_at = armed.offset
        out = bytearray(data)
        out[armed.offset - start] ^= 0xFF
        return bytes(out)
