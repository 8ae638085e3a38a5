"""Chaos run (hardening issue, item 10): a compressing engine under random load, aborts and faults.

    python -m bench.chaos --tp 1 --requests 2000 --out bench/results      (GPU; --tp 2 on two GPUs)

One `AsyncLLM` (vLLM's serving engine, as `vllm serve` runs it) with the plugin
on, a small random-weight Llama and KV memory small enough that vLLM must
preempt. Requests arrive at random times with:

  * prompt lengths uniform in [--min-len, --max-len] (default 1k-32k tokens);
  * a random per-request method (every registered one but `profile`, "none",
    or the server's) and budget (fractions and token counts);
  * --abort-share (0.3) cancelled at a random point: a wall-clock delay after
    arrival (queued, prefilling, or between prefill and the eviction report)
    or after a random number of generated tokens, as a client disconnect does;
  * --bad-share bad per-request values, which must be refused alone;
  * --fault-share injected eviction faults (tests/engine/fault_injector.py)
    at stages that leave the KV intact, at TP=2 also on one rank only: the
    request must still complete (served uncompressed).

Invariants, written to chaos.json per TP size with the command, commit, date,
device and versions: no engine death, no leaked block (vLLM's block pool is
empty when idle: `reset_prefix_cache()` succeeds only then), every request
neither aborted nor refused completes with all its tokens, every bad request
is refused, and the self-check (`VLLM_KVCOMP_VERIFY`) is exact on the
sampled evictions.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_SHAPE = "llama-tiny"  # 16 layers, 2 KV heads of 64: 8 KiB of KV per token, prefill is cheap
FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0)
TOKEN_BUDGETS = (128, 512, 1024, 2048, 4096, 16384)
BAD_INPUTS = ({"kv_budget": "lots"}, {"kv_budjet": 0.2}, {"kv_budget": 1e30}, {"kv_compression": "zigzagg"})
INTACT_FAULTS = ("score", "plan", "compact")
# On one rank only, a fault before compaction is served uncompressed only up to the plan: once
# another rank has begun compacting, the batch is finished with an error by design (no rollback).
RANK1_INTACT_FAULTS = ("score", "plan")


@dataclass
class Planned:
    request_id: str
    prompt_len: int
    max_tokens: int
    extra_args: dict | None
    arrival_s: float
    abort: tuple[str, float] | None = None  # ("time", seconds after arrival) or ("tokens", n)
    bad: bool = False


def plan_requests(args, methods: list[str]) -> list[Planned]:
    """The whole run, drawn up front from one seed (prompts are made at submission)."""
    rng = random.Random(args.seed)
    plan = []
    for i in range(args.requests):
        extra: dict | None = None
        draw = rng.random()
        if draw < 0.15:
            extra = {"kv_compression": "none"}
        elif draw < 0.9:
            extra = {"kv_compression": rng.choice(methods)}
            extra["kv_budget"] = rng.choice(FRACTIONS) if rng.random() < 0.7 else rng.choice(TOKEN_BUDGETS)
        # else: the server's method and budget
        req = Planned(
            f"chaos-{i}",
            rng.randint(args.min_len, args.max_len),
            rng.randint(1, 256),
            extra,
            rng.uniform(0, args.arrival_s),
        )
        if rng.random() < args.bad_share:
            req.extra_args, req.bad = dict(rng.choice(BAD_INPUTS)), True
        elif rng.random() < args.fault_share:
            rank1 = args.tp > 1 and rng.random() < 0.5
            stage = rng.choice(RANK1_INTACT_FAULTS if rank1 else INTACT_FAULTS)
            req.request_id = f"chaos-{i}-kvfault-{'rank1-' if rank1 else ''}{stage}"
        if not req.bad and rng.random() < args.abort_share:
            if rng.random() < 0.5:
                req.abort = ("time", rng.uniform(0.0, 4.0))
            else:
                req.abort = ("tokens", float(rng.randint(0, req.max_tokens - 1)))
        plan.append(req)
    return plan


async def run_one(llm, req: Planned, t0: float) -> dict:
    """Submit at its arrival time, consume, and cancel as planned; the outcome as a dict."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.v1.engine.exceptions import EngineDeadError

    await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - t0)))
    ids = np.random.default_rng(zlib.crc32(req.request_id.encode())).integers(3, 32000, req.prompt_len).tolist()
    params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True, extra_args=req.extra_args)
    out: dict[str, Any] = {"id": req.request_id, "planned_abort": req.abort is not None, "bad": req.bad, "tokens": 0}

    async def consume():
        stream = llm.generate({"prompt_token_ids": ids}, params, req.request_id)
        try:
            async for output in stream:
                out["tokens"] = len(output.outputs[0].token_ids)
                out["finish_reason"] = output.outputs[0].finish_reason
                if req.abort and req.abort[0] == "tokens" and out["tokens"] >= req.abort[1] and not output.finished:
                    out["aborted"] = True  # the client went away: closing the stream aborts the request
                    return
            out["finished"] = True
        finally:
            await stream.aclose()

    task = asyncio.ensure_future(consume())
    try:
        if req.abort and req.abort[0] == "time":
            await asyncio.wait_for(asyncio.shield(task), timeout=req.abort[1])
        else:
            await task
    except (asyncio.TimeoutError, asyncio.CancelledError):
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        out["aborted"] = True
    except EngineDeadError as exc:
        out["engine_dead"] = str(exc)[:200]
    except ValueError as exc:  # a refused request (HTTP 400 in the server)
        out["refused"] = str(exc)[:200]
    except Exception as exc:  # anything else is a finding
        out["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def check(outcomes: list[dict], plan: list[Planned]) -> dict:
    """The invariants over the outcomes (the engine-side ones are added by the caller)."""
    by_id = {p.request_id: p for p in plan}
    incomplete = [
        o["id"]
        for o in outcomes
        if not o.get("aborted") and not o["bad"] and (not o.get("finished") or o["tokens"] != by_id[o["id"]].max_tokens)
    ]
    return {
        "requests": len(outcomes),
        "aborted": sum(bool(o.get("aborted")) for o in outcomes),
        "aborted_after_finishing": sum(o["planned_abort"] and bool(o.get("finished")) for o in outcomes),
        "bad_requests": sum(o["bad"] for o in outcomes),
        "bad_refused": sum(o["bad"] and "refused" in o for o in outcomes),
        "wrongly_refused": sum(not o["bad"] and "refused" in o for o in outcomes),
        "fault_requests": sum("kvfault" in o["id"] for o in outcomes),
        "completed": sum(bool(o.get("finished")) for o in outcomes),
        "incomplete_not_aborted": len(incomplete),
        "incomplete_examples": incomplete[:5],
        "engine_deaths": sum("engine_dead" in o for o in outcomes),
        "other_errors": [o["error"] for o in outcomes if "error" in o][:5],
        "output_tokens": sum(o["tokens"] for o in outcomes),
    }


def registry_metrics() -> dict:
    from bench.offline import scrape_plugin_metrics

    metrics = scrape_plugin_metrics(None)
    from prometheus_client import REGISTRY

    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name in ("vllm:num_preemptions_total", "vllm:kv_cache_usage_perc"):
                metrics[sample.name] = metrics.get(sample.name, 0.0) + sample.value
    return metrics


def build_engine(args, model: Path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from evaluation.random_model import kv_bytes_per_token

    engine_args = AsyncEngineArgs(
        model=str(model),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        seed=0,
        max_model_len=args.max_len + 256,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        # per GPU: each rank holds 1/tp of the KV heads, so the pool holds the same tokens at any TP
        kv_cache_memory_bytes=args.kv_tokens * kv_bytes_per_token(MODEL_SHAPE) // args.tp,
        enable_prefix_caching=False,
        disable_log_stats=False,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tp,
        additional_config={"kv_compression": {"method": args.method, "budget": args.budget}},
    )
    return AsyncLLM.from_engine_args(engine_args)


async def drive(args, model: Path) -> dict:
    from vllm_kvcomp.policies import method_names

    methods = [m for m in method_names() if m not in ("none", "profile")]
    plan = plan_requests(args, methods)
    llm = build_engine(args, model)
    before = registry_metrics()
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(*(run_one(llm, req, t0) for req in plan))
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(2.0)  # let the last aborts and stats land
    result = check(list(outcomes), plan)
    result["elapsed_s"] = round(elapsed, 1)
    result["engine_alive"] = not llm.errored
    # vLLM's pool is empty (only its null block used) exactly when this succeeds
    result["idle_pool_empty"] = bool(await llm.reset_prefix_cache()) if not llm.errored else False
    # reset_prefix_cache succeeds only when no block but vLLM's null block is held; vLLM logs the count otherwise
    result["leaked_blocks"] = 0 if result["idle_pool_empty"] else "some (see vLLM's reset_prefix_cache warning)"
    after = registry_metrics()
    result["preemptions"] = after.get("vllm:num_preemptions_total", 0.0) - before.get("vllm:num_preemptions_total", 0)
    result["kv_cache_usage_when_idle"] = after.get("vllm:kv_cache_usage_perc")
    result["plugin_metrics"] = {k: v for k, v in after.items() if k.startswith("vllm_kvcomp_")}
    result["self_check"] = {
        "exact": after.get("vllm_kvcomp_verify_checks_total{result=exact}", 0.0),
        "mismatch": after.get("vllm_kvcomp_verify_checks_total{result=mismatch}", 0.0),
        "attention_rel_err_max": after.get("vllm_kvcomp_verify_attention_rel_err"),
    }
    llm.shutdown()
    return result


def passed(result: dict) -> bool:
    return (
        result["engine_deaths"] == 0
        and result["engine_alive"]
        and result["idle_pool_empty"]
        and result["incomplete_not_aborted"] == 0
        and result["bad_refused"] == result["bad_requests"]
        and result["wrongly_refused"] == 0
        and not result["other_errors"]
        and result["self_check"]["exact"] > 0
        and result["self_check"]["mismatch"] == 0
    )


def record(args, result: dict) -> dict:
    import torch
    import vllm

    from bench.offline import current_commit

    return {
        "tp": args.tp,
        "passed": passed(result),
        **result,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "command": "python -m bench.chaos " + " ".join(sys.argv[1:]),
        "commit": current_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
        "vllm": vllm.__version__,
        "torch": torch.__version__,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--min-len", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=32000)
    p.add_argument("--arrival-s", type=float, default=40.0, help="requests arrive uniformly over this many seconds")
    p.add_argument("--abort-share", type=float, default=0.3)
    p.add_argument("--bad-share", type=float, default=0.02)
    p.add_argument("--fault-share", type=float, default=0.02)
    p.add_argument("--kv-tokens", type=int, default=98304, help="KV pool size in tokens (forces preemption)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--method", default="zigzag", help="the server's method (requests override it)")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--verify", type=int, default=24, help="evictions self-checked per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="low: other jobs may share the GPU")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--work", type=Path, default=Path("/tmp/kvcomp-chaos"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from evaluation.random_model import make_random_model

    model = make_random_model(args.work / MODEL_SHAPE, MODEL_SHAPE)  # releases its GPU memory
    injector = Path(__file__).resolve().parents[1] / "tests" / "engine" / "fault_injector.py"
    os.environ.update({"VLLM_KVCOMP_VERIFY": str(args.verify), "VLLM_KVCOMP_OBSERVER": f"{injector}:FaultInjector"})
    case = record(args, asyncio.run(drive(args, model)))
    path = args.out / "chaos.json"
    cases = json.loads(path.read_text())["cases"] if path.exists() else []
    cases = [c for c in cases if c["tp"] != args.tp] + [case]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cases": sorted(cases, key=lambda c: c["tp"])}, indent=1) + "\n")
    summary = {
        k: case[k]
        for k in (
            "tp",
            "passed",
            "requests",
            "aborted",
            "completed",
            "preemptions",
            "engine_deaths",
            "idle_pool_empty",
            "incomplete_not_aborted",
            "self_check",
        )
    }
    print("[chaos]", json.dumps(summary))
    return 0 if case["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
