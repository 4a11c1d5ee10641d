from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.keys import chunk_key, dlq_stream, record_key
from tests.test_manifest import make_manifest


def test_keys_chunk_key_has_site_camera_date_and_seq() -> None:
    start = datetime(2026, 11, 22, 4, 5, 6, 789000, tzinfo=UTC)
    key = chunk_key("raw/", "site-1", "cam1", start, 42)
    assert key == "raw/site-1/cam1/2026/11/22/04/20261122T040506.789000Z-0000000042.mp4"


def test_keys_chunk_keys_sort_by_time() -> None:
    start = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    keys = [chunk_key("raw", "s", "c", start + timedelta(seconds=i), i) for i in range(5)]
    assert keys == sorted(keys)


def test_keys_record_key_is_deterministic_per_chunk() -> None:
    m = make_manifest()
    assert record_key("processed", m) == record_key("processed", m)
    assert record_key("processed", m).endswith(f"/{m.chunk_id}.json")
    assert record_key("", m) == f"records/{m.chunk_id[:2]}/{m.chunk_id}.json"
    moved = m.model_copy(update={"start_time": m.start_time.replace(year=2020), "site_id": "x"})
    assert record_key("p", moved) == record_key("p", m)  # a replay finds the original


def test_keys_dlq_name_is_the_contract_name() -> None:
    assert dlq_stream("chunks") == "chunks:dlq"
