"""``make bench``: every benchmark on one local stack, then bench/results/.

    python -m bench.run [NAME ...]

Runs the named benchmarks (default: all, in order) and writes ``results.json``
(every figure with its raw runs), ``results.md`` (the table of ratios against
the targets) and one PNG per benchmark. ``BENCH_QUICK=1`` makes a smoke run with
small inputs and one repeat; its figures are not for quoting.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import RESULTS, Figure, stack
from bench.report import plot, table

BENCHES = [
    "edge_capture",
    "upload",
    "queue",
    "processing",
    "latency",
    "window_mcap",
    "redis_wait",
    "scaling",
    "coverage_audit",
]


def main(argv: list[str]) -> int:
    names = argv or BENCHES
    unknown = set(names) - set(BENCHES)
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHES}", file=sys.stderr)
        return 2
    quick = os.environ.get("BENCH_QUICK") == "1"
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    figures: list[Figure] = []
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    try:
        with stack(work, quick=quick) as ctx:
            for name in names:
                print(f"[bench] {name} ...", flush=True)
                start = time.monotonic()
                module: Any = importlib.import_module(f"bench.{name}")
                try:
                    found: list[Figure] = module.run(ctx)
                except Exception as exc:  # one broken benchmark must not hide the others
                    failures[name] = repr(exc)[:500]
                    print(f"[bench] {name} FAILED: {exc!r}", flush=True)
                    continue
                finally:
                    timings[name] = time.monotonic() - start
                figures.extend(found)
                for f in found:
                    print(f"[bench]   {_line(f)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quick:  # a partial run keeps the other benchmarks' last figures
        figures, timings = _merged(figures, timings, set(names))
    write(figures, timings, failures, quick)
    return 1 if failures else 0


def _merged(
    figures: list[Figure], timings: dict[str, float], ran: set[str]
) -> tuple[list[Figure], dict[str, float]]:
    path = RESULTS / "results.json"
    if ran == set(BENCHES) or not path.exists():
        return figures, timings
    last = json.loads(path.read_text())
    if last.get("quick"):
        return figures, timings
    kept = [
        Figure(**{k: v for k, v in f.items() if k != "ratio"})
        for f in last["figures"]
        if f["bench"] not in ran
    ]
    old = {k: v for k, v in last.get("seconds", {}).items() if k not in ran}
    order = {name: i for i, name in enumerate(BENCHES)}
    merged = sorted(kept + figures, key=lambda f: order.get(f.bench, len(order)))
    return merged, {**old, **timings}


def _line(f: Figure) -> str:
    ratio = "" if f.ratio is None else f" ratio {f.ratio:.2f}"
    verdict = {True: "met", False: "NOT met", None: "not measured"}[f.met]
    return f"{f.metric}: ours {f.ours:.4g} {f.unit}{ratio} (target {f.target}: {verdict})"


def write(
    figures: list[Figure], timings: dict[str, float], failures: dict[str, str], quick: bool
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "quick": quick,
        "seconds": timings,
        "failures": failures,
        "figures": [{**asdict(f), "ratio": f.ratio} for f in figures],
    }
    (RESULTS / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (RESULTS / "results.md").write_text(table(figures, timings, failures, quick))
    for name in {f.bench for f in figures}:
        plot(name, [f for f in figures if f.bench == name], RESULTS / f"{name}.png")
    print(f"[bench] wrote {RESULTS}/results.json, results.md and plots", flush=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
