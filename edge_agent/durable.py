"""Durable files: what is on disk after a power loss is what we said was written.

A chunk file is fsync'd (and hashed in the same pass over the page cache) before the
ledger records it; a rename or a new file is made durable by fsync of its directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_and_hash(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb+") as fh:
        os.fsync(fh.fileno())
        fh.seek(0)
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
