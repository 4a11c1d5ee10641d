"""Properties of the manifest and its signature, over random valid manifests and random
hostile stream entries (hypothesis). Written against shared/manifest.py with the keyring
of ``SigningKey`` entries (secret plus optional device/site/camera binding)."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.manifest import (
    GAP_CAUSES,
    MAX_MANIFEST_BYTES,
    Manifest,
    Rejected,
    SigningKey,
    canonical_bytes,
    derive_chunk_id,
    parse_manifest,
    sign,
    verify_fields,
)

SECRET = b"k1-secret-0123456789"
KEYRING = {
    "k1": SigningKey(secret=SECRET),
    "k2": SigningKey(secret=b"k2-secret-0123456789"),
}
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Reasons verify_fields gives for an entry it refuses; anything else is a new behaviour.
REASONS = {
    "malformed",
    "oversized",
    "unsigned",
    "unknown_key",
    "bad_signature",
    "unsupported_schema",
    "invalid_schema",
    "chunk_id_mismatch",
    "device_mismatch",
    "site_mismatch",
    "camera_not_allowed",
}

idents = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
counts = st.integers(0, 2**63)
finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9000, 1, 1), timezones=offsets | st.just(UTC)
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    """Any manifest the schema accepts, with the chunk id verification derives."""
    device, camera, seq, sha = draw(idents), draw(idents), draw(counts), draw(hex64)
    version, discontinuity = draw(st.sampled_from([1, 2])), draw(st.booleans())
    cause = draw(st.sampled_from(GAP_CAUSES)) if version == 2 and discontinuity else None
    return Manifest(
        schema_version=version,
        chunk_id=derive_chunk_id(device, camera, seq, sha),
        device_id=device,
        site_id=draw(idents),
        camera_id=camera,
        seq=seq,
        bucket=draw(st.from_regex(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", fullmatch=True)),
        key=draw(st.text(min_size=1, max_size=1024)),
        size_bytes=draw(counts),
        sha256=sha,
        container="mp4",
        codec=draw(st.from_regex(r"[a-z0-9_]{1,32}", fullmatch=True)),
        width=draw(st.integers(0, 16384)),
        height=draw(st.integers(0, 16384)),
        frame_count=draw(counts),
        keyframe_count=draw(counts),
        start_time=draw(aware),
        end_time=draw(aware),
        media_start_s=draw(finite),
        media_duration_s=draw(non_negative),
        discontinuity=discontinuity,
        gap_before_s=draw(non_negative),
        agent_version=draw(st.text(max_size=64)),
        clock_drift_s=draw(finite),
        evicted_before=draw(counts),
        gap_cause=cause,
    )


def entry(m: Manifest, key_id: str = "k1", secret: bytes = SECRET) -> dict[bytes, bytes]:
    """The stream entry the edge publishes (Redis hands back bytes keys)."""
    return {k.encode(): v for k, v in sign(m, key_id, secret).to_fields().items()}


def signed_entry(payload: bytes) -> dict[bytes, bytes]:
    """Any bytes, correctly signed with a known key: they reach the parser."""
    mac = hmac.new(SECRET, payload, hashlib.sha256).hexdigest().encode()
    return {b"manifest": payload, b"key_id": b"k1", b"sig": mac}


def refused(fields: dict[bytes, bytes], keyring: Any = KEYRING) -> str:
    """The reason verify_fields refuses ``fields`` with (any other exception propagates)."""
    with pytest.raises(Rejected) as info:
        verify_fields(fields, keyring)
    assert info.value.reason in REASONS, info.value
    return info.value.reason


@SETTINGS
@given(m=manifests())
def test_canonical_bytes_round_trip_through_parse_manifest(m: Manifest) -> None:
    raw = canonical_bytes(m)
    back = parse_manifest(raw)
    assert back == m
    assert canonical_bytes(back) == raw


@SETTINGS
@given(m=manifests(), order=st.randoms(use_true_random=False))
def test_canonical_bytes_are_deterministic_sorted_compact_ascii(m: Manifest, order: Any) -> None:
    """The same manifest however it was built (fields in any order): the same bytes; keys
    sorted, no whitespace between tokens, nothing outside ASCII."""
    doc = m.model_dump()
    keys = list(doc)
    order.shuffle(keys)
    rebuilt = Manifest.model_validate({k: doc[k] for k in keys})
    raw = canonical_bytes(m)
    assert canonical_bytes(rebuilt) == raw == canonical_bytes(m)
    assert raw.isascii()
    assert list(json.loads(raw)) == sorted(json.loads(raw))
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()


@SETTINGS
@given(m=manifests())
def test_sign_to_fields_verify_fields_accepts(m: Manifest) -> None:
    """Signed with a known key (unbound, or bound to exactly this device, site, camera)."""
    verified = verify_fields(entry(m), KEYRING)
    assert verified.manifest == m
    assert verified.signature == sign(m, "k1", SECRET).signature
    bound = {"kb": SigningKey(SECRET, m.device_id, m.site_id, frozenset({m.camera_id}))}
    assert verify_fields(entry(m, "kb"), bound).manifest == m


@SETTINGS
@given(m=manifests(), where=st.sampled_from(["manifest", "sig"]), at=st.integers(0), x=st.data())
def test_any_single_byte_changed_is_refused(
    m: Manifest, where: str, at: int, x: st.DataObject
) -> None:
    """Any one byte of the payload or of the signature, changed to any other value."""
    fields = entry(m)
    raw = bytearray(fields[where.encode()])
    i = at % len(raw)
    raw[i] = x.draw(st.integers(0, 255).filter(lambda b: b != raw[i]))
    fields[where.encode()] = bytes(raw)
    assert refused(fields) == "bad_signature"


@SETTINGS
@given(m=manifests(), key_id=st.binary(max_size=80))
def test_another_key_id_is_refused(m: Manifest, key_id: bytes) -> None:
    """The signature kept, the key id changed to anything else: another known key, an
    unknown one, non-ASCII bytes, nothing."""
    fields = entry(m)
    if key_id == fields[b"key_id"]:
        key_id = b"k2"
    fields[b"key_id"] = key_id
    expected = {b"": "unsigned", b"k2": "bad_signature"}.get(key_id, "unknown_key")
    assert refused(fields) == expected


@SETTINGS
@given(m=manifests(), chunk_id=st.text("0123456789abcdef", min_size=32, max_size=32))
def test_a_chunk_id_not_derived_from_its_fields_is_refused(m: Manifest, chunk_id: str) -> None:
    forged = m.model_copy(update={"chunk_id": chunk_id})
    if chunk_id == m.chunk_id:
        assert verify_fields(entry(forged), KEYRING).manifest == m
    else:
        assert refused(entry(forged)) == "chunk_id_mismatch"


@SETTINGS
@given(m=manifests(), which=st.sampled_from(["device", "site", "camera"]), data=st.data())
def test_a_bound_key_refuses_another_device_site_or_camera(
    m: Manifest, which: str, data: st.DataObject
) -> None:
    binding = {"device": m.device_id, "site": m.site_id, "camera": m.camera_id}
    binding[which] = data.draw(idents.filter(lambda s: s != binding[which]), label="other")
    key = SigningKey(SECRET, binding["device"], binding["site"], frozenset({binding["camera"]}))
    expected = {"device": "device_mismatch", "site": "site_mismatch"}
    assert refused(entry(m, "kb"), {"kb": key}) == expected.get(which, "camera_not_allowed")


@SETTINGS
@given(payload=st.binary(max_size=2048), signed=st.booleans())
def test_arbitrary_bytes_as_the_manifest_raise_only_rejected(payload: bytes, signed: bool) -> None:
    """Signed with a known key they reach the JSON parser and the schema; unsigned, the MAC."""
    fields = signed_entry(payload) if signed else {**signed_entry(payload), b"sig": b"0" * 64}
    reason = refused(fields)
    if not signed:
        assert reason == "bad_signature"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@SETTINGS
@given(doc=st.dictionaries(st.text(), json_values, max_size=8))
def test_arbitrary_json_objects_as_the_manifest_raise_only_rejected(doc: dict[str, Any]) -> None:
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    refused(signed_entry(payload))


@SETTINGS
@given(m=manifests(), field=st.sampled_from(sorted(Manifest.model_fields)), value=json_values)
def test_a_manifest_with_one_field_replaced_by_any_json_raises_only_rejected(
    m: Manifest, field: str, value: Any
) -> None:
    """Near misses reach deeper than random objects: every field but one is valid. Either
    the result still verifies (the value happens to be valid and canonical) or Rejected."""
    doc = json.loads(canonical_bytes(m))
    doc[field] = value
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    try:
        verified = verify_fields(signed_entry(payload), KEYRING)
    except Rejected as exc:
        assert exc.reason in REASONS, exc
    else:
        assert canonical_bytes(verified.manifest) == payload


@SETTINGS
@given(extra=st.integers(1, 4096), body=st.sampled_from([b"{", b" ", b"\xff"]))
def test_oversized_payloads_are_refused_before_key_lookup_or_parsing(
    extra: int, body: bytes
) -> None:
    """Over MAX_MANIFEST_BYTES: "oversized" even correctly signed with a known key (so not
    the MAC), even with an empty keyring (so not the key), even when it is not JSON (so not
    the parser). At exactly the limit the next check speaks instead."""
    payload = body * (MAX_MANIFEST_BYTES + extra)
    assert refused(signed_entry(payload)) == "oversized"
    assert refused(signed_entry(payload), {}) == "oversized"
    at_limit = signed_entry(body * MAX_MANIFEST_BYTES)
    assert refused(at_limit, {}) == "unknown_key"
    assert refused(at_limit) == "malformed"


def test_deeply_nested_json_as_the_manifest_is_malformed() -> None:
    """10,000 nested arrays (under MAX_MANIFEST_BYTES), correctly signed: json.loads gives
    up with RecursionError, which must become a rejection, not a crash."""
    assert refused(signed_entry(b"[" * 10_000)) == "malformed"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_an_invalid_schema(literal: bytes) -> None:
    """json.loads accepts NaN and Infinity although JSON has neither; the model refuses them."""
    doc = sample().model_dump(mode="json")
    doc["media_start_s"] = "@"
    payload = json.dumps(doc).replace('"@"', literal.decode()).encode()
    assert refused(signed_entry(payload)) == "invalid_schema"


def test_refused_helper_fails_on_an_accepted_entry() -> None:
    """The helper every property leans on can fail: an entry that verifies is not refused."""
    with pytest.raises(pytest.fail.Exception):
        refused(entry(sample()))


def sample() -> Manifest:
    sha = "ab" * 32
    start = datetime(2026, 11, 22, 4, tzinfo=UTC)
    return Manifest(
        chunk_id=derive_chunk_id("dev-1", "cam1", 0, sha),
        device_id="dev-1",
        site_id="site-1",
        camera_id="cam1",
        seq=0,
        bucket="raw-bucket",
        key="k.mp4",
        size_bytes=1,
        sha256=sha,
        container="mp4",
        codec="h264",
        width=320,
        height=240,
        frame_count=30,
        keyframe_count=2,
        start_time=start,
        end_time=start + timedelta(seconds=2),
        media_start_s=0.0,
        media_duration_s=2.0,
        discontinuity=False,
        gap_before_s=0.0,
        agent_version="t",
    )
