"""Health and metrics over aiohttp: ``/healthz`` (alive), ``/readyz`` (dependencies), ``/metrics``.

Binds to loopback by default; each daemon supplies its own readiness check and
Prometheus registry. With a bearer token, ``/readyz`` and ``/metrics`` answer 401 to
requests without it (``/healthz`` says nothing but "alive" and stays open for probes).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shared import logs

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]


def parse_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guard(token: str | None) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is None or request.path == "/healthz":
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    return check


async def serve(
    bind: str, registry: CollectorRegistry, ready: ReadyCheck, token: str | None = None
) -> web.AppRunner:
    host, port = parse_bind(bind)
    if token is None and not is_loopback(host):
        logs.get("http").warning("http.unprotected", bind=bind, hint="set *_HTTP_TOKEN")

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = await ready()
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[_guard(token)])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
