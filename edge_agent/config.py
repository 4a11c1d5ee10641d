"""Edge configuration: ``EDGE_*`` environment variables (contract names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.spool import RESERVED_DIRS
from shared.manifest import SCHEMA_VERSION, Bucket, Ident
from shared.redis_client import RedisConnection
from shared.settings import secret_from_file


class Camera(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Ident
    url: str

    @model_validator(mode="after")
    def _scheme(self) -> Camera:
        if self.id in RESERVED_DIRS:
            raise ValueError(f"camera id {self.id!r} is reserved (a spool directory)")
        scheme = urlparse(self.url).scheme
        if scheme not in {"rtsp", "rtsps", "http", "https", "file"}:
            raise ValueError(f"camera {self.id!r}: unsupported URL scheme {scheme!r}")
        return self


class EdgeSettings(RedisConnection, BaseSettings):
    """``EDGE_REDIS_URL``, ``EDGE_REDIS_PASSWORD`` (``_FILE``) and the sentinel settings
    come from ``RedisConnection``."""

    model_config = SettingsConfigDict(env_prefix="EDGE_", extra="ignore", frozen=True)

    device_id: Ident
    site_id: Ident
    cameras: list[Camera] = Field(default_factory=list)
    cameras_file: Path | None = None
    segment_seconds: float = Field(default=10.0, gt=0, le=600)
    spool_dir: Path = Path("/var/lib/edge-agent/spool")
    spool_max_bytes: int = Field(default=10 * 1024**3, gt=0)
    spool_min_free_bytes: int = Field(default=256 * 1024**2, ge=0)
    spool_eviction: Literal["oldest", "newest"] = "oldest"
    # Partial chunks that could not be salvaged, kept for inspection: bounded by bytes and
    # age, and counted against EDGE_SPOOL_MAX_BYTES (dropped first when it is reached).
    quarantine_max_bytes: int = Field(default=1024**3, ge=0)
    quarantine_max_age_s: float = Field(default=7 * 86400.0, gt=0)
    # Finished ledger rows (announced, or evicted/lost and declared) are kept this long.
    ledger_retention_s: float = Field(default=7 * 86400.0, gt=0)
    # How long a ledger write waits for another process holding the database (a backup,
    # an sqlite3 shell) before it fails and is retried.
    ledger_busy_timeout_s: float = Field(default=30.0, gt=0)
    # No chunk committed, uploaded, announced or evicted for this long while work waits
    # and S3 and Redis answer: delivery is wedged (/readyz fails, the watchdog is withheld).
    delivery_stall_s: float = Field(default=300.0, gt=0)
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_bucket: Bucket
    s3_prefix: str = "raw"
    # Every Redis read and connect is bounded by this (above EDGE_REDIS_MIN_REPLICAS_TIMEOUT_S).
    redis_timeout_s: float = Field(default=10.0, ge=1.0, le=300)
    # A manifest counts as announced only once this many replicas have its XADD (WAIT);
    # fewer within the timeout: announced again later (a duplicate the cloud drops).
    redis_min_replicas: int = Field(default=0, ge=0, le=100)
    redis_min_replicas_timeout_s: float = Field(default=1.0, gt=0, le=60)
    stream: str = Field(default="chunks", min_length=1, max_length=200)
    # The manifest schema this agent writes: pin 1 while some consumer still reads only
    # version 1 (a version 1 manifest declares gaps without their cause).
    manifest_schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    signing_key_id: Ident = "edge"
    signing_key: SecretStr | None = None
    signing_key_file: Path | None = None
    http_bind: str = "127.0.0.1:9108"
    # Bearer token for /readyz and /metrics; set it whenever EDGE_HTTP_BIND is not loopback.
    http_token: SecretStr | None = None
    http_token_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] | None = None
    upload_concurrency: int = Field(default=4, ge=1, le=64)
    upload_max_bps: int = Field(default=0, ge=0)  # 0: no bandwidth cap
    multipart_threshold_bytes: int = Field(default=16 * 1024**2, ge=5 * 1024**2)
    multipart_part_bytes: int = Field(default=8 * 1024**2, ge=5 * 1024**2)
    drain_timeout_s: float = Field(default=20.0, gt=0)
    camera_timeout_s: float = Field(default=10.0, gt=0)  # connect/open
    watchdog_s: float = Field(default=5.0, gt=0)  # no packet for this long: reconnect
    reconnect_max_s: float = Field(default=30.0, gt=0)
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_open_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _cameras_from_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("cameras_file") and not data.get("cameras"):
            path = Path(str(data["cameras_file"]))
            try:
                data = {**data, "cameras": json.loads(path.read_text())}
            except (OSError, ValueError) as exc:
                raise ValueError(f"EDGE_CAMERAS_FILE: cannot read {path}: {exc}") from None
        return data

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        data = secret_from_file(data, "signing_key", "signing_key", "EDGE_")
        return secret_from_file(data, "http_token", "http_token", "EDGE_")

    @model_validator(mode="after")
    def _resolve(self) -> EdgeSettings:
        key = self.signing_key  # or read from its file or credential (_secret_files)
        if key is None or not key.get_secret_value():
            raise ValueError("EDGE_SIGNING_KEY (or EDGE_SIGNING_KEY_FILE) must be set")
        if not self.cameras:
            raise ValueError("EDGE_CAMERAS (or EDGE_CAMERAS_FILE) must list at least one camera")
        ids = [c.id for c in self.cameras]
        if len(set(ids)) != len(ids):
            raise ValueError("EDGE_CAMERAS: camera ids must be unique")
        if self.redis_min_replicas and self.redis_min_replicas_timeout_s >= self.redis_timeout_s:
            raise ValueError(
                "EDGE_REDIS_MIN_REPLICAS_TIMEOUT_S: must be below EDGE_REDIS_TIMEOUT_S "
                "(WAIT blocks that long on a connection whose reads time out after that)"
            )
        return self

    def secret(self) -> bytes:
        assert self.signing_key is not None  # resolved by the validator
        return self.signing_key.get_secret_value().encode()
