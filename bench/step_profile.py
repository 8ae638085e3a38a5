"""Where a decode step's time goes, stock vLLM against the plugin: GPU busy time, idle time, top kernels.

    python -m bench.step_profile --out bench/results/lifetime/step_profile --case long_generation --budget 1024

Each run (stock, then the plugin with `--evict-every` once per `--budgets` entry, each budget a
per-request override) is one engine in its own process (bench/offline.py),
with vLLM's torch profiler on for `--iterations` engine steps, `--delay` steps after the workload
starts (past the prefill and into steady decoding; with `evict_every` 128 a window of 256 steps
holds two rounds of evictions). From the worker's trace this reports, per run:
- `ms_per_step`: the window's wall time (first kernel start to last kernel end) over the steps;
- `gpu_busy_ms_per_step`: the union of the kernels' intervals per step, and `gpu_idle_share`, the
  rest of the window: time the GPU waited for the host. A share near 0 means the steps are
  GPU-bound; a large one, host-bound;
- `top_kernels`: the kernels with the most time, in ms per step, and launches per step;
- `batch`: the mean prefill and decode requests per step (vLLM's per-step range names);
- `host_ranges`: the host's named ranges, the plugin's `kvcomp::` ones among them (engine/timing.py
  `profiled`), and `cuda_runtime`: the CUDA runtime calls (launches, graph replays, copies).
vLLM's own per-op table (`profiler_out_0.txt`: CPU and CUDA time per op) is copied beside it.
The profiler slows the host a little, so compare the runs with each other, not with the
throughput bench.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from bench import offline
from bench.throughput import CASES


def kernel_intervals(trace: dict) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of every GPU kernel of a Chrome trace (torch.profiler's export)."""
    return [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e.get("name", "")))
        for e in trace.get("traceEvents", [])
        if e.get("cat") == "kernel" and "ts" in e
    ]


def _totals(events, category: str, steps: int, top: int) -> list[dict]:
    """Events of one trace category by name: ms per step and calls per step, the largest first."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == category:
            totals = per_name[str(e.get("name", ""))]
            totals[0] += float(e.get("dur", 0.0))
            totals[1] += 1
    ranked = sorted(per_name.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    return [
        {"name": name[:120], "ms_per_step": total / 1e3 / steps, "calls_per_step": count / steps}
        for name, (total, count) in ranked
    ]


# vLLM's model runner names each step's range by its batch: prefill ("context") and decode requests
_BATCH_RANGE = re.compile(r"execute_context_(\d+)\(\d+\)_generation_(\d+)\(\d+\)")


def batch_sizes(events) -> dict:
    """Mean prefill and decode requests per profiled step, from vLLM's per-step range names, so that
    runs are compared at known batch sizes (stock holds fewer requests than the plugin)."""
    sizes = [
        (int(m.group(1)), int(m.group(2)))
        for e in events
        if e.get("cat") == "user_annotation" and (m := _BATCH_RANGE.fullmatch(str(e.get("name", ""))))
    ]
    if not sizes:
        return {}
    decode = [d for _, d in sizes]
    return {
        "prefill_requests_mean": sum(c for c, _ in sizes) / len(sizes),
        "decode_requests_mean": sum(decode) / len(decode),
        "decode_requests_min_max": [min(decode), max(decode)],
    }


def summarize_trace(trace: dict, steps: int, top: int = 15) -> dict:
    """The window, the GPU's busy and idle time, per step, and the top kernels (see the module doc)."""
    kernels = sorted(kernel_intervals(trace))
    if not kernels:
        return {"error": "no GPU kernels in the trace"}
    busy, cur_start, cur_end = 0.0, kernels[0][0], kernels[0][1]
    for start, end, _ in kernels[1:]:
        if start > cur_end:  # a gap: the GPU had nothing to run
            busy, cur_start = busy + cur_end - cur_start, start
        cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    window = max(end for _, end, _ in kernels) - kernels[0][0]
    events = trace.get("traceEvents", [])
    return {
        "steps": steps,
        "window_ms": window / 1e3,
        "ms_per_step": window / 1e3 / steps,
        "gpu_busy_ms_per_step": busy / 1e3 / steps,
        "gpu_idle_share": 1.0 - busy / window if window else 0.0,
        "kernel_launches_per_step": len(kernels) / steps,
        "batch": batch_sizes(events),
        "top_kernels": _totals(events, "kernel", steps, top),
        # host side: record_function ranges (the plugin's `kvcomp::begin_step`, `kvcomp::layer_tables`,
        # `kvcomp::end_step`, `kvcomp::decode_evictions`; vLLM's own) and CUDA runtime calls
        "host_ranges": _totals(events, "user_annotation", steps, top),
        "cuda_runtime": _totals(events, "cuda_runtime", steps, 6),
    }


def load_trace(folder: Path) -> tuple[dict, Path] | None:
    """The worker's trace in `folder` (the largest, if several)."""
    files = sorted(folder.glob("*.pt.trace.json*"), key=lambda f: f.stat().st_size, reverse=True)
    if not files:
        return None
    opener = gzip.open if files[0].suffix == ".gz" else open
    with opener(files[0], "rt") as handle:
        return json.load(handle), files[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder; default: a random-weight Llama of --shape")
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--case", default="long_generation", choices=sorted(CASES))
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=1024)
    parser.add_argument("--budgets", default="1024", help="one plugin run per per-request budget, comma-separated")
    parser.add_argument("--evict-every", type=int, default=128)
    parser.add_argument("--method", default="uniform")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=2684354560)
    parser.add_argument("--delay", type=int, default=600, help="engine steps before the window")
    parser.add_argument("--iterations", type=int, default=256, help="engine steps profiled")
    parser.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True, help="also profile stock")
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_profile"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvcomp-step-profile"))
    args = parser.parse_args(argv)
    from evaluation.random_model import make_random_model

    case = CASES[args.case]
    model = args.model or str(make_random_model(args.work / args.shape, args.shape))
    workload = {
        **case,
        "num_prompts": args.num_prompts or case["num_prompts"],
        "output_len": args.output_len,
        "seed": 1,
    }
    runs = {}
    budgets = [float(b) for b in args.budgets.split(",") if b]
    for run, budget in [("stock", None)] * args.stock + [(f"plugin@{b:g}", b) for b in budgets]:
        folder = args.work / f"trace_{run}"
        shutil.rmtree(folder, ignore_errors=True)
        spec = {
            "name": f"step_profile_{run.replace('@', '_')}",
            "model": model,
            "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
            "max_model_len": case["prompt_len"] + args.output_len + 64,
            "workload": dict(workload),
            "profile": {"dir": str(folder), "delay": args.delay, "iterations": args.iterations},
        }
        if budget is not None:  # the server budget is overridden per request, as in bench.throughput
            spec["compression"] = {"method": args.method, "budget": 0.2, "evict_every": args.evict_every}
            spec["workload"]["extra_args"] = {"kv_budget": budget}
        measured = offline.run_in_subprocess(spec, args.work / "logs", timeout=1200)
        loaded = load_trace(folder)
        summary = summarize_trace(loaded[0], args.iterations) if loaded else {"error": f"no trace in {folder}"}
        summary["output_tok_s"] = measured.get("output_tok_s")
        summary["tpot_p50_ms"] = 1e3 * measured.get("tpot_s", {}).get("p50", float("nan"))
        runs[run] = summary
        args.out.mkdir(parents=True, exist_ok=True)
        if (folder / "profiler_out_0.txt").exists():
            shutil.copy(folder / "profiler_out_0.txt", args.out / f"profiler_out_{run}.txt")
        print(f"[step_profile] {run}: {json.dumps({k: v for k, v in summary.items() if k != 'top_kernels'})}")
    device = measured.get("device", "unknown") if runs else "unknown"
    result = {**offline.bench_header("bench.step_profile", argv, device, args), "runs": runs}
    result["setup"] = {k: str(v) if isinstance(v, Path) else v for k, v in result["setup"].items()}
    offline.write_json(result, args.out / "step_profile.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
