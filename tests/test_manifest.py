from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from shared.manifest import (
    Manifest,
    Rejected,
    SigningKey,
    canonical_bytes,
    derive_chunk_id,
    sign,
    verify_fields,
)

SECRETS = {"k1": b"secret-one", "k2": b"secret-two"}
KEYRING = {k: SigningKey(secret=v) for k, v in SECRETS.items()}


def make_manifest(**overrides: object) -> Manifest:
    start = datetime(2026, 11, 22, 4, 0, 0, tzinfo=UTC)
    sha = "ab" * 32
    doc: dict[str, object] = {
        "chunk_id": derive_chunk_id("dev-1", "cam1", 7, sha),
        "device_id": "dev-1",
        "site_id": "site-1",
        "camera_id": "cam1",
        "seq": 7,
        "bucket": "raw-bucket",
        "key": "raw/site-1/cam1/2026/11/22/04/x-0000000007.mp4",
        "size_bytes": 1234,
        "sha256": sha,
        "container": "mp4",
        "codec": "h264",
        "width": 320,
        "height": 240,
        "frame_count": 30,
        "keyframe_count": 2,
        "start_time": start,
        "end_time": start + timedelta(seconds=2),
        "media_start_s": 14.0,
        "media_duration_s": 2.0,
        "discontinuity": False,
        "gap_before_s": 0.0,
        "agent_version": "0.1.0",
    }
    doc.update(overrides)
    return Manifest.model_validate(doc)


def test_manifest_sign_verify_roundtrip() -> None:
    m = make_manifest()
    signed = sign(m, "k1", SECRETS["k1"])
    fields = {k.encode(): v for k, v in signed.to_fields().items()}
    assert verify_fields(fields, KEYRING).manifest == m


def test_manifest_canonical_bytes_are_sorted_compact_and_stable() -> None:
    m = make_manifest()
    raw = canonical_bytes(m)
    doc = json.loads(raw)
    assert list(doc) == sorted(doc)
    assert b" " not in raw
    assert canonical_bytes(Manifest.model_validate_json(raw)) == raw


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda f: f.update({b"manifest": f[b"manifest"].replace(b'"seq":7', b'"seq":8')}),
            "bad_signature",
        ),
        (lambda f: f.update({b"sig": b"0" * 64}), "bad_signature"),
        (lambda f: f.update({b"key_id": b"nobody"}), "unknown_key"),
        (lambda f: f.pop(b"sig"), "unsigned"),
        (lambda f: f.pop(b"key_id"), "unsigned"),
        (lambda f: f.update({b"sig": b""}), "unsigned"),
        (lambda f: f.update({b"manifest": b"x" * 20000}), "oversized"),
    ],
)
def test_manifest_verify_rejects_tampering(mutate: object, reason: str) -> None:
    signed = sign(make_manifest(), "k1", SECRETS["k1"])
    fields = {k.encode(): v for k, v in signed.to_fields().items()}
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(Rejected) as info:
        verify_fields(fields, KEYRING)
    assert info.value.reason == reason


def test_manifest_verify_rejects_signed_garbage_with_schema_reason() -> None:
    import hashlib
    import hmac

    payload = b'{"schema_version":1,"camera_id":"../../etc"}'
    mac = hmac.new(SECRETS["k1"], payload, hashlib.sha256).hexdigest().encode()
    with pytest.raises(Rejected) as info:
        verify_fields({b"manifest": payload, b"key_id": b"k1", b"sig": mac}, KEYRING)
    assert info.value.reason == "invalid_schema"


@pytest.mark.parametrize("bad", ["../cam", "cam/1", "", "a" * 65, "cam 1"])
def test_manifest_identifiers_cannot_escape(bad: str) -> None:
    with pytest.raises(ValidationError):
        make_manifest(camera_id=bad)


def test_manifest_chunk_id_is_deterministic_and_content_bound() -> None:
    a = derive_chunk_id("dev-1", "cam1", 1, "aa" * 32)
    assert a == derive_chunk_id("dev-1", "cam1", 1, "aa" * 32)
    assert a != derive_chunk_id("dev-1", "cam1", 1, "bb" * 32)
    assert a != derive_chunk_id("dev-1", "cam1", 2, "aa" * 32)


def _signed_doc(doc: dict[str, object]) -> dict[bytes, bytes]:
    import hashlib
    import hmac

    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    mac = hmac.new(SECRETS["k1"], payload, hashlib.sha256).hexdigest()
    return {b"manifest": payload, b"key_id": b"k1", b"sig": mac.encode()}


def test_manifest_every_known_version_verifies_and_an_unknown_one_has_its_own_reason() -> None:
    """The cloud is upgraded before the fleet: a version 1 manifest (no gap_cause, as an
    old agent signs it) verifies byte for byte; version 2 carries the cause; version 3,
    or a version that is not an integer, is refused as unsupported, not as invalid."""
    v1 = make_manifest(schema_version=1, discontinuity=True, gap_before_s=2.0)
    assert b"gap_cause" not in canonical_bytes(v1)
    old = json.loads(canonical_bytes(v1))
    assert verify_fields(_signed_doc(old), KEYRING).manifest == v1
    v2 = make_manifest(discontinuity=True, gap_before_s=2.0, gap_cause="agent_restart")
    assert json.loads(canonical_bytes(v2))["gap_cause"] == "agent_restart"
    assert verify_fields(_signed_doc(json.loads(canonical_bytes(v2))), KEYRING).manifest == v2
    for version in (3, 0, "2", True, None):
        with pytest.raises(Rejected) as exc:
            verify_fields(_signed_doc({**old, "schema_version": version}), KEYRING)
        assert exc.value.reason == "unsupported_schema", version
    with pytest.raises(Rejected) as exc:  # a version 1 manifest cannot name a cause
        verify_fields(_signed_doc({**old, "gap_cause": "reconnect"}), KEYRING)
    assert exc.value.reason == "invalid_schema"


@pytest.mark.parametrize(
    ("discontinuity", "cause"), [(True, None), (False, "reconnect"), (True, "meteor")]
)
def test_manifest_v2_names_a_known_cause_exactly_when_it_declares_a_gap(
    discontinuity: bool, cause: str | None
) -> None:
    with pytest.raises(ValidationError):
        make_manifest(discontinuity=discontinuity, gap_before_s=1.0, gap_cause=cause)
