"""Redis clients: the one place settings become a client, direct or through Sentinel.

Both daemons read the same Redis settings under their own prefix (``EDGE_``,
``INGEST_``): ``REDIS_URL`` (scheme, user, password, database and TLS options of the
data nodes), ``REDIS_PASSWORD`` (or ``_FILE``, or the systemd credential
``redis_password``: the data nodes' password, when the URL does not carry one),
``REDIS_SENTINELS`` (comma-separated ``host:port``), ``REDIS_SENTINEL_MASTER`` and
``REDIS_SENTINEL_PASSWORD`` (or ``_FILE``, or the credential ``redis_sentinel_password``).

With sentinels, the URL's host and port are not used: every new connection asks the
sentinels where the master is now (redis-py's ``SentinelConnectionPool``). A connection
to a master that died fails its command (ConnectionError) and is dropped; one to a
master that was demoted gets READONLY, which the pool turns into a ConnectionError and
a disconnect. Either way the command fails once and the caller's own retry (every loop
of both daemons retries Redis errors) reconnects to whichever node the sentinels name.
Nothing is re-sent behind the caller's back (see ``connect``).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any

import redis.asyncio as aioredis
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from shared.settings import secret_from_file

# TCP keepalive probes after 30 s of silence, 10 s apart, 3 of them: a peer that vanished
# without a reset (a crashed host, a dropped NAT entry) is noticed within a minute or so.
_KEEPALIVE = {
    opt: value
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if (opt := getattr(socket, name, None)) is not None
}
HEALTH_CHECK_S = 30  # a connection idle this long is PINGed before it is used again
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)$")
_MASTER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def parse_address(entry: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port); ValueError saying what is wrong."""
    match = _HOST_PORT.match(entry.strip())
    if match is None:
        raise ValueError(f"{entry.strip()!r} is not host:port")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"{entry.strip()!r}: port {port} is out of range")
    return match["v6"] or match["host"], port


class RedisConnection(BaseModel):
    """The Redis settings both daemons share; mixed into ``EdgeSettings`` and
    ``IngestSettings``, whose ``env_prefix`` names the variables in every message."""

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = None
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str | None = None
    redis_sentinel_password: SecretStr | None = None
    redis_sentinel_password_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _redis_secret_files(cls, data: Any) -> Any:
        prefix = str(cls.model_config.get("env_prefix", ""))
        data = secret_from_file(data, "redis_password", "redis_password", prefix)
        return secret_from_file(data, "redis_sentinel_password", "redis_sentinel_password", prefix)

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            out = []
            for entry in value:
                host, port = parse_address(str(entry))
                out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            return out
        return value

    @model_validator(mode="after")
    def _redis_consistent(self) -> RedisConnection:
        p = str(type(self).model_config.get("env_prefix", ""))
        try:
            options = parse_url(self.redis_url.get_secret_value())
        except ValueError as exc:  # the message names the scheme or option, never the URL
            raise ValueError(f"{p}REDIS_URL: {exc}") from None
        if self.redis_password is not None and options.get("password"):
            raise ValueError(
                f"{p}REDIS_PASSWORD: set, but {p}REDIS_URL carries a password too: keep one"
            )
        if self.redis_sentinels:
            if not self.redis_sentinel_master:
                raise ValueError(
                    f"{p}REDIS_SENTINEL_MASTER: required when {p}REDIS_SENTINELS is set"
                )
            if not _MASTER_NAME.match(self.redis_sentinel_master):
                raise ValueError(f"{p}REDIS_SENTINEL_MASTER: not a valid master name")
            if options.get("connection_class") not in (None, SSLConnection):
                raise ValueError(f"{p}REDIS_URL: must be redis:// or rediss:// with sentinels")
        elif self.redis_sentinel_master or self.redis_sentinel_password is not None:
            raise ValueError(
                f"{p}REDIS_SENTINELS: required when {p}REDIS_SENTINEL_MASTER or "
                f"{p}REDIS_SENTINEL_PASSWORD is set"
            )
        return self


class SentinelRedis(aioredis.Redis):
    """The master's client; closing it also closes its connections to the sentinels."""

    manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.manager is not None:
                await self.manager.aclose()


def _options(timeout_s: float) -> dict[str, Any]:
    """Every read and connect bounded by ``timeout_s``, TCP keepalive on, an idle
    connection checked before reuse, and no silent re-send of a failed command."""
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "socket_keepalive": True,
        "socket_keepalive_options": _KEEPALIVE,
        "health_check_interval": HEALTH_CHECK_S,
        "retry": Retry(NoBackoff(), 0),
    }


def connect(url: str, timeout_s: float, *, password: str | None = None) -> aioredis.Redis:
    """A client of one Redis at ``url`` (``password`` unless the URL carries one)."""
    extra = {} if password is None else {"password": password}
    return aioredis.from_url(url, **_options(timeout_s), **extra)


def redis_client(settings: RedisConnection, timeout_s: float) -> aioredis.Redis:
    """The client both daemons use, from their settings: one Redis at ``REDIS_URL``, or
    the master of ``REDIS_SENTINEL_MASTER`` as the sentinels name it now, with the URL's
    user, password, database and TLS options (and ``REDIS_PASSWORD``) on the data nodes.
    Bounded timeouts and no silent re-send, as ``shared.queue.connect`` says."""
    url = settings.redis_url.get_secret_value()
    password = _secret(settings.redis_password)
    if not settings.redis_sentinels:
        return connect(url, timeout_s, password=password)
    assert settings.redis_sentinel_master is not None  # checked by the settings
    node = dict(parse_url(url))
    for key in ("host", "port", "connection_class"):
        node.pop(key, None)
    tls = url.lower().startswith("rediss://")
    tls_options = {k: v for k, v in node.items() if k.startswith("ssl_")}
    if password is not None:
        node["password"] = password
    # Sentinels are reached with the same TLS settings as the data nodes (Redis configures
    # both with the same tls-* directives), authenticated by their own password if any.
    sentinel_kwargs: dict[str, Any] = {**_options(timeout_s), **tls_options}
    if tls:
        sentinel_kwargs["ssl"] = True
    sentinel_password = _secret(settings.redis_sentinel_password)
    if sentinel_password is not None:
        sentinel_kwargs["password"] = sentinel_password
    manager = Sentinel(  # type: ignore[no-untyped-call]
        [parse_address(a) for a in settings.redis_sentinels],
        sentinel_kwargs=sentinel_kwargs,
        **_options(timeout_s),
        **node,
        ssl=tls,
    )
    client: SentinelRedis = manager.master_for(
        settings.redis_sentinel_master, redis_class=SentinelRedis
    )
    client.manager = manager
    return client


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None or not value.get_secret_value() else value.get_secret_value()
