"""The baseline for the edge agent's event-loop lag: an idle asyncio loop on the same
machine at the same time, timing the same 100 ms sleep the agent's own probe times.

    python -m bench.lagprobe OUT.json

Runs until SIGTERM, then writes every lateness (seconds) to OUT.json. Its p99 is what the
machine's scheduler alone costs a loop while the agent's cameras load both cores; the
agent's p99 above it is the agent's own doing (blocking calls, GIL held by its threads).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

PERIOD_S = 0.1  # edge_agent.health.LAG_PERIOD_S


async def probe() -> list[float]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    late: list[float] = []
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(PERIOD_S)
        late.append(max(0.0, loop.time() - start - PERIOD_S))
    return late


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(asyncio.run(probe())))
