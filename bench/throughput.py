"""Throughput of vLLM + plugin against stock vLLM: same GPU, same run, same KV memory.

    python -m bench.throughput --out bench/results      (from a checkout; on the GPU machine: bench/device/session.sh)

Two engine processes, one after the other on the same GPU, each with the same
`--kv-cache-memory-bytes`, the same model and the same token-id prompts:

  * stock vLLM (no compression config: the plugin stays out of the way), and
  * vLLM + plugin (`--method`, default zigzag), which runs every budget on one
    warm engine through the per-request override (SamplingParams.extra_args
    `kv_budget`): budget 1.0 measures the plugin's overhead, lower budgets its gain.

Cases (sizes from issues #5 and #12): decode_heavy (16k-token prompts, 1024 output
tokens), prefill_heavy (16k, 128) and long_generation (1k, 16k: with token budgets
such as 1024 and 2048 and `--evict-every`, which needs decode-time eviction). The model is a random-weight
Llama of a real shape (default 1B: 16 layers, 8 KV heads of 64) with the KV
memory capped (default 4 GiB, about 7 requests of 17k tokens), so that KV
capacity, not compute, limits the batch; throughput of a random model is the
real model's (same shapes, same kernels, greedy with ignore_eos).

Every workload's result is written as soon as it is measured
(`throughput_raw.json`); `throughput.json`, `throughput.md` and
`throughput_vs_budget.png` are rebuilt from whatever the raw file holds, so a
run can be split across invocations (`--runs stock` then `--runs plugin`).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

from bench import offline, paired
from evaluation.plots import plot_throughput
from evaluation.random_model import SHAPES, make_random_model

CASES = {
    "decode_heavy": {"prompt_len": 16384, "output_len": 1024, "num_prompts": 256},
    "prefill_heavy": {"prompt_len": 16384, "output_len": 128, "num_prompts": 128},
    # stock only: decode_heavy's prompts with one output token, its prefill time P (amdahl_bound)
    "decode_heavy_prefill": {"prompt_len": 16384, "output_len": 1, "num_prompts": 256},
    # issue #12: reasoning-style generations, lifetime token budgets (--budgets 1024,2048 --evict-every 128)
    "long_generation": {"prompt_len": 1024, "output_len": 16384, "num_prompts": 64},
}
STOCK_ONLY = {"decode_heavy_prefill"}  # probes of stock alone: a plugin run skips them


def label(case: str, budget: float | None) -> str:
    return f"{case}@stock" if budget is None else f"{case}@{budget:g}"


def plan_workloads(
    cases: list[str],
    budgets: list[float] | None,
    num_prompts: dict[str, int],
    output_len: dict[str, int] | None = None,
    repeats: int = 1,
) -> list[dict]:
    """Workloads of one process; budgets None = stock. Budget 1.0 returns its tokens.

    `repeats` > 1 runs the whole list that many times on the same engine, each pass tagged
    `<case>#<k>` so that pass k of the plugin is compared with pass k of stock: the rows' spread is
    the run-to-run noise a small ratio (budget 1.0's overhead) must be read against."""
    workloads = []
    for k in range(1, repeats + 1):
        for case in cases:
            if budgets is not None and case in STOCK_ONLY:
                continue
            shape = {**CASES[case], "num_prompts": num_prompts.get(case, CASES[case]["num_prompts"])}
            shape["output_len"] = (output_len or {}).get(case, shape["output_len"])
            tag = _tagged(case, k if repeats > 1 else None)
            for budget in budgets if budgets is not None else [None]:
                workload = {**shape, "seed": 1, "label": label(tag, budget), "case": tag, "budget": budget}
                if repeats > 1:
                    workload.update(base_case=case, repeat=k)
                if budget is not None:
                    workload["extra_args"] = {"kv_budget": budget}
                workload["return_tokens"] = budget is None or budget == 1.0
                workloads.append(workload)
    return workloads


def _tagged(case: str, repeat: int | None) -> str:
    return case if repeat is None else f"{case}#{repeat}"


def start_invocation(raw: dict, command: str, runs: list[str], **setup) -> int:
    """Record this invocation (command, commit, time, and `setup`: model, KV memory) in the raw
    results; returns its id."""
    invocations = raw.setdefault("invocations", [])
    invocations.append(
        {
            "id": len(invocations),
            "command": command,
            "commit": offline.current_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "runs": runs,
            **setup,
        }
    )
    return len(invocations) - 1


def merge_raws(raws: list[dict]) -> dict:
    """One raw result from several (e.g. two jobs on two GPUs, one case each): invocations are
    renumbered and every workload keeps the invocation that measured it, so each case's plugin
    and stock numbers still come from one invocation (the summary records both ids)."""
    merged: dict = {"invocations": []}
    for raw in raws:
        offset = len(merged["invocations"])
        merged["invocations"] += [{**inv, "id": inv["id"] + offset} for inv in raw.get("invocations", [])]
        for run in ("stock", "plugin"):
            if run not in raw:
                continue
            workloads = [
                {**w, "invocation": None if w.get("invocation") is None else w["invocation"] + offset}
                for w in raw[run]["workloads"]
            ]
            _merge(merged, run, {**raw[run], "workloads": workloads})
    return merged


def _merge(raw: dict, run: str, result: dict, invocation: int | None = None) -> None:
    """Add a run's workloads to the raw results; each workload keeps the invocation that measured it."""
    for w in result["workloads"]:
        w.setdefault("invocation", invocation)
    if invocation is not None:
        raw["invocations"][invocation].setdefault("device", result.get("device"))
        raw["invocations"][invocation].update(vllm=result.get("vllm"), torch=result.get("torch"))
    previous = raw.get(run)
    if previous and "workloads" in previous:
        fresh = {_key(raw, w) for w in result["workloads"]}
        kept = [w for w in previous["workloads"] if _key(raw, w) not in fresh]
        result = {**result, "workloads": kept + result["workloads"]}
    raw[run] = result


def token_digests(tokens: list[list[int]]) -> list[str]:
    """One short digest per request's output tokens: enough to compare runs made apart."""
    return [hashlib.sha1(json.dumps(t).encode()).hexdigest()[:16] for t in tokens]


def _identical_share(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=False)) / max(1, len(a))


def _key(raw: dict, workload: dict) -> tuple:
    """A workload's identity: its model, KV memory and label (a later measurement of all three
    replaces it; the same case at another KV memory is another row, against its own stock)."""
    invocation = setup(raw, workload.get("invocation"))
    return invocation.get("model"), invocation.get("kv_cache_memory_bytes"), workload["workload"]["label"]


def summarize(raw: dict, meta: dict) -> dict:
    """throughput.json (issue #5 schema, plus extra fields) from the raw results."""
    stock = {  # (model, KV memory, case)
        (*_key(raw, w)[:2], w["workload"]["label"].split("@")[0]): w for w in raw.get("stock", {}).get("workloads", [])
    }
    plugin = raw.get("plugin", {})
    cases = []
    for w in plugin.get("workloads", []):
        wl = w["workload"]
        invocation = setup(raw, w.get("invocation"))
        model, kv_bytes = invocation.get("model"), invocation.get("kv_cache_memory_bytes")
        base = stock.get((model, kv_bytes, wl["case"]))
        metrics = w.get("plugin_metrics", {})
        evictions = metrics.get("vllm_kvcomp_eviction_seconds_count", 0.0)
        entry = {
            "invocation": w.get("invocation"),
            "stock_invocation": base.get("invocation") if base else None,
            "case": wl["case"],
            "method": plugin["compression"]["method"],
            "budget": wl["budget"],
            "num_prompts": w["num_prompts"],
            "prompt_len": wl["prompt_len"],
            "output_len": wl["output_len"],
            "output_tok_s": w["output_tok_s"],
            "stock_output_tok_s": base["output_tok_s"] if base else None,
            "ratio_output_tok_s": w["output_tok_s"] / base["output_tok_s"] if base else None,
            "req_s": w["req_s"],
            "stock_req_s": base["req_s"] if base else None,
            "ttft_p50": w["ttft_s"].get("p50"),
            "ttft_p99": w["ttft_s"].get("p99"),
            "tpot_p50": w["tpot_s"].get("p50"),
            "tpot_p99": w["tpot_s"].get("p99"),
            "stock_ttft_p50": base["ttft_s"].get("p50") if base else None,
            "stock_tpot_p50": base["tpot_s"].get("p50") if base else None,
            "stock_tpot_p99": base["tpot_s"].get("p99") if base else None,
            "max_running": w["max_running"],
            "stock_max_running": base["max_running"] if base else None,
            "mean_running": w.get("mean_running"),
            "stock_mean_running": base.get("mean_running") if base else None,
            "elapsed_s": w["elapsed_s"],
            "stock_elapsed_s": base["elapsed_s"] if base else None,
            "requests_compressed": metrics.get("vllm_kvcomp_requests_compressed_total"),
            "blocks_freed": metrics.get("vllm_kvcomp_blocks_freed_total"),
            "eviction_ms_mean": 1000 * metrics.get("vllm_kvcomp_eviction_seconds_sum", 0.0) / evictions
            if evictions
            else None,
            # the host's share (planning, enqueueing): older runs lack the metric
            "eviction_host_ms_mean": 1000 * metrics["vllm_kvcomp_eviction_host_seconds_sum"] / evictions
            if evictions and "vllm_kvcomp_eviction_host_seconds_sum" in metrics
            else None,
            "eviction_s_total": metrics.get("vllm_kvcomp_eviction_seconds_sum"),
            "eviction_host_s_total": metrics.get("vllm_kvcomp_eviction_host_seconds_sum"),
        }
        entry["preemptions"] = w.get("preemptions")
        entry["stock_preemptions"] = base.get("preemptions") if base else None
        entry["footprint_ratio"] = footprint_ratio(w, base)
        entry["step_time_ratio"] = step_time_ratio(entry)
        entry["kv_cache_memory_bytes"] = kv_bytes
        entry["model"] = model
        entry["base_case"], entry["repeat"] = wl.get("base_case", wl["case"]), wl.get("repeat")
        probe = _tagged(f"{entry['base_case']}_prefill", entry["repeat"])
        entry.update(amdahl(entry, stock.get((model, kv_bytes, probe))))
        # "same run" holds only when stock and plugin were measured by one invocation
        entry["same_invocation"] = bool(base) and w.get("invocation") == base.get("invocation")
        if base and "token_digests" in w and "token_digests" in base:
            # greedy outputs of the same prompts, request by request (budget 1.0: nothing evicted)
            entry["identical_to_stock"] = _identical_share(w["token_digests"], base["token_digests"])
        cases.append(entry)
    return {**meta, "invocations": raw.get("invocations", []), "cases": cases}


def footprint_ratio(plugin: dict, stock: dict | None) -> float | None:
    """The physics of a ratio when KV capacity limits the batch: stock's average KV per running request
    over the plugin's (each: mean KV usage / mean running, sampled through the run; same pool, so the
    pool size cancels). The throughput gain is about this ratio while the plugin's batch is not capped
    by the number of requests or by compute."""
    if not stock:
        return None
    values = [plugin.get("mean_kv_cache_usage"), plugin.get("mean_running")]
    values += [stock.get("mean_kv_cache_usage"), stock.get("mean_running")]
    if not all(values):
        return None
    usage, running, stock_usage, stock_running = values
    return (stock_usage / stock_running) / (usage / running)


def step_time_ratio(entry: dict) -> float | None:
    """The plugin's time per step over stock's, each the mean running requests over the output rate
    (steps of any kind, preemptions and prefill included). The gain factors into the two:
    ratio_output_tok_s = (mean running / stock's) / step_time_ratio, so a goal on the ratio at a given
    batch is a goal on the step (docs/LIFETIME-BUDGETS.md)."""
    values = [entry.get(k) for k in ("mean_running", "output_tok_s", "stock_mean_running", "stock_output_tok_s")]
    if not all(values):
        return None
    running, rate, stock_running, stock_rate = values
    return (running / rate) / (stock_running / stock_rate)


def setup(raw: dict, invocation: int | None) -> dict:
    """The invocation record (command, commit, model, KV memory) that measured a workload."""
    return next((i for i in raw.get("invocations", []) if i["id"] == invocation), {})


def amdahl(entry: dict, prefill: dict | None) -> dict:
    """The gain compression can give at all when prefill costs the same: stock spends P in prefill
    (measured by the `<case>_prefill` probe: the same prompts with one output token) and D = its
    total - P in decode; c-fold concurrency bounds the gain by (P + D) / (P + D / c), c the plugin's
    max running over stock's. Empty without the probe or a stock run."""
    stock_s, stock_running = entry.get("stock_elapsed_s"), entry.get("stock_max_running")
    if not prefill or not stock_s or not stock_running:
        return {}
    p = min(prefill["elapsed_s"], stock_s)
    c = max(1.0, entry["max_running"] / stock_running)
    bound = stock_s / (p + (stock_s - p) / c)
    ratio = entry.get("ratio_output_tok_s")
    return {
        "stock_prefill_s": p,
        "amdahl_bound": bound,
        "share_of_amdahl_bound": ratio / bound if ratio else None,
        "amdahl_note": "P: stock's elapsed time on the same prompts with 1 output token (case <case>_prefill)",
    }


def markdown(summary: dict) -> str:
    invocations = summary.get("invocations", [])
    lines = [
        "# Throughput: vLLM + vllm-kvcomp vs stock vLLM (same GPU, same KV memory)",
        "",
        f"Last command: `{summary['command']}` ({summary['date']}). Device: {summary['device']}; "
        f"vLLM {summary.get('vllm')}, torch {summary.get('torch')}.",
        "",
        "Invocations (the `inv.` column says which one measured each row; a ratio compares one invocation "
        "only where the plugin's and stock's invocation are the same):",
        "",
        *[
            f"- {i['id']}: `{i['command']}` at commit {i.get('commit')}, {i['date']}, {i.get('device')}; "
            f"model {i.get('model')}"
            for i in invocations
        ],
        "KV cache memory (`--kv-cache-memory-bytes`, the `KV GiB` column) and the model (the invocation's) are "
        "the same for the plugin and its stock run: KV capacity, not compute, limits the batch.",
        "Greedy, ignore_eos, random token-id prompts, prefix caching off; all requests submitted at once "
        "(TTFT includes queueing). Budgets are per-request overrides on one plugin engine.",
        "Running: mean / max requests running, sampled every 50 ms. Footprint ratio: stock's mean KV per "
        "running request over the plugin's, the gain KV capacity allows. Amdahl: the bound prefill leaves "
        "(`amdahl_bound` in the JSON; where the case has a stock prefill probe).",
        "Eviction ms/req: per evicted request (prefill and decode), between CUDA events around each batch "
        "(the GPU waits while the host plans, so this includes it); (host): the host's planning and enqueueing "
        "alone, where measured.",
        "",
        "| case | requests x (in, out) | method | budget | KV GiB | out tok/s | stock | ratio | footprint ratio "
        "| amdahl bound "
        "| TTFT p50 / p99 s | TPOT p50 / p99 ms (stock) | running (stock) | preemptions (stock) "
        "| eviction ms/req (host) | inv. (stock) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(x, spec=".0f"):
        return "" if x is None else format(x, spec)

    def ms(x):
        return fmt(x and 1000 * x, ".1f")

    def host(x):
        return "" if x is None else f" ({x:.1f})"

    for c in summary["cases"]:
        kv = c.get("kv_cache_memory_bytes")
        lines.append(
            f"| {c['case']} | {c['num_prompts']} x ({c['prompt_len']}, {c['output_len']}) | {c['method']} "
            f"| {c['budget']:g} | {fmt(kv and kv / 2**30, 'g')} "
            f"| {fmt(c['output_tok_s'])} | {fmt(c['stock_output_tok_s'])} | {fmt(c['ratio_output_tok_s'], '.2f')} "
            f"| {fmt(c.get('footprint_ratio'), '.2f')} | {fmt(c.get('amdahl_bound'), '.2f')} "
            f"| {fmt(c['ttft_p50'], '.1f')} / {fmt(c['ttft_p99'], '.1f')} "
            f"| {ms(c['tpot_p50'])} / {ms(c['tpot_p99'])} ({ms(c['stock_tpot_p50'])} / {ms(c.get('stock_tpot_p99'))}) "
            f"| {fmt(c.get('mean_running'), '.1f')} / {fmt(c['max_running'])} "
            f"({fmt(c.get('stock_mean_running'), '.1f')} / {fmt(c['stock_max_running'])}) "
            f"| {fmt(c.get('preemptions'))} ({fmt(c.get('stock_preemptions'))}) "
            f"| {fmt(c['eviction_ms_mean'], '.1f')}{host(c.get('eviction_host_ms_mean'))} "
            f"| {c.get('invocation')} ({c.get('stock_invocation')}) |"
        )
    lines += repeat_lines(summary["cases"])
    identical = [c for c in summary["cases"] if "identical_to_stock" in c]
    if identical:
        lines += [
            "",
            "Greedy outputs identical to stock at budget 1.0: "
            + ", ".join(f"{c['case']} {c['identical_to_stock']:.0%} of requests" for c in identical),
        ]
    return "\n".join(lines) + "\n"


def repeat_lines(cases: list[dict]) -> list[str]:
    """Each repeated case's ratios side by side (pass k of the plugin against pass k of stock)."""
    groups: dict[tuple, list[float]] = {}
    for c in cases:
        if c.get("repeat") is not None and c.get("ratio_output_tok_s") is not None:
            key = (c["base_case"], c["budget"], c.get("kv_cache_memory_bytes"), c.get("invocation"))
            groups.setdefault(key, []).append(c["ratio_output_tok_s"])
    if not groups:
        return []
    lines = [
        "",
        "Repeated passes on the same engines (ratio of pass k against stock's pass k; the standard error "
        "of the mean, sd / sqrt(passes), says how small an overhead the passes can resolve):",
    ]
    for (case, budget, _, invocation), ratios in groups.items():
        sem = statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else float("nan")
        lines.append(
            f"- {case} @ {budget:g} (invocation {invocation}): "
            + ", ".join(f"{r:.3f}" for r in ratios)
            + f"; mean {statistics.fmean(ratios):.3f} (standard error {sem:.3f}), "
            + f"range {min(ratios):.3f}-{max(ratios):.3f}"
        )
    return lines


def main(argv=None) -> int:
    def csv(kind):
        return lambda text: [kind(x) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder; default: a random-weight Llama of --shape")
    parser.add_argument("--shape", default="llama-1b", help="llama-1b | llama-8b | llama-tiny (random weights)")
    parser.add_argument("--method", default="uniform", help="the plugin's method (uniform: README's recommendation)")
    parser.add_argument(
        "--budgets", type=csv(float), default=[0.2, 1.0, 0.1, 0.5], help="fractions in (0, 1] or token counts > 1"
    )
    parser.add_argument("--evict-every", type=int, default=None, help="the plugin's evict_every (lifetime budgets)")
    parser.add_argument("--cases", type=csv(str), default=list(CASES))
    parser.add_argument("--num-prompts", type=csv(int), default=None, help="per case, in --cases order")
    parser.add_argument("--output-len", type=csv(int), default=None, help="per case, in --cases order")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=4 << 30)
    parser.add_argument("--repeats", type=int, default=1, help="run every workload this many times per engine")
    parser.add_argument(
        "--paired", action="store_true", help="both engines up at once, pass k of each back to back (bench/paired.py)"
    )
    parser.add_argument("--runs", type=csv(str), default=["stock", "plugin"])
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds per engine process (with --paired: both together)"
    )
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/kvcomp-throughput")
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="measure nothing: merge these throughput_raw.json files into --out"
    )
    args = parser.parse_args(argv)
    command = "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        return write_merged(args.merge, Path(args.out), command)
    for case in args.cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    for budget in args.budgets:
        if not (0 < budget <= 1 or (budget > 1 and budget == int(budget))):
            parser.error(f"--budgets are fractions in (0, 1] or whole token counts, got {budget}")
    for run in args.runs:
        if run not in ("stock", "plugin"):
            parser.error(f"unknown run {run!r}; choose stock or plugin")
    if args.paired and (sorted(args.runs) != ["plugin", "stock"] or args.repeats < 2):
        parser.error("--paired alternates passes of stock and the plugin: give --runs stock,plugin, --repeats 2+")

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = str(make_random_model(work / args.shape, args.shape))
    num_prompts = dict(zip(args.cases, args.num_prompts or [], strict=False))  # cases without a count keep theirs
    output_len = dict(zip(args.cases, args.output_len or [], strict=False))
    max_len = max(CASES[c]["prompt_len"] + output_len.get(c, CASES[c]["output_len"]) for c in args.cases) + 64
    base_spec = {
        "model": model,
        "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
        "max_model_len": max_len,
        "max_num_seqs": 256,
    }
    raw_path = out / "throughput_raw.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    model_text = args.model or f"random-weight {args.shape} ({_shape_text(args.shape)})"
    invocation = start_invocation(
        raw, command, args.runs, model=model_text, kv_cache_memory_bytes=args.kv_cache_memory_bytes
    )
    specs = {run: run_spec(run, args, base_spec, num_prompts, output_len) for run in args.runs}
    if args.paired:  # both engines up, passes alternated (bench/paired.py)
        print(f"[throughput] stock and plugin side by side, {args.repeats} passes in ABBA order", flush=True)
        results = paired.alternate(specs, work / "logs", timeout=args.timeout, partial_ok=True)
        for run, result in results.items():
            record(raw, raw_path, run, result, invocation)
    else:
        for run, spec in specs.items():
            print(f"[throughput] {run}: {len(spec['workloads'])} workloads", flush=True)
            result = offline.run_in_subprocess(spec, work / "logs", timeout=args.timeout, partial_ok=True)
            record(raw, raw_path, run, result, invocation)

    write_summary(raw, out, command=command, model=model_text, kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    return 0


def run_spec(run: str, args, base_spec: dict, num_prompts: dict, output_len: dict) -> dict:
    """The `bench.offline` spec of one run ("stock" or "plugin") of this invocation."""
    spec = {**base_spec, "name": f"throughput_{run}", "return_tokens": False}
    if run == "stock":
        spec["workloads"] = plan_workloads(args.cases, None, num_prompts, output_len, args.repeats)
        return spec
    # Fixed server budget: requests override it, and the same engine config
    # (hence vLLM's compile cache) serves every invocation.
    spec["compression"] = {"method": args.method, "budget": 0.2}
    if args.evict_every is not None:
        spec["compression"]["evict_every"] = args.evict_every
    spec["workloads"] = plan_workloads(args.cases, args.budgets, num_prompts, output_len, args.repeats)
    return spec


def record(raw: dict, raw_path: Path, run: str, result: dict, invocation: int) -> None:
    """One run's result: printed a line per workload, merged into the raw results and written."""
    for w in result["workloads"]:
        if "tokens" in w:
            w["token_digests"] = token_digests(w.pop("tokens"))
        host = w.get("cpu", {}).get("host", {})
        others = ", ".join(f"{o['process']} {o['cpu_s']:.1f} s" for o in host.get("other_processes", [])[:2])
        print(
            f"[throughput] {run} {w['workload']['label']}: {w['output_tok_s']:.0f} tok/s, "
            f"max running {w['max_running']:.0f}, {w['elapsed_s']:.1f} s; "
            f"host busy {host.get('busy_cores', float('nan')):.1f} cores (outside the run: {others or 'none'})",
            flush=True,
        )
    _merge(raw, run, result, invocation)
    raw_path.write_text(json.dumps(raw, indent=1))


def write_summary(raw: dict, out: Path, **setup) -> None:
    """throughput.json, throughput.md and the plot, from the raw results (`setup`: the command,
    model and KV memory the summary names)."""
    first = raw.get("plugin") or raw.get("stock") or {}
    meta = {
        "device": first.get("device"),
        "vllm": first.get("vllm"),
        "torch": first.get("torch"),
        "date": datetime.date.today().isoformat(),
        **setup,
    }
    summary = summarize(raw, meta)
    (out / "throughput.json").write_text(json.dumps(summary, indent=1))
    (out / "throughput.md").write_text(markdown(summary))
    plot_throughput(summary, out / "throughput_vs_budget.png")
    print(markdown(summary))


def write_merged(paths: list[Path], out: Path, command: str) -> int:
    raw = merge_raws([json.loads(p.read_text()) for p in paths])
    invocations = raw["invocations"]
    # model and KV memory may differ per case: each case row names its own, and is compared with the
    # stock run of the same model (each ratio within one invocation, hence one KV memory)
    models = sorted({inv.get("model") for inv in invocations}, key=str)
    kv_sizes = sorted({inv.get("kv_cache_memory_bytes") for inv in invocations})
    model = models[0] if len(models) == 1 else models
    kv_bytes = kv_sizes[0] if len(kv_sizes) == 1 else kv_sizes
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput_raw.json").write_text(json.dumps(raw, indent=1))
    write_summary(raw, out, command=command, model=model, kv_cache_memory_bytes=kv_bytes)
    return 0


def _shape_text(shape: str) -> str:
    s = SHAPES[shape]
    return (
        f"{s['num_hidden_layers']} layers, hidden {s['hidden_size']}, {s['num_attention_heads']} q / "
        f"{s['num_key_value_heads']} kv heads, head_dim {s['hidden_size'] // s['num_attention_heads']}, bf16"
    )


if __name__ == "__main__":
    sys.exit(main())
