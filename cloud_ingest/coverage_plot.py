"""The coverage audit as a picture: one row per camera, coloured by interval kind, each
gap wide enough to hold a label named by its cause. Imported only when asked for
(matplotlib is a heavy import the consumers never need)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never a display

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

COLOURS = {
    "accepted": "#2e7d32",
    "rejected": "#f9a825",
    "pending": "#90caf9",
    "dead_lettered": "#6a1b9a",
    "gap": "#ef6c00",
    "unexplained": "#c62828",
}


def _t(text: str) -> float:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return float(mdates.date2num(when))  # type: ignore[no-untyped-call]


def plot(doc: dict[str, Any], path: Path) -> None:
    cameras = doc["cameras"]
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * max(1, len(cameras))), dpi=100)
    start, end = _t(doc["since"]), _t(doc["until"])
    span = max(end - start, 1e-9)
    for row, cam in enumerate(cameras):
        for i in cam["intervals"]:
            a, b = _t(i["start"]), _t(i["end"])
            ax.broken_barh([(a, b - a)], (row - 0.4, 0.8), color=COLOURS[i["kind"]], lw=0)
            label = i["cause"] or i["reason"]
            if i["kind"] in ("gap", "unexplained", "dead_lettered") and (b - a) / span > 0.04:
                ax.text(
                    (a + b) / 2,
                    row,
                    label or i["kind"],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
    ax.set_yticks(range(len(cameras)))
    ax.set_yticklabels([f"{c['camera_id']} ({c['ratio']:.2%})" for c in cameras])
    ax.set_ylim(-0.6, len(cameras) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(start, end)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
    ax.set_xlabel("UTC")
    ax.set_title(f"coverage of site {doc['site_id']}: {doc['since']} .. {doc['until']}")
    ax.legend(
        handles=[Patch(color=c, label=k.replace("_", " ")) for k, c in COLOURS.items()],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
        ncol=len(COLOURS),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
