"""The structlog redaction processor, through the real logging pipeline."""

from __future__ import annotations

import json

import pytest

from shared import logs


def test_redaction_masks_secrets_in_messages_nested_values_and_tracebacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("INFO", "json", secrets=["the-signing-secret"])
    log = logs.get("t")
    try:
        raise RuntimeError("auth failed with the-signing-secret")
    except RuntimeError:
        log.exception(
            "boom",
            url="rtsp://admin:camera-pw@10.0.0.5/live",
            nested={"hosts": ["redis://:redis-pw@db:6379/0"], "api_token": "abc123"},
        )
    out = capsys.readouterr().out
    line = json.loads(out)
    for secret in ("the-signing-secret", "camera-pw", "redis-pw", "abc123"):
        assert secret not in out
    assert line["url"] == "rtsp://admin:*****@10.0.0.5/live"
    assert line["nested"]["hosts"] == ["redis://:*****@db:6379/0"]
    assert line["nested"]["api_token"] == "*****"
    assert "RuntimeError: auth failed with *****" in line["exception"]
