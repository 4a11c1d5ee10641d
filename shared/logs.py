"""structlog set-up: JSON lines off a TTY, a console renderer on one.

Called only from entry points (CLI mains, actor constructors), never at import.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["json", "console"]
MASK = "*****"
# user:password@ in any URL (camera, Redis, webhook); the user name stays for debugging.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*):[^@\s]+@")
_URL_MASKED = rf"\1:{MASK}@"
_SENSITIVE_KEYS = re.compile(r"(?i)(secret|password|passwd|token|authorization|credential)")
# Secrets from the environment that the AWS chain reads; never ours to print.
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Values with nothing to scrub inside; checked by exact type (a str subclass is scrubbed).
_PLAIN = frozenset({int, float, bool, type(None)})


@functools.lru_cache(maxsize=4096)
def _sensitive_key(key: str) -> bool:
    """Event keys are a small, fixed vocabulary: match each one once, not once per line."""
    return _SENSITIVE_KEYS.search(key) is not None


class Redactor:
    """A structlog processor: masks known secret values anywhere in an event (messages,
    exception text, nested values), passwords in URLs, and values under sensitive keys.
    The last line of defence: code should not log secrets in the first place.

    It runs on every log line (one per chunk on each side), so the common case, a string
    with no secret and no URL, costs a few substring checks and no regex."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        known = {*secrets, *(os.environ.get(name, "") for name in _ENV_SECRETS)}
        # Longest first, so a secret containing another is masked whole; tiny values would
        # mask ordinary text and are not secrets worth the name.
        self.secrets = sorted((s for s in known if len(s) >= 6), key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        # The pattern needs both "://" and "@": without them it cannot match.
        if "@" in text and "://" in text:
            return _URL_PASSWORD.sub(_URL_MASKED, text)
        return text

    def walk(self, value: Any) -> Any:
        if type(value) in _PLAIN:
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {
                k: MASK if isinstance(k, str) and _sensitive_key(k) and v else self.walk(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.walk(v) for v in value]
        return value

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        # walk() builds a new dict: no need to copy a dict first.
        scrubbed: dict[str, Any] = self.walk(event if isinstance(event, dict) else dict(event))
        return scrubbed


def configure(
    level: str = "INFO",
    fmt: LogFormat | None = None,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """``stream``: stdout for the daemons (journald), stderr for a command whose answer
    is its stdout (``cloud-ingest coverage --json``)."""
    out = sys.stdout if stream is None else stream
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            Redactor(secrets),  # after exceptions are rendered to text, before output
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)


def chunk_line(emit: Any, outcome: str, m: Any, /, **figures: Any) -> None:
    """The canonical per-chunk line (``"event": "chunk"``), one shape on both sides: the
    outcome, which chunk (camera, seq, id, bytes), then what the stage measured of it.
    ``emit`` is a logger's method for the level (``log.info``); ``m`` the ``Manifest``."""
    emit(
        "chunk",
        outcome=outcome,
        camera_id=m.camera_id,
        seq=m.seq,
        chunk_id=m.chunk_id,
        bytes=m.size_bytes,
        **figures,
    )
