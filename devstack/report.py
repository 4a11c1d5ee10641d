"""The demo's report: one self-contained HTML page, with its PNGs written beside it.

Pure functions: the run's data in (per-chunk records from the output bucket, the closed
windows from the hand-off stream, the coverage audit's document and timeline PNG, the
summary's lines), files out. Every image is embedded as a ``data:`` URI, so the page
alone shows everything, and is also written beside it as a PNG (linked relatively). No
external resource: no script, no web font, no CDN. Every string is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import shutil
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

# Latency stages, measured from the records alone: the manifest's wall-clock end (the
# chunk closed on the edge), the stream entry id (the XADD time in ms, on Redis's clock)
# and the record's processed_at (the consumer wrote its done record).
CLOSED_ANNOUNCED = "chunk closed → announced (edge)"
ANNOUNCED_PROCESSED = "announced → processed (stream + cloud)"
CLOSED_PROCESSED = "chunk closed → processed (end to end)"
STAGES = (CLOSED_ANNOUNCED, ANNOUNCED_PROCESSED, CLOSED_PROCESSED)


@dataclass(frozen=True, slots=True)
class Window:
    """A closed scene window revision as handed off, and its MCAP in the output bucket."""

    revision_id: str
    closed_because: str
    start: int  # epoch seconds
    end: int
    mcap_key: str
    mcap_bytes: int | None  # None: no object at mcap_key
    cameras: dict[str, dict[str, float]]  # camera -> accepted_s, rejected_s, gap_s, unexplained_s


@dataclass(frozen=True, slots=True)
class ReportInput:
    title: str
    summary: Sequence[tuple[str, Any]]
    records: Sequence[dict[str, Any]]
    windows: Sequence[Window]
    coverage: dict[str, Any]  # `cloud-ingest coverage --json`
    coverage_png: Path  # `cloud-ingest coverage --plot`


def _utc(text: str) -> datetime:
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _entry_time(entry_id: str) -> datetime:
    return datetime.fromtimestamp(int(entry_id.split("-", 1)[0]) / 1000, UTC)


def latencies(records: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds per stage (see STAGES), one value per record."""
    out: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for r in records:
        closed = _utc(r["manifest"]["end_time"])
        announced = _entry_time(r["stream_entry_id"])
        done = _utc(r["processed_at"])
        out[CLOSED_ANNOUNCED].append((announced - closed).total_seconds())
        out[ANNOUNCED_PROCESSED].append((done - announced).total_seconds())
        out[CLOSED_PROCESSED].append((done - closed).total_seconds())
    return out


def verdict(record: dict[str, Any]) -> str:
    return "accepted" if record["status"] == "accepted" else f"rejected: {record['reason']}"


def verdicts(records: Iterable[dict[str, Any]]) -> dict[str, Counter[str]]:
    """Per camera, how many chunks got each filter verdict."""
    out: dict[str, Counter[str]] = {}
    for r in records:
        out.setdefault(r["manifest"]["camera_id"], Counter())[verdict(r)] += 1
    return dict(sorted(out.items()))


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- Figures -------------------------------------------------------------------------


def plot_latencies(lat: dict[str, list[float]], path: Path) -> None:
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, len(STAGES))
    for ax, stage in zip(axes, STAGES, strict=True):
        values = lat.get(stage, [])
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("seconds")
        if not values:
            ax.text(0.5, 0.5, "no chunks", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#4477aa")
        for q, style in ((0.5, "--"), (0.99, ":")):
            ax.axvline(percentile(values, q), color="#cc3311", linestyle=style, label=f"p{q:.0%}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("chunks")
    fig.savefig(path, dpi=100)


def plot_verdicts(per_camera: dict[str, Counter[str]], path: Path) -> None:
    kinds = sorted({k for c in per_camera.values() for k in c}, key=lambda k: (k != "accepted", k))
    cams = list(per_camera)
    fig = Figure(figsize=(max(4.0, 1.6 * len(cams) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    bottom = [0] * len(cams)
    # Accepted is always green; each rejection reason gets the next of the other colours.
    palette = ["#ee6677", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#4477aa"]
    rejections = iter(range(len(kinds)))
    for kind in kinds:
        heights = [per_camera[c][kind] for c in cams]
        colour = "#228833" if kind == "accepted" else palette[next(rejections) % len(palette)]
        ax.bar(cams, heights, bottom=bottom, label=kind, color=colour)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if not cams:
        ax.text(0.5, 0.5, "no chunks", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylabel("chunks")
    ax.set_title("filter verdicts per camera", fontsize=10)
    fig.savefig(path, dpi=100)


# -- HTML ----------------------------------------------------------------------------

# The browser itself refuses anything but the embedded images and the inline style.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 1300px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } img { max-width: 100%; border: 1px solid #eee; }
code { font-size: 0.9em; } .muted { color: #777; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _e(value)
    return _e(f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: set[int]) -> str:
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = (
            f'<td class="n">{_num(v, 2)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
            for i, v in enumerate(row)
        )
        out += ["<tr>", *cells, "</tr>"]
    out.append("</tbody></table>")
    return "".join(out)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<p><img src="data:image/png;base64,{data}" alt="{_e(alt)}"></p>'
        f'<p class="muted">also beside this page: <a href="{_e(path.name)}">{_e(path.name)}</a></p>'
    )


def _summary(data: ReportInput) -> str:
    return _table(("", "value"), data.summary, set())


def _coverage(doc: dict[str, Any], png: Path) -> str:
    rows = []
    for c in doc["cameras"]:
        causes = ", ".join(f"{k}: {v:.1f} s" for k, v in sorted(c["gaps_by_cause"].items()))
        rows.append(
            (
                c["camera_id"],
                c["wall_s"],
                c["accepted_s"],
                c["rejected_s"],
                c.get("pending_s", 0.0),
                c["gap_s"],
                causes or "—",
                c["dead_lettered_s"],
                c["unexplained_s"],
                f"{c['ratio']:.2%}",
            )
        )
    head = (
        "camera",
        "wall s",
        "accepted s",
        "rejected s",
        "pending s",
        "gap s",
        "gaps by cause",
        "dead-lettered s",
        "unexplained s",
        "ratio",
    )
    intervals = []
    for c in doc["cameras"]:
        for i in c["intervals"]:
            if i["kind"] != "accepted":
                why = i.get("cause") or i.get("reason") or "—"
                intervals.append((c["camera_id"], i["start"], i["end"], i["kind"], why))
    detail = (
        "<details><summary>intervals not accepted</summary>"
        + _table(("camera", "start", "end", "kind", "cause or reason"), intervals, set())
        + "</details>"
        if intervals
        else '<p class="muted">every second audited was accepted footage.</p>'
        if doc["cameras"]
        else '<p class="muted">no camera had footage in the range audited.</p>'
    )
    return (
        f"<p>Site <code>{_e(doc['site_id'])}</code>, {_e(doc['since'])} → {_e(doc['until'])}"
        " (<code>cloud-ingest coverage</code>).</p>"
        + _img(png, "per-camera coverage timeline")
        + _table(head, rows, {1, 2, 3, 4, 5, 7, 8})
        + detail
    )


def _latency_table(lat: dict[str, list[float]]) -> str:
    rows = [
        (
            stage,
            len(v),
            percentile(v, 0.5),
            percentile(v, 0.99),
            max(v) if v else float("nan"),
            statistics.fmean(v) if v else float("nan"),
        )
        for stage, v in lat.items()
    ]
    return _table(("stage", "chunks", "p50 s", "p99 s", "max s", "mean s"), rows, {1, 2, 3, 4, 5})


def _verdict_table(per_camera: dict[str, Counter[str]]) -> str:
    kinds = sorted({k for c in per_camera.values() for k in c}, key=lambda k: (k != "accepted", k))
    rows = [(cam, *(c[k] for k in kinds), sum(c.values())) for cam, c in per_camera.items()]
    return _table(("camera", *kinds, "total"), rows, set(range(1, len(kinds) + 2)))


def _footage(camera: str, seconds: dict[str, float]) -> str:
    kinds = ("accepted_s", "rejected_s", "gap_s", "unexplained_s")
    said = [f"{seconds[k]:.1f} s {k[:-2]}" for k in kinds if seconds.get(k)]
    return f"{camera}: {', '.join(said) or 'none'}"


def _windows(windows: Sequence[Window]) -> str:
    if not windows:
        return '<p class="muted">no window was closed.</p>'
    rows = [
        (
            w.revision_id,
            w.closed_because,
            datetime.fromtimestamp(w.start, UTC).isoformat(),
            datetime.fromtimestamp(w.end, UTC).isoformat(),
            "; ".join(_footage(c, s) for c, s in sorted(w.cameras.items())) or "—",
            w.mcap_key,
            "missing" if w.mcap_bytes is None else w.mcap_bytes,
        )
        for w in windows
    ]
    return _table(
        ("revision", "closed because", "start", "end", "footage", "MCAP key", "MCAP bytes"),
        rows,
        {6},
    )


def render(data: ReportInput, images: dict[str, Path]) -> str:
    lat = latencies(data.records)
    per_camera = verdicts(data.records)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        f"<title>{_e(data.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(data.title)}</h1>",
        "<h2>Summary</h2>",
        _summary(data),
        "<h2>Coverage per camera</h2>",
        _coverage(data.coverage, images["coverage"]),
        "<h2>Latency</h2>",
        _img(images["latency"], "latency histograms"),
        _latency_table(lat),
        "<h2>Filter verdicts per camera</h2>",
        _img(images["verdicts"], "filter verdicts per camera"),
        _verdict_table(per_camera),
        "<h2>Scene windows closed</h2>",
        _windows(data.windows),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write(out_dir: Path, data: ReportInput) -> Path:
    """``out_dir/report.html`` and its PNGs beside it (coverage.png, latency.png,
    verdicts.png); returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    coverage = out_dir / "coverage.png"
    if data.coverage_png.resolve() != coverage.resolve():
        shutil.copyfile(data.coverage_png, coverage)
    images = {
        "coverage": coverage,
        "latency": out_dir / "latency.png",
        "verdicts": out_dir / "verdicts.png",
    }
    plot_latencies(latencies(data.records), images["latency"])
    plot_verdicts(verdicts(data.records), images["verdicts"])
    page = out_dir / "report.html"
    tmp = page.with_suffix(".html.partial")
    tmp.write_text(render(data, images), encoding="utf-8")
    tmp.replace(page)
    return page
