"""The chunk manifest: model, canonical serialisation, HMAC signing and verification.

On the wire a manifest travels as three stream fields: ``manifest`` (the canonical
JSON bytes), ``key_id`` and ``sig`` (hex HMAC-SHA256 over those exact bytes). The
MAC is checked over the raw bytes before any JSON parsing, so a forged or garbled
entry is refused without ever reaching the parser or the schema.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

SCHEMA_VERSION: Literal[2] = 2  # what this version writes; it reads every one of KNOWN_VERSIONS
KNOWN_VERSIONS = (1, 2)
MAX_MANIFEST_BYTES = 16 * 1024
SIGNATURE_ALG = "HMAC-SHA256"

# Identifiers end up in object keys, Redis keys, file paths and log lines:
# a conservative charset, no separators, bounded length.
Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# An S3 bucket name (the portable subset of the rules); every setting and field naming one.
Bucket = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
HexDigest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ChunkId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


class Rejected(Exception):
    """A manifest or chunk that can never succeed; carries a short machine-readable reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[Rejected], tuple[str, str]]:
        # Pickled by its fields, so the reason survives a trip between processes (a media
        # worker, a Ray actor call); the default would rebuild it from the message alone.
        return (Rejected, (self.reason, self.detail))


# Why the footage before a chunk is missing (contract, schema version 2): the camera's
# stream dropped and came back, the agent restarted, the spool evicted chunks (or had no
# room to write them), the camera could not be reached, its timestamps jumped, or its
# stream parameters changed.
GapCause = Literal[
    "reconnect", "agent_restart", "eviction", "camera_outage", "clock_jump", "parameter_change"
]
GAP_CAUSES: tuple[str, ...] = get_args(GapCause)
V2_FIELDS = frozenset({"gap_cause"})  # what a version 1 manifest cannot carry


class Manifest(BaseModel):
    """One chunk of one camera, as announced by the edge after its upload was confirmed.

    Every known schema version parses into this model; fields a version does not have
    keep their default and are left out of its canonical form, so a version 1 manifest
    round-trips to the very bytes its edge signed."""

    # NaN and Infinity are not JSON, though json.loads accepts them: refuse them here.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    chunk_id: ChunkId
    device_id: Ident
    site_id: Ident
    camera_id: Ident
    seq: int = Field(ge=0)
    bucket: Bucket
    key: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    size_bytes: int = Field(ge=0)
    sha256: HexDigest
    container: Literal["mp4"]
    codec: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
    width: int = Field(ge=0, le=16384)
    height: int = Field(ge=0, le=16384)
    frame_count: int = Field(ge=0)
    keyframe_count: int = Field(ge=0)
    start_time: AwareDatetime
    end_time: AwareDatetime
    media_start_s: float
    media_duration_s: float = Field(ge=0)
    discontinuity: bool
    gap_before_s: float = Field(ge=0)
    agent_version: Annotated[str, StringConstraints(max_length=64)]
    # Wall time minus media time elapsed since the camera connection began (clock drift).
    clock_drift_s: float = 0.0
    # Chunks of this camera dropped from the spool (disk limits) right before this one.
    evicted_before: int = Field(default=0, ge=0)
    # Version 2: why the gap before this chunk is there; set exactly when discontinuity is.
    gap_cause: GapCause | None = None

    @model_validator(mode="after")
    def _cause_matches_version(self) -> Manifest:
        if self.schema_version == 1:
            if self.gap_cause is not None:
                raise ValueError("gap_cause needs schema_version 2")
        elif self.discontinuity != (self.gap_cause is not None):
            raise ValueError("gap_cause is set exactly when discontinuity is true")
        return self


def wall_span(m: Manifest) -> float:
    """Seconds of the camera's timeline the chunk covers, on the edge's wall clock."""
    return max(0.0, (m.end_time - m.start_time).total_seconds())


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: Ident
    alg: Literal["HMAC-SHA256"] = "HMAC-SHA256"
    mac: HexDigest


class SignedManifest(BaseModel):
    """A manifest with its signature: what the edge announces and the cloud verifies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: Manifest
    signature: Signature

    def to_fields(self) -> dict[str, bytes]:
        """The Redis Stream entry for this manifest."""
        return {
            "manifest": canonical_bytes(self.manifest),
            "key_id": self.signature.key_id.encode(),
            "sig": self.signature.mac.encode(),
        }


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A keyring entry: the secret and what it may sign for. A key bound to a device and
    site only authenticates manifests of that device at that site (and, when ``cameras``
    is given, only those cameras), so one compromised box cannot speak for another."""

    secret: bytes = field(repr=False)
    device_id: str | None = None
    site_id: str | None = None
    cameras: frozenset[str] | None = None


Keyring = Mapping[str, SigningKey]


def derive_chunk_id(device_id: str, camera_id: str, seq: int, sha256: str) -> str:
    """Stable id: the same chunk of the same camera always gets the same id."""
    material = "\x00".join((device_id, camera_id, str(seq), sha256)).encode()
    return hashlib.sha256(material).hexdigest()[:32]


def canonical_bytes(manifest: Manifest) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, ASCII only."""
    doc = manifest.model_dump(mode="json")
    if manifest.schema_version == 1:
        for name in V2_FIELDS:
            del doc[name]
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(secret: bytes, payload: bytes) -> str:
    return hmac.new(secret, payload, hashlib.sha256).hexdigest()


def sign(manifest: Manifest, key_id: str, secret: bytes) -> SignedManifest:
    mac = _mac(secret, canonical_bytes(manifest))
    return SignedManifest(manifest=manifest, signature=Signature(key_id=key_id, mac=mac))


def sign_fields(manifest: Manifest, key_id: str, secret: bytes) -> dict[str, bytes]:
    """``sign(...).to_fields()``, serialising the manifest once instead of twice (the
    canonical JSON is most of the cost of announcing a chunk)."""
    payload = canonical_bytes(manifest)
    signature = Signature(key_id=key_id, mac=_mac(secret, payload))  # validates key_id
    return {"manifest": payload, "key_id": signature.key_id.encode(), "sig": signature.mac.encode()}


def _field(fields: Mapping[bytes, bytes], name: str) -> bytes:
    value = fields.get(name.encode())
    if value is None:
        raise Rejected("malformed", f"missing field {name!r}")
    return value


def verify_fields(fields: Mapping[bytes, bytes], keyring: Keyring) -> SignedManifest:
    """Authenticate a stream entry, then parse it and check what its key may claim.

    Order matters: size, then key lookup and MAC over the raw bytes (constant-time
    compare), and only then JSON parsing. Raises Rejected with a distinct reason."""
    payload = _field(fields, "manifest")
    if len(payload) > MAX_MANIFEST_BYTES:
        raise Rejected("oversized", f"{len(payload)} bytes > {MAX_MANIFEST_BYTES}")
    raw_key_id, sig = fields.get(b"key_id"), fields.get(b"sig")
    if not raw_key_id or not sig:
        raise Rejected("unsigned", "the entry carries no key_id or no sig")
    key_id = raw_key_id.decode("ascii", errors="replace")
    key = keyring.get(key_id)
    if key is None:
        raise Rejected("unknown_key", f"key_id {key_id[:64]!r} is not in the keyring")
    if not hmac.compare_digest(_mac(key.secret, payload).encode(), sig):
        raise Rejected("bad_signature", f"HMAC mismatch for key_id {key_id!r}")
    manifest = parse_manifest(payload)
    if canonical_bytes(manifest) != payload:
        raise Rejected("malformed", "manifest is not in canonical form")
    check_binding(manifest, key_id, key)
    expected = derive_chunk_id(
        manifest.device_id, manifest.camera_id, manifest.seq, manifest.sha256
    )
    if manifest.chunk_id != expected:
        raise Rejected("chunk_id_mismatch", f"chunk_id {manifest.chunk_id} is not {expected}")
    return SignedManifest(manifest=manifest, signature=Signature(key_id=key_id, mac=sig.decode()))


# A replayed entry (``cloud-ingest reconcile``, ``dlq requeue``) carries these two fields:
# when it was replayed and an HMAC over that time and the manifest bytes, with the cloud's
# own replay key (INGEST_REPLAY_KEY) when one is set, else with the manifest's own key.
# The consumer accepts a valid tag in place of the start-time age check.
REPLAYED_AT, REPLAY_SIG = b"replayed_at", b"replay_sig"


def replay_mac(secret: bytes, replayed_at: bytes, payload: bytes) -> str:
    return _mac(secret, b"replay\0" + replayed_at + b"\0" + payload)


def _replay_secret(
    fields: Mapping[bytes, bytes], keyring: Keyring, replay_key: bytes | None
) -> bytes | None:
    if replay_key is not None:
        return replay_key
    key = keyring.get(fields.get(b"key_id", b"").decode("ascii", errors="replace"))
    return None if key is None else key.secret


def tag_replay(
    fields: Mapping[bytes, bytes],
    keyring: Keyring,
    now: float,
    replay_key: bytes | None = None,
) -> dict[bytes, bytes]:
    """``fields`` with a fresh replay tag (any earlier one replaced), made with
    ``replay_key`` or, without one, the manifest's own key. Untagged when there is no such
    key (the entry names none of the keyring): it can only be refused again, as it was."""
    out = {k: v for k, v in fields.items() if k not in (REPLAYED_AT, REPLAY_SIG)}
    secret = _replay_secret(out, keyring, replay_key)
    payload = out.get(b"manifest")
    if secret is not None and payload is not None:
        at = str(int(now)).encode()
        out[REPLAYED_AT], out[REPLAY_SIG] = at, replay_mac(secret, at, payload).encode()
    return out


def verify_entry(
    fields: Mapping[bytes, bytes], keyring: Keyring, replay_key: bytes | None = None
) -> tuple[SignedManifest, float | None]:
    """``verify_fields``, then the replay tag if the entry has one: (manifest, replayed_at
    or None). A tag that does not verify (with ``replay_key`` when given, else with the
    manifest's own key) is refused (``bad_replay_tag``)."""
    signed = verify_fields(fields, keyring)
    at, sig = fields.get(REPLAYED_AT), fields.get(REPLAY_SIG)
    if at is None and sig is None:
        return signed, None
    secret = replay_key if replay_key is not None else keyring[signed.signature.key_id].secret
    if not at or not sig:
        raise Rejected("bad_replay_tag", "replayed_at and replay_sig come together")
    expected = replay_mac(secret, at, fields[b"manifest"]).encode()
    if not hmac.compare_digest(expected, sig):
        whose = "the replay key" if replay_key is not None else "the manifest's key"
        raise Rejected("bad_replay_tag", f"replay_sig does not verify with {whose}")
    if not at.isdigit() or len(at) > 12:
        raise Rejected("bad_replay_tag", f"replayed_at {at[:20]!r} is not epoch seconds")
    return signed, float(at)


def check_binding(m: Manifest, key_id: str, key: SigningKey) -> None:
    """A device may only speak for itself, its own site and (if listed) its own cameras."""
    if key.device_id is not None and m.device_id != key.device_id:
        raise Rejected(
            "device_mismatch",
            f"key {key_id!r} belongs to device {key.device_id!r}, manifest claims {m.device_id!r}",
        )
    if key.site_id is not None and m.site_id != key.site_id:
        raise Rejected(
            "site_mismatch",
            f"key {key_id!r} belongs to site {key.site_id!r}, manifest claims {m.site_id!r}",
        )
    if key.cameras is not None and m.camera_id not in key.cameras:
        raise Rejected(
            "camera_not_allowed", f"key {key_id!r} may not sign for camera {m.camera_id!r}"
        )


def parse_manifest(payload: bytes) -> Manifest:
    try:
        doc: Any = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected("malformed", f"not JSON: {exc}") from None
    except RecursionError:  # a signed but absurdly nested document
        raise Rejected("malformed", "JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise Rejected("malformed", "manifest is not a JSON object")
    version = doc.get("schema_version")
    if type(version) is not int or version not in KNOWN_VERSIONS:
        raise Rejected("unsupported_schema", f"schema_version {str(version)[:20]!r}")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        raise Rejected("invalid_schema", _summarise(exc)) from None


def _summarise(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
    return "; ".join(parts)
