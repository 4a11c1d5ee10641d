"""Example training job on the ingested frames: a tiny day/night classifier.

Consumes ``cloud_ingest.dataset.frames`` exactly as a Ray Train loop would (streamed
batches of decoded frames), fits a logistic regression on per-channel means with
NumPy, and prints one JSON line with what it saw. Run with ``RAY_ADDRESS`` set to
a cluster, or alone for a local Ray.

    python examples/train_brightness.py --bucket cctv-processed [--site S] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import ray

from cloud_ingest.dataset import frames


def features(images: np.ndarray) -> np.ndarray:
    x = images.reshape(len(images), -1, 3).mean(axis=1) / 255.0
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="processed")
    parser.add_argument("--site")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    ray.init(ignore_reinit_error=True)
    ds = frames(args.bucket, args.prefix, site=args.site)
    w = np.zeros(4)
    seen = loss = 0.0
    for _ in range(args.epochs):
        seen, loss_sum = 0, 0.0
        for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
            x = features(np.asarray(batch["image"]))
            y = (x[:, :3].mean(axis=1) > 0.25).astype(float)  # "day" label from brightness
            p = 1 / (1 + np.exp(-x @ w))
            w -= 0.5 * x.T @ (p - y) / len(y)
            loss_sum += float(-np.sum(y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9)))
            seen += len(y)
        loss = loss_sum / max(1, seen)
    print(json.dumps({"frames": seen, "epochs": args.epochs, "loss": round(loss, 4)}))


if __name__ == "__main__":
    main()
