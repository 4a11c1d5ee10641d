"""Example reconstruction job for a scene window: a per-camera background plate.

Takes the chunks of one window (as a hand-off would pass them), loads their frames
through ``cloud_ingest.dataset.frames``, computes each camera's median image (the
static scene, moving objects removed) and writes them as ``.npy`` to the output
bucket under ``{prefix}/reconstructions/{window_id}/``. Prints one JSON line.

    python examples/reconstruct_background.py --bucket B --site S --window-id W \
        --chunk-id ID [--chunk-id ID ...]      (or --chunk-id=ID1,ID2,...)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
from contextlib import AsyncExitStack

import numpy as np
import ray

from cloud_ingest.dataset import frames
from shared.s3 import open_s3


async def upload(bucket: str, items: dict[str, bytes]) -> None:
    async with AsyncExitStack() as stack:
        s3 = await open_s3(stack, os.environ.get("INGEST_S3_ENDPOINT_URL"), "us-east-1")
        for key, body in items.items():
            await s3.put_object(Bucket=bucket, Key=key, Body=body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="processed")
    parser.add_argument("--site", required=True)
    parser.add_argument("--window-id", required=True)
    parser.add_argument("--chunk-id", action="append", required=True)
    args = parser.parse_args()
    ray.init(ignore_reinit_error=True)
    wanted = {c for arg in args.chunk_id for c in arg.split(",") if c}  # repeated or a,b,c
    ds = frames(args.bucket, args.prefix, site=args.site).filter(
        lambda row: row["chunk_id"] in wanted
    )
    per_camera: dict[str, list[np.ndarray]] = {}
    for row in ds.iter_rows():
        per_camera.setdefault(str(row["camera_id"]), []).append(np.asarray(row["image"]))
    outputs = {}
    for camera, images in per_camera.items():
        plate = np.median(np.stack(images), axis=0).astype(np.uint8)
        buf = io.BytesIO()
        np.save(buf, plate)
        outputs[f"{args.prefix}/reconstructions/{args.window_id}/{camera}.npy"] = buf.getvalue()
    asyncio.run(upload(args.bucket, outputs))
    print(
        json.dumps(
            {
                "window_id": args.window_id,
                "cameras": sorted(per_camera),
                "frames": sum(len(v) for v in per_camera.values()),
                "outputs": sorted(outputs),
            }
        )
    )


if __name__ == "__main__":
    main()
