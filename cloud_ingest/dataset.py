"""Training data from the shards: a lazy, streaming ``ray.data.Dataset`` of decoded frames.

    from cloud_ingest.dataset import frames
    ds = frames("cctv-processed", site="depot-north")      # nothing is read yet
    for batch in ds.iter_batches(batch_size=64):          # streamed, shard by shard
        images = batch["image"]                           # HxWx3 uint8 arrays

S3 access uses the standard AWS chain; ``endpoint_url`` (or ``INGEST_S3_ENDPOINT_URL``)
points at an S3-compatible store.
"""

from __future__ import annotations

import io
import os
from typing import Any
from urllib.parse import urlparse

import av
import numpy as np
import pyarrow.fs as pafs
import ray.data

METADATA = [
    "camera_id",
    "site_id",
    "chunk_id",
    "frame_index",
    "pts_s",
    "utc_time",
    "width",
    "height",
    "scores",
]


def _filesystem(endpoint_url: str | None, region: str) -> Any:
    if not endpoint_url:
        return pafs.S3FileSystem(region=region)
    parsed = urlparse(endpoint_url)
    return pafs.S3FileSystem(
        endpoint_override=parsed.netloc, scheme=parsed.scheme or "https", region=region
    )


def shard_path(bucket: str, prefix: str, site: str | None, camera: str | None) -> str:
    parts = [bucket, prefix.strip("/"), "shards"] if prefix.strip("/") else [bucket, "shards"]
    if site:
        parts.append(site)
        if camera:
            parts.append(camera)
    return "/".join(parts) + "/"


def decode_jpegs(batch: dict[str, Any]) -> dict[str, Any]:
    """JPEG bytes to RGB arrays (runs in Ray Data workers, batch by batch)."""
    images = []
    img: Any
    for jpeg in batch["jpeg"]:
        with av.open(io.BytesIO(bytes(jpeg))) as img:
            frame = next(img.decode(video=0))
            images.append(frame.to_ndarray(format="rgb24"))
    out = {k: batch[k] for k in METADATA if k in batch}
    out["image"] = np.stack(images) if len({i.shape for i in images}) == 1 else images
    return out


def frames(
    bucket: str,
    prefix: str = "processed",
    *,
    site: str | None = None,
    camera: str | None = None,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    batch_size: int = 64,
) -> ray.data.Dataset:
    endpoint = endpoint_url or os.environ.get("INGEST_S3_ENDPOINT_URL")
    ds = ray.data.read_parquet(
        shard_path(bucket, prefix, site, camera), filesystem=_filesystem(endpoint, region)
    )
    return ds.map_batches(decode_jpegs, batch_size=batch_size, batch_format="numpy")
