"""The Markdown table and the PNG plots of a benchmark run.

A figure's ``series`` maps a plot title to
``{"xlabel": str, "ylabel": str, "lines": {label: [[x, y], ...]}}``; each becomes a
panel beside the bar chart of the benchmark's ratios.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import Figure


def table(
    figures: list[Figure], timings: dict[str, float], failures: dict[str, str], quick: bool
) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Medians of repeated runs; every ratio is ours / the baseline measured in the same run",
        "on the same input." + (" **Quick smoke run: not for quoting.**" if quick else ""),
        "",
        "| benchmark | metric | ours | baseline | ratio | target | met | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        base = "" if f.baseline is None else f"{f.baseline:.4g}"
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        met = {True: "yes", False: "**no**", None: "n/a"}[f.met]
        lines.append(
            f"| {f.bench} | {f.metric} | {f.ours:.4g} {f.unit} | {base} | {ratio} | {f.target}"
            f" | {met} | {f.note} |"
        )
    lines += ["", "| benchmark | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.0f} |" for name, sec in timings.items()]
    for name, error in failures.items():
        lines += ["", f"**{name} failed**: `{error}`"]
    return "\n".join(lines) + "\n"


def plot(name: str, figures: list[Figure], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, dict[str, Any]]] = [
        (title, spec) for f in figures for title, spec in f.series.items()
    ]
    ratios = [f for f in figures if f.ratio is not None]
    count = len(panels) + (1 if ratios else 0)
    if count == 0:
        return
    fig, axes = plt.subplots(1, count, figsize=(6 * count, 4.5), squeeze=False)
    row = list(axes[0])
    if ratios:
        ax = row.pop(0)
        ax.barh([f.metric for f in ratios], [f.ratio or 0.0 for f in ratios], color="tab:blue")
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("ours / baseline")
        ax.set_title(f"{name}: ratios (targets in results.md)")
        ax.tick_params(axis="y", labelsize=7)
    for ax, (title, spec) in zip(row, panels, strict=True):
        for label, points in spec["lines"].items():
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=label)
        ax.set_title(title)
        ax.set_xlabel(spec.get("xlabel", ""))
        ax.set_ylabel(spec.get("ylabel", ""))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
