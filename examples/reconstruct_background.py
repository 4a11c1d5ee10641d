"""Example reconstruction job for one scene window revision, from its MCAP.

The hand-off passes ``--mcap-key`` (the closed window's ``mcap_key``). The job reads the
file, decodes every view's ``foxglove.CompressedVideo`` channel with PyAV and produces:

- a background plate per camera: the median of the frames sampled over the window
  (moving objects removed), written as ``.npy`` to the output bucket under
  ``{prefix}/reconstructions/{revision_id}/``;
- a cross-view time-alignment check: per camera the span its frames cover, the common
  span of all views, how far apart the views start, and each edge's clock drift.

Prints one JSON line.

    python examples/reconstruct_background.py --bucket B --prefix P \
        --revision-id W-r1 --mcap-key KEY [--samples 16]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import tempfile
from contextlib import AsyncExitStack
from typing import Any

import av
import numpy as np
from mcap.reader import make_reader
from mcap_protobuf.decoder import DecoderFactory

from shared.s3 import open_s3

CODECS = {"h264": "h264", "h265": "hevc"}


async def download(bucket: str, key: str, path: str) -> None:
    async with AsyncExitStack() as stack:
        s3 = await open_s3(stack, os.environ.get("INGEST_S3_ENDPOINT_URL"), "us-east-1")
        resp = await s3.get_object(Bucket=bucket, Key=key)
        with open(path, "wb") as out:  # noqa: ASYNC230 (a one-shot job, nothing else runs)
            async with resp["Body"] as body:
                while piece := await body.read(1 << 20):
                    out.write(piece)


async def upload(bucket: str, items: dict[str, bytes]) -> None:
    async with AsyncExitStack() as stack:
        s3 = await open_s3(stack, os.environ.get("INGEST_S3_ENDPOINT_URL"), "us-east-1")
        for key, body in items.items():
            await s3.put_object(Bucket=bucket, Key=key, Body=body)


def decode_views(path: str, samples: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Per camera: decoded frame count, first and last frame time, sampled images."""
    views: dict[str, Any] = {}
    decoders: dict[str, Any] = {}
    with open(path, "rb") as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        metadata = next((m.metadata for m in reader.iter_metadata() if m.name == "window"), {})
        for _, channel, message, video in reader.iter_decoded_messages(log_time_order=True):
            if not channel.topic.endswith("/video"):
                continue
            camera = channel.topic.split("/")[1]
            if camera not in decoders:
                decoders[camera] = av.CodecContext.create(CODECS[video.format], "r")
                views[camera] = {"frames": 0, "first_ns": message.log_time, "images": []}
            view = views[camera]
            for frame in decoders[camera].decode(av.Packet(video.data)):
                view["frames"] += 1
                view["last_ns"] = message.log_time
                if view["frames"] % max(1, samples) == 1 or samples == 1:
                    view["images"].append(frame.to_ndarray(format="rgb24"))
    for camera, ctx in decoders.items():
        views[camera]["frames"] += len(ctx.decode(None))
    return views, dict(metadata)


def alignment(views: dict[str, Any], metadata: dict[str, str]) -> dict[str, Any]:
    starts = {c: v["first_ns"] / 1e9 for c, v in views.items()}
    ends = {c: v.get("last_ns", v["first_ns"]) / 1e9 for c, v in views.items()}
    common = (max(starts.values()), min(ends.values())) if views else (0.0, 0.0)
    cameras = {c["camera_id"]: c for c in json.loads(metadata.get("cameras", "[]"))}
    return {
        "span_s": {c: [round(starts[c], 3), round(ends[c], 3)] for c in sorted(views)},
        "common_s": round(max(0.0, common[1] - common[0]), 3),
        "start_spread_s": round(max(starts.values()) - min(starts.values()), 3) if views else 0,
        "clock_drift_s": {c: cameras.get(c, {}).get("clock_drift_s") for c in sorted(views)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="processed")
    parser.add_argument("--revision-id", required=True)
    parser.add_argument("--mcap-key", required=True)
    parser.add_argument("--samples", type=int, default=8, help="use every Nth frame")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "window.mcap")
        asyncio.run(download(args.bucket, args.mcap_key, path))
        views, metadata = decode_views(path, args.samples)
    outputs = {}
    for camera, view in views.items():
        plate = np.median(np.stack(view["images"]), axis=0).astype(np.uint8)
        buf = io.BytesIO()
        np.save(buf, plate)
        key = f"{args.prefix}/reconstructions/{args.revision_id}/{camera}.npy"
        outputs[key] = buf.getvalue()
    asyncio.run(upload(args.bucket, outputs))
    print(
        json.dumps(
            {
                "revision_id": args.revision_id,
                "window_id": metadata.get("window_id"),
                "cameras": sorted(views),
                "frames": {c: v["frames"] for c, v in sorted(views.items())},
                "alignment": alignment(views, metadata),
                "outputs": sorted(outputs),
            }
        )
    )


if __name__ == "__main__":
    main()
