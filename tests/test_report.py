"""The demo's report, built from a real short run and opened in a real headless Chromium.

Two live RTSP cameras through a real edge agent, SeaweedFS, Redis and the Ray consumers,
with 4 s scene windows; then the coverage audit (``cloud-ingest coverage``), the report
(``devstack.report``), and Debian's ``chromium`` driven over the DevTools protocol:
the page loads, logs no console error, throws nothing, fetches nothing from the network,
and every image rendered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from devstack import daemons, demo, report
from devstack.servers import RtspServer
from shared.keys import OPEN_WINDOWS, handoff_stream
from tests.support import S3, Daemon, Stack, eventually, report_figures

CAMERAS = ("cam1", "cam2")


@dataclass
class PageCheck:
    """What the browser saw of one page."""

    loaded: bool = False
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    screenshot: bytes = b""

    def problems(self) -> list[str]:
        out = [f"console error: {m}" for m in self.console_errors]
        out += [f"exception: {m}" for m in self.exceptions]
        out += [f"log error: {m}" for m in self.log_errors]
        out += [f"fetched {u}" for u in self.requests if not u.startswith(("file:", "data:"))]
        out += [f"image not rendered: {i}" for i in self.images if not i["rendered"]]
        if not self.loaded:
            out.append("the page never fired its load event")
        if not self.images:
            out.append("no image on the page")
        return out


class Chromium:
    """Debian's chromium, headless, driven over the DevTools protocol (a websocket)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.events: list[dict[str, Any]] = []
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 0
        self.reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Chromium:
        binary = shutil.which("chromium")
        assert binary, "chromium is missing: `make test` installs it (scripts/install-deps.sh)"
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True)
        # D-Bus complaints (no system bus here) go to this log, not into the page's console.
        log = (self.workdir / "chromium.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            *[
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",  # it writes the port it chose to the profile
                f"--user-data-dir={profile}",
                "--window-size=1280,1800",
                "about:blank",
            ],
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its renderer and GPU processes: one group to end
        )
        log.close()
        port_file = profile / "DevToolsActivePort"

        async def listening() -> bool:
            assert self.proc is not None and self.proc.returncode is None, "chromium exited"
            return port_file.exists() and bool(port_file.read_text().strip())

        await eventually(listening, 30, "chromium's DevTools port")
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        [page] = [t for t in targets if t["type"] == "page"]
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self.call(f"{domain}.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.reader:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        if self.ws:
            await self.ws.close()
        if self.http:
            await self.http.close()
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.proc:  # whatever of its own group outlived it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            doc = json.loads(msg.data)
            if "id" in doc:
                self.replies.pop(doc["id"]).set_result(doc)
            else:
                self.events.append(doc)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self.next_id += 1
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[self.next_id] = reply
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        doc = await asyncio.wait_for(reply, 30)
        assert "error" not in doc, f"{method}: {doc['error']}"
        result: dict[str, Any] = doc["result"]
        return result

    async def check(self, url: str) -> PageCheck:
        """Navigate to ``url``, wait for its load event, and report what went wrong."""
        self.events.clear()
        await self.call("Page.navigate", url=url)
        got = PageCheck()

        async def loaded() -> bool:
            return any(e["method"] == "Page.loadEventFired" for e in self.events)

        with contextlib.suppress(AssertionError):
            await eventually(loaded, 30, "the load event")
            got.loaded = True
        images = await self.call(
            "Runtime.evaluate",
            expression="Array.from(document.images).map(i => ({src: i.src.slice(0, 60),"
            " rendered: i.complete && i.naturalWidth > 0, width: i.naturalWidth}))",
            returnByValue=True,
        )
        got.images = images["result"]["value"]
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        got.screenshot = base64.b64decode(shot["data"])
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                got.console_errors.append(" ".join(str(a.get("value")) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                got.exceptions.append(json.dumps(p["exceptionDetails"])[:500])
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                where = p["entry"].get("url", "")[:80]  # a data: URI is the whole image
                got.log_errors.append(f"{where}: {p['entry']['text']}")
            elif e["method"] == "Network.requestWillBeSent":
                got.requests.append(p["request"]["url"])
        return got


async def _run(stack: Stack, s3: S3, rtsp: RtspServer) -> tuple[Any, ...]:
    """A real run: both cameras until each announced two chunks, then drained."""
    env = stack.ingest_env(
        INGEST_SITE_CAMERAS=json.dumps({"site-1": list(CAMERAS)}),
        INGEST_WINDOW_S="4",
        INGEST_WINDOW_TIMEOUT_S="2",
    )
    since = datetime.now(UTC)
    cloud = daemons.cloud_ingest(env, stack.workdir / "cloud.log")
    edge = daemons.edge_agent(
        stack.edge_env([{"id": c, "url": rtsp.url(c)} for c in CAMERAS]),
        stack.workdir / "edge.log",
    )
    try:

        async def two_each() -> bool:
            assert edge.running(), edge.text()[-3000:]
            chunks = edge.events("chunk")
            per = [e["camera_id"] for e in chunks if e.get("outcome") == "announced"]
            return all(per.count(c) >= 2 for c in CAMERAS)

        await eventually(two_each, 60, "two chunks announced per camera")
        edge_rc = edge.terminate()
        until = datetime.now(UTC)
        announced = len(edge.events("chunk"))

        async def processed() -> bool:
            return len(await s3.records(stack.out_bucket)) >= announced

        await eventually(processed, 60, "every announced chunk processed")
        client = aioredis.from_url(stack.redis_url)

        async def windows_handed_off() -> bool:
            left = int(await client.zcard(OPEN_WINDOWS))
            return left + int(await client.xlen(handoff_stream("chunks"))) == 0

        try:
            await eventually(windows_handed_off, 60, "every window closed and handed off")
        finally:
            await client.aclose()
        cloud_rc = cloud.terminate()
    finally:
        edge.kill()
        cloud.kill()
    return env, edge, cloud, edge_rc, cloud_rc, since, until


def _build(
    stack: Stack,
    env: dict[str, str],
    edge: Daemon,
    cloud: Daemon,
    rcs: tuple[int, int],
    span: tuple[datetime, datetime],
    out: Path,
    got: demo.Collected,
) -> Path:
    png = stack.workdir / "coverage.png"  # not in out: write() copies it beside the page
    doc = demo.coverage(env, "site-1", span[0], span[1], png)
    lines, ok = demo.summary_lines(edge, cloud, got.records, got.queue, *rcs)
    assert ok, lines
    return report.write(
        out,
        report.ReportInput(
            title="test run <script>alert('not run')</script> & co",  # escaped, not run
            summary=lines,
            records=got.records,
            windows=got.windows,
            coverage=doc,
            coverage_png=png,
        ),
    )


async def test_report_from_a_real_run_renders_in_chromium(
    stack: Stack, s3: S3, rtsp_server: RtspServer, tmp_path: Path
) -> None:
    assert shutil.which("chromium"), "chromium is missing: `make test` installs it (make deps)"
    started = time.monotonic()
    env, edge, cloud, edge_rc, cloud_rc, since, until = await _run(stack, s3, rtsp_server)
    got = await demo.collect(stack.redis_url, stack.s3_endpoint, stack.out_bucket)
    assert {r["manifest"]["camera_id"] for r in got.records} == set(CAMERAS)
    assert got.windows, "no window was handed off"
    assert all(w.mcap_bytes for w in got.windows), got.windows
    out = tmp_path / "report"
    page = await asyncio.to_thread(
        _build, stack, env, edge, cloud, (edge_rc, cloud_rc), (since, until), out, got
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "coverage.png",
        "latency.png",
        "report.html",
        "verdicts.png",
    ]
    text = page.read_text()
    assert "<script>" not in text  # the title's markup was escaped
    assert "http://" not in text and "https://" not in text  # nothing external
    assert all(w.mcap_key in text for w in got.windows)
    assert all(f"<td>{c}</td>" in text for c in CAMERAS)

    async with Chromium(tmp_path) as browser:
        # The checks can fail: a broken image, a console error and an external fetch.
        bad = tmp_path / "bad.html"
        bad.write_text(
            '<html><body><img src="data:image/png;base64,bm90IGEgcG5n">'
            '<img src="https://example.invalid/x.png">'
            "<script>console.error('boom')</script></body></html>"
        )
        caught = await browser.check(bad.as_uri())
        assert sum(not i["rendered"] for i in caught.images) == 2, caught
        assert caught.console_errors == ["boom"], caught
        assert any("example.invalid" in u for u in caught.requests), caught

        seen = await browser.check(page.as_uri())
    shot = tmp_path / "report-screenshot.png"
    shot.write_bytes(seen.screenshot)
    report_figures(  # in the run's summary, where a person looks for it
        "demo_report",
        {
            "report": str(page),
            "screenshot": str(shot),
            "run_report_browser_s": round(time.monotonic() - started, 1),
        },
    )
    assert seen.problems() == [], seen.problems()
    assert len(seen.images) == 3
    assert all(i["width"] >= 400 for i in seen.images), seen.images
    assert seen.screenshot.startswith(b"\x89PNG")
