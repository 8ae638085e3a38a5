"""Host (CPU) cost of decode-time evictions: one request's whole life, replayed through the planning code.

    python -m bench.decode_host_cost --out bench/results/lifetime/decode_host_cost.json

On the H200, the 1B long-generation run spent 14.9 s of 67.7 s in decode evictions: 117 ms for each
round of 64 due requests (bench/results/lifetime/h200_evidence/). The GPU idles while the host plans, so
this measures the host side alone: for one request of `--prompt` tokens that generates `--output`
tokens at a token budget `--budget` with `evict_every`, every eviction goes through the functions
`DecodeEvictor` calls per request (engine/decode_eviction.py): the budgets (`decode_budgets`), the
plan (`plan_reeviction`), the block-table row as an array (once per request), the logical page table
that scoring reads (`logical_pages`), the compaction rows (`compaction_rows`), the rewritten
block-table row, its copies and freed ids, the entry tables that `LayerPageState.publish` writes, and
the new row as vLLM's list of ids. The kernels are not run. Reported per request and
eviction, and for a round of `--requests` requests (what the GPU waits for, on this machine's CPU).
Stages the evictor runs once for the whole round (the page table, the compaction rows) are timed
on `--requests` copies of the request and divided by that count.
Since `DecodePlanner.plan_ahead` makes the budgets and the plan (with its cached arrays:
`precompute`) in earlier steps, the round's due step has only the rest
(`ms_per_round_of_N_in_due_step`).

`us_per_step`: the host work of every decode step on a real runtime (CPU), evicting or not: the
window-capture and decode-ring plans and the contexts (`begin_step`), and the due check, for 7 and 64
running requests at budget 1.0 (nothing to evict: the overhead budget 1.0 pays) and at lifetime budgets.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from vllm_kvcomp.config import build_config
from vllm_kvcomp.engine.decode_planning import decode_budgets, logical_pages

try:  # the round's page table in one pass (before: one table per request, then padded)
    from vllm_kvcomp.engine.decode_planning import logical_page_table
except ImportError:  # pragma: no cover - older checkouts
    logical_page_table = None  # type: ignore[assignment]
from vllm_kvcomp.engine.layout import cdiv
from vllm_kvcomp.engine.reeviction import RequestLayout, plan_reeviction

try:  # plans of shapes seen before, moved (2026-12-02); before it every plan was made
    from vllm_kvcomp.engine.plan_cache import PlanCache
except ImportError:  # pragma: no cover - older checkouts
    PlanCache = None  # type: ignore[assignment,misc]

try:  # absent before the compaction rows were vectorised (then that stage is not timed)
    from vllm_kvcomp.engine.executor import compaction_rows
except ImportError:  # pragma: no cover - older checkouts
    compaction_rows = None  # type: ignore[assignment]


def replay(args) -> dict[str, list[float]]:
    """Seconds per stage for each eviction of one request's life."""
    config = build_config(method="uniform", budget=str(args.budget), overrides={"evict_every": args.evict_every})
    L, bs, N = args.layers, args.block_size, args.blocks_per_layer
    layout, ratios = RequestLayout.uncompressed(L, bs), np.ones(L)
    row = list(range(1, cdiv(args.prompt, bs) + 1))
    next_id, seq_len = len(row) + 1, args.prompt
    times: dict[str, list[float]] = defaultdict(list)
    # as DecodePlanner plans (through its cache, where the checkout has one); --no-plan-cache: every plan made
    make_plan = PlanCache().plan if PlanCache is not None and args.plan_cache else plan_reeviction

    def timed(stage, fn, *a):
        start = time.perf_counter()
        out = fn(*a)
        times[stage].append(time.perf_counter() - start)
        return out

    def timed_round(stage, fn, *a):
        """A stage vectorised over the round: run once for `--requests` copies, per request."""
        start = time.perf_counter()
        fn(*a)
        times[stage].append((time.perf_counter() - start) / args.requests)

    while seq_len + args.evict_every <= args.prompt + args.output:
        seq_len += args.evict_every
        while len(row) < cdiv(seq_len, bs):  # the scheduler's new blocks, appended to the row
            row.append(next_id)
            next_id += 1
        budgets = timed("budgets", decode_budgets, ratios, config, seq_len)
        plan = timed("plan", make_plan, layout, budgets, seq_len, config.num_sinks, config.num_recent)
        if plan is None:
            continue
        if hasattr(plan, "precompute"):  # with the plan, in the step that plans ahead
            timed("precompute", plan.precompute)
        R = args.requests
        if hasattr(plan, "rewritten_row"):  # the evictor converts the row to an array once per request
            ids = timed("row_array", np.asarray, row, np.int64)
        else:  # pragma: no cover - older checkouts: every stage took the list
            ids = row
        if logical_page_table is not None:  # the round's table at once
            timed_round("logical_pages", logical_page_table, [plan.before] * R, [ids] * R, [seq_len] * R, N)
        else:  # pragma: no cover - older checkouts
            timed("logical_pages", logical_pages, plan.before, ids, seq_len, N)
        if compaction_rows is not None:  # vectorised over the round since 2026-11-30's second session
            timed_round("compaction_rows", compaction_rows, [plan] * R, range(L), bs, True)
        rewrite = plan.rewritten_row if hasattr(plan, "rewritten_row") else plan.new_row
        new_ids = timed("new_row", rewrite, ids)
        timed("page_copies", plan.page_copies, ids, N, new_ids)
        timed("rehomed_ids", plan.rehomed_ids, ids)
        timed("freed_ids", plan.freed_ids, ids)
        timed("publish_host", _publish_host, plan, new_ids, N)
        new_row = timed("row_list", new_ids.tolist) if isinstance(new_ids, np.ndarray) else new_ids
        row, layout = new_row, plan.after
    return times


def _publish_host(plan, row, blocks_per_layer: int):
    """The host arrays `LayerPageState.publish` builds per request (engine/layer_state.py)."""
    ids = np.asarray(row, dtype=np.int64)
    ent = plan.entry_array
    return ent[:, 1] * blocks_per_layer + ids[ent[:, 0]], ent[:, 3] * blocks_per_layer + ids[ent[:, 2]]


def decode_batch(req_ids: list[str], contexts: np.ndarray):
    """vLLM's InputBatch for one decode token per request (runner indices 1..n), at `contexts`."""
    import torch

    n = len(req_ids)
    return SimpleNamespace(
        req_ids=req_ids,
        num_reqs=n,
        idx_mapping=torch.arange(1, n + 1, dtype=torch.int32),
        idx_mapping_np=np.arange(1, n + 1, dtype=np.int32),
        is_prefilling_np=np.zeros(n, dtype=bool),
        query_start_loc_np=np.arange(n + 1, dtype=np.int32),
        num_computed_tokens_np=contexts,
        num_scheduled_tokens=np.ones(n, dtype=np.int32),
    )


def per_step(budget: str, running: int, steps: int = 500) -> float:
    """Microseconds of host work per decode step for `running` requests at `budget` on a real runtime
    (CPU): `begin_step` (window capture plan, decode-ring plan, contexts) and the due check of
    `end_step`'s decode evictor (its due check, and `plan_ahead`'s look at a few requests). The
    followed requests are in the state after a prefill eviction that freed nothing; their contexts
    advance by one per step and never reach the next due context, and the warm-up of `every`
    steps makes their plans ahead, so what is timed is the per-step work alone."""
    import torch

    from vllm_kvcomp.config import request_config
    from vllm_kvcomp.engine.requests import DecodeState
    from vllm_kvcomp.engine.runtime import CompressionRuntime

    L, hkv, group, dim, bs = 16, 8, 4, 64, 16
    server = build_config(method="uniform", budget="0.2", overrides={"metrics_port": None, "evict_every": 128})
    runtime = CompressionRuntime(server, vllm_config=None)
    runtime.setup(
        layer_names=[f"model.layers.{i}.attn" for i in range(L)],
        pool=torch.zeros(L * 8, 2, bs, hkv, dim, dtype=torch.bfloat16),
        blocks_per_layer=8, block_size=bs, num_heads=hkv * group, scale=dim**-0.5, max_reqs=running + 1, width=8,
    )  # fmt: skip
    config = request_config(server, {"kv_budget": float(budget)}, block_size=bs)
    for i in range(running):
        runtime.add_request(f"r{i}", index=i + 1, block_ids=[1], prompt_len=2000, config=config)
        req = runtime.requests[f"r{i}"]
        if req.evicts_while_decoding and hasattr(DecodeState, "after_prefill"):  # as after its prefill eviction
            req.decode = DecodeState.after_prefill(None, None, 0, 2000, L, bs)
    req_ids = [f"r{i}" for i in range(running)]
    every = server.evict_every  # contexts 2000 .. 2000 + every - 2, again and again: never due

    def run(count: int) -> None:
        for k in range(count):
            runtime.begin_step(decode_batch(req_ids, np.full(running, 2000 + k % (every - 1), dtype=np.int32)))
            runtime.decode_evictor.step()

    run(every)
    start = time.perf_counter()
    run(steps)
    return 1e6 * (time.perf_counter() - start) / steps


def summarize(times: dict[str, list[float]], requests: int) -> dict:
    evictions = len(times["plan"])
    stages = {stage: 1e6 * sum(t) / max(1, len(t)) for stage, t in times.items()}
    per_eviction = sum(stages.values())
    ahead = ("budgets", "plan", "precompute")  # made in an earlier step by DecodePlanner.plan_ahead
    in_due_step = per_eviction - sum(stages.get(stage, 0.0) for stage in ahead)
    return {
        "evictions": evictions,
        "us_per_request_eviction": stages,
        "us_per_request_eviction_total": per_eviction,
        f"ms_per_round_of_{requests}": per_eviction * requests / 1e3,
        # with plans made ahead (engine/decode_planning.py), what is left for the due step
        f"ms_per_round_of_{requests}_in_due_step": in_due_step * requests / 1e3,
    }


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the runtime's warm-up runs its kernels (CPU)
    parser = argparse.ArgumentParser(prog="python -m bench.decode_host_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--blocks-per-layer", type=int, default=5120)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--output", type=int, default=16384)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--evict-every", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64, help="due together: the round the GPU waits for")
    parser.add_argument("--repeats", type=int, default=3, help="lives replayed; the fastest is reported")
    parser.add_argument(
        "--no-plan-cache", dest="plan_cache", action="store_false", help="make every plan (as before PlanCache)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from bench.offline import bench_header, cpu_name, write_json

    runs = [summarize(replay(args), args.requests) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["us_per_request_eviction_total"])
    device = f"CPU: {cpu_name()} (Python {platform.python_version()}, numpy {np.__version__})"
    result = {
        **bench_header("bench.decode_host_cost", argv, device, args),
        **best,
        # every decode step, evicting or not: fastest of `repeats`
        "us_per_step": {
            f"budget {budget}, {running} running": min(per_step(budget, running) for _ in range(args.repeats))
            for budget, running in (("1.0", 7), ("1.0", 64), ("0.2", 64), (str(args.budget), 64))
        },
    }
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
