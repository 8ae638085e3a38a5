"""Python's garbage-collection pauses in a vLLM log written with ``VLLM_GC_DEBUG=1``.

vLLM's own GC debugger (vllm/utils/gc_utils.py) logs every collection of the engine process after its
startup heap is frozen: ``GC took 0.123ms to complete. Collected 5 objects (out of 700) in GC
generation 0.`` This sums them per generation, so a slower step can be checked against the time the
engine spent collecting (stage ``tput_same_batch_gc``: stock and the plugin at the same batch).
Collections after the engine's shutdown signal (``[shutdown] EngineCore``: the full collections of a
process tearing down, 0.6-0.9 s each in the 2026-12-02 run) are summed apart, as ``at_shutdown``: they
are not on the serving path.

    python -m bench.gc_debug LOG [LOG ...]      # one JSON object per log on stdout
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

GC_LINE = re.compile(r"GC took ([0-9.]+)ms to complete\. Collected \S+ objects \(out of (\d+)\) in GC generation (\d)")
SHUTDOWN = "[shutdown] EngineCore"


def summarize(text: str) -> dict:
    """Per generation: collections, total and largest pause (ms), the most objects one collection saw;
    the collections after the engine's shutdown signal under ``at_shutdown``, the same way."""
    serving, _, teardown = text.partition(SHUTDOWN)
    report = _per_generation(serving)
    report["at_shutdown"] = _per_generation(teardown)
    return report


def _per_generation(text: str) -> dict:
    generations: dict[str, dict] = {}
    for match in GC_LINE.finditer(text):
        ms, objects, generation = float(match[1]), int(match[2]), match[3]
        row = generations.setdefault(generation, {"collections": 0, "total_ms": 0.0, "max_ms": 0.0, "max_objects": 0})
        row["collections"] += 1
        row["total_ms"] += ms
        row["max_ms"] = max(row["max_ms"], ms)
        row["max_objects"] = max(row["max_objects"], objects)
    total = sum(row["total_ms"] for row in generations.values())
    return {"total_ms": total, "generations": dict(sorted(generations.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    args = parser.parse_args()
    print(json.dumps({str(path): summarize(path.read_text(errors="replace")) for path in args.logs}, indent=1))


if __name__ == "__main__":
    main()
