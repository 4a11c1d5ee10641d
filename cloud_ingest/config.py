"""Cloud configuration: ``INGEST_*`` environment variables (contract names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cloud_ingest.filters import Thresholds
from cloud_ingest.preprocess import Options
from shared.manifest import Bucket, Ident, SigningKey
from shared.redis_client import RedisConnection
from shared.settings import secret_from_file


def _json_object(raw: str, source: str, shape: str) -> dict[str, Any]:
    """A setting given as JSON text: an object, or a ValueError naming the variable."""
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc.msg})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{source}: expected a JSON object {shape}")
    return parsed


class KeyEntry(BaseModel):
    """One ``INGEST_KEYRING`` entry: ``"secret"`` or ``{"secret", "device_id", "site_id",
    "cameras"}``. Bind every production key to its device and site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: SecretStr = Field(min_length=16)
    device_id: Ident | None = None
    site_id: Ident | None = None
    cameras: list[Ident] | None = None

    def signing_key(self) -> SigningKey:
        return SigningKey(
            secret=self.secret.get_secret_value().encode(),
            device_id=self.device_id,
            site_id=self.site_id,
            cameras=None if self.cameras is None else frozenset(self.cameras),
        )


class Calibration(BaseModel):
    """One camera's calibration (``INGEST_CAMERA_CALIBRATION``): intrinsics as ROS and
    ``foxglove.CameraCalibration`` define them, and optionally its pose in the site frame
    (``translation`` in metres, ``rotation`` a unit quaternion x, y, z, w)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    width: int = Field(gt=0, le=16384)
    height: int = Field(gt=0, le=16384)
    K: list[float] = Field(min_length=9, max_length=9)
    D: list[float] = Field(default_factory=list, max_length=14)
    distortion_model: Literal["plumb_bob", "rational_polynomial", "kannala_brandt", ""] = (
        "plumb_bob"
    )
    R: list[float] = Field(
        default_factory=lambda: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        min_length=9,
        max_length=9,
    )
    P: list[float] | None = Field(default=None, min_length=12, max_length=12)
    translation: tuple[float, float, float] | None = None
    rotation: tuple[float, float, float, float] | None = None

    @model_validator(mode="after")
    def _pose(self) -> Calibration:
        if (self.translation is None) != (self.rotation is None):
            raise ValueError("translation and rotation come together (the camera's pose)")
        if self.rotation is not None and abs(sum(v * v for v in self.rotation) - 1) > 1e-3:
            raise ValueError("rotation must be a unit quaternion (x, y, z, w)")
        return self

    def projection(self) -> list[float]:
        """P, or [K | 0] for a monocular camera without one."""
        if self.P is not None:
            return self.P
        k = self.K
        return [k[0], k[1], k[2], 0.0, k[3], k[4], k[5], 0.0, k[6], k[7], k[8], 0.0]


class IngestSettings(RedisConnection, BaseSettings):
    """``INGEST_REDIS_URL``, ``INGEST_REDIS_PASSWORD`` (``_FILE``) and the sentinel
    settings come from ``RedisConnection``."""

    model_config = SettingsConfigDict(env_prefix="INGEST_", extra="ignore", frozen=True)

    stream: str = Field(default="chunks", min_length=1, max_length=200)
    group: str = Field(default="ingest", min_length=1, max_length=200)
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    output_bucket: Bucket
    output_prefix: str = "processed"
    # Where edges upload: manifests naming any other bucket or a key outside this prefix
    # are refused, so a device cannot point the cloud at the output bucket. Reconcile lists it.
    raw_bucket: Bucket
    raw_prefix: str = "raw"
    consumers: int = Field(default=2, ge=1, le=1024)
    visibility_timeout_s: float = Field(default=60.0, gt=0)
    max_deliveries: int = Field(default=5, ge=1, le=1000)
    keyring: Annotated[dict[Ident, KeyEntry], NoDecode] = Field(default_factory=dict)
    keyring_file: Path | None = None
    # Replay tags (reconcile, dlq requeue) are made and checked with this cloud-only key
    # when set (or INGEST_REPLAY_KEY_FILE, or the systemd credential `replay_key`); unset,
    # with the manifest's own device key, which lets that device backdate its own footage.
    replay_key: SecretStr | None = Field(default=None, min_length=16)
    replay_key_file: Path | None = None
    http_bind: str = "127.0.0.1:9109"
    # Bearer token for /readyz and /metrics; set it whenever INGEST_HTTP_BIND is not loopback.
    http_token: SecretStr | None = None
    http_token_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] | None = None
    batch_size: int = Field(default=8, ge=1, le=1000)
    actor_concurrency: int = Field(default=2, ge=1, le=64)
    actor_cpus: float = Field(default=1.0, ge=0)
    drain_timeout_s: float = Field(default=30.0, gt=0)
    # Each stage of an actor's shutdown past the drain timeout (releasing, cancelling,
    # closing) gets this long; the supervisor's deadline adds them up (consumer.drain_stages).
    close_grace_s: float = Field(default=5.0, gt=0)
    # Every Redis read and connect of a consumer is bounded by this (above the 1 s
    # XREADGROUP block): a Redis that went silent without a reset fails the call.
    redis_timeout_s: float = Field(default=10.0, ge=2.0)
    # A paused consumer probes again after a jittered back-off growing up to this.
    pause_max_s: float = Field(default=30.0, gt=0)
    # This many distinct chunks in a row whose raw GET fails with the same S3 error code,
    # while the probe passes, pause the consumer (its access, not theirs: a policy that
    # lets it list but not read, a KMS key it may not use).
    raw_failures_to_pause: int = Field(default=3, ge=1, le=1000)
    max_chunk_bytes: int = Field(default=512 * 1024**2, gt=0)
    # A chunk's media work (decode, filters, preprocess) past this is a failed attempt: its
    # worker process is killed and replaced; after the last attempt, DLQ `process_timeout`.
    process_timeout_s: float = Field(default=300.0, gt=0)
    # The per-chunk lock lives max(this, 2 x INGEST_VISIBILITY_TIMEOUT_S) unless renewed
    # (with the lease, while the work goes on): how long a crashed holder blocks a copy.
    lock_ttl_min_s: float = Field(default=60.0, gt=0)
    # A manifest whose chunk ends more than this in the future, or started longer ago than
    # INGEST_MAX_MANIFEST_AGE_S, is refused as a replay (raise the age to re-ingest archives).
    max_clock_skew_s: float = Field(default=300.0, ge=0)
    max_manifest_age_s: float = Field(default=14 * 86400.0, gt=0)
    # Filters (scores below/above these reject a chunk, with its reason and scores recorded)
    filter_dark_luma: float = Field(default=20.0, ge=0, le=255)
    filter_bright_luma: float = Field(default=235.0, ge=0, le=255)
    filter_blur_var: float = Field(default=15.0, ge=0)
    filter_static_motion: float = Field(default=0.5, ge=0)
    filter_duplicate_bits: int = Field(default=3, ge=0, le=256)  # per 256-bit frame hash
    filter_recent_chunks: int = Field(default=16, ge=0, le=1000)
    allowed_codecs: list[str] = Field(default_factory=lambda: ["h264", "hevc"])
    max_chunk_seconds: float = Field(default=600.0, gt=0)
    max_pixels: int = Field(default=7680 * 4320, gt=0)  # per frame: 8K UHD
    max_fps: float = Field(default=300.0, gt=0)
    # Hand-off of closed scene windows
    # A camera-hour's coverage index entries are merged into its object in S3 this long
    # after the hour first changed (the audit reads the unmerged ones from Redis meanwhile).
    coverage_flush_s: float = Field(default=60.0, ge=0, le=86400)
    window_s: int = Field(default=60, ge=1, le=86400)
    window_timeout_s: float = Field(default=120.0, ge=0)  # after the window's end
    site_cameras: dict[str, list[str]] = Field(default_factory=dict)  # expected views per site
    handoff_sinks: list[Literal["stream", "webhook", "ray_job"]] = Field(default=["stream"])
    handoff_stream: str = "windows.closed"  # downstream stream sink
    # A closed window's hand-off idle this long is tried again, by whichever consumer takes
    # it: its consumer died, its last attempt failed, or a sink was busy. Keep it above the
    # time an MCAP takes to write (else two consumers write the same, identical object).
    handoff_claim_s: float = Field(default=60.0, gt=0)
    # A revision whose hand-off has kept failing this long, whatever the cause (outages
    # and busy sinks included, which INGEST_MAX_DELIVERIES does not count), is
    # dead-lettered `handoff_stalled`.
    handoff_give_up_s: float = Field(default=86400.0, gt=0)
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_secret_file: Path | None = None
    job_address: str = "http://127.0.0.1:8265"  # Ray dashboard (Job Submission API)
    # A template: {bucket} {prefix} (the output bucket and prefix), {window_id} {revision}
    # {revision_id} {mcap_key} {site} {start} {end} {chunk_ids} (comma-separated)
    job_entrypoint: str = (
        "python examples/reconstruct_background.py --bucket {bucket} --prefix {prefix} "
        "--revision-id {revision_id} --mcap-key {mcap_key}"
    )
    # Resources each hand-off job's entrypoint declares (Ray schedules it where they are).
    job_entrypoint_num_cpus: float = Field(default=1.0, ge=0)
    # A finished hand-off job's record (status, logs) stays in Ray's job table this long,
    # then the hand-off deletes it: thousands a day would otherwise pile up on the head.
    job_keep_s: float = Field(default=86400.0, gt=0)
    job_max_concurrent: int = Field(default=4, ge=1)
    # Presigned GET URLs in the webhook's payload (the MCAP, the raw chunks) expire after this.
    webhook_url_expiry_s: int = Field(default=86400, ge=60, le=7 * 86400)
    # Per site and camera: {"site": {"camera": {"width", "height", "K", ...}}} (or _FILE).
    camera_calibration: Annotated[dict[Ident, dict[Ident, Calibration]], NoDecode] = Field(
        default_factory=dict
    )
    camera_calibration_file: Path | None = None
    # Each Job Submission API call (submit, list) is given up after this: a dashboard that
    # accepts and never answers must not wedge the hand-off.
    job_api_timeout_s: float = Field(default=30.0, gt=0)
    # Tests only: park the consumer at a named point once (cloud_ingest.windows.test_hook).
    test_hook: str | None = None
    # Preprocess
    sample_fps: float = Field(default=2.0, gt=0, le=120)
    resize_short_side: int = Field(default=256, ge=16, le=4096)
    jpeg_quality: int = Field(default=4, ge=2, le=31)

    @model_validator(mode="before")
    @classmethod
    def _parse_keyring(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        raw, source = data.get("keyring"), "INGEST_KEYRING"
        if not raw:
            secret = secret_from_file(data, "keyring", "keyring", "INGEST_").get("keyring")
            raw, source = (secret.get_secret_value() if secret else None), "INGEST_KEYRING_FILE"
        if isinstance(raw, str):
            parsed = _json_object(raw, source, '{"key_id": "secret"}')
            entries = {k: {"secret": v} if isinstance(v, str) else v for k, v in parsed.items()}
            data = {**data, "keyring": entries}
        return data

    @model_validator(mode="before")
    @classmethod
    def _parse_calibration(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        raw, source = data.get("camera_calibration"), "INGEST_CAMERA_CALIBRATION"
        path = data.get("camera_calibration_file")
        if not raw and path:
            source = "INGEST_CAMERA_CALIBRATION_FILE"
            try:
                raw = Path(path).read_text()
            except OSError as exc:
                raise ValueError(f"{source}: cannot read {path}: {exc.strerror}") from None
        if isinstance(raw, str):
            parsed = _json_object(raw, source, '{"site": {"camera": {...}}}')
            data = {**data, "camera_calibration": parsed}
        return data

    @model_validator(mode="before")
    @classmethod
    def _read_replay_key(cls, data: Any) -> Any:
        return secret_from_file(data, "replay_key", "replay_key", "INGEST_")

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        data = secret_from_file(data, "http_token", "http_token", "INGEST_")
        return secret_from_file(data, "webhook_secret", "webhook_secret", "INGEST_")

    @model_validator(mode="after")
    def _require_keys(self) -> IngestSettings:
        if not self.keyring:
            raise ValueError("INGEST_KEYRING (or INGEST_KEYRING_FILE) must name at least one key")
        if self.visibility_timeout_s < 1:
            raise ValueError("INGEST_VISIBILITY_TIMEOUT_S: must be at least 1 second")
        return self

    def thresholds(self) -> Thresholds:
        return Thresholds(
            dark_luma=self.filter_dark_luma,
            bright_luma=self.filter_bright_luma,
            blur_var=self.filter_blur_var,
            static_motion=self.filter_static_motion,
            duplicate_bits=self.filter_duplicate_bits,
            max_seconds=self.max_chunk_seconds,
            codecs=tuple(self.allowed_codecs),
            max_pixels=self.max_pixels,
            max_fps=self.max_fps,
        )

    def calibration_for(self, site: str) -> dict[str, Calibration]:
        return dict(self.camera_calibration.get(site, {}))

    def lock_ttl_ms(self) -> int:
        return int(max(self.lock_ttl_min_s, 2 * self.visibility_timeout_s) * 1000)

    def preprocess(self) -> Options:
        return Options(self.sample_fps, self.resize_short_side, self.jpeg_quality)

    def signing_keys(self) -> dict[str, SigningKey]:
        return {k: v.signing_key() for k, v in self.keyring.items()}

    def replay_secret(self) -> bytes | None:
        """The key of replay tags, when a cloud-only one is set (else each manifest's own)."""
        return None if self.replay_key is None else self.replay_key.get_secret_value().encode()
