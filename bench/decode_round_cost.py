"""Host cost of whole rounds of decode evictions on the CPU: the evictor's real path, kernels stood in.

    python -m bench.decode_round_cost --out bench/results/lifetime/decode_round_cost.json

On the H200 the evictions of the 1B long-generation run are host-bound: at budget 1024 the host spent
0.36 ms per request and eviction (about 23 ms per round of 64), the CUDA events around the same
batches 0.33 ms (bench/results/lifetime/h200_plan_ahead/). The replay of the planning functions
(bench/decode_host_cost.py) leaves only about 5 ms of a round in the due step, so this runs the rest
too: a `CompressionRuntime` with the 1B geometry's layers and blocks (16 layers, blocks of 16; heads
tiny by default, see `--kv-heads`) follows `--requests` requests of `--prompt` tokens at token
budget `--budget` and `evict_every` through decode steps (`begin_step`: the ring's plan and the
contexts; `end_step`: the due check, the round, planning ahead), with the scheduler's new blocks
appended and freed ids recycled.

The kernels (score-gather, selection, compaction, page copies) are replaced by stand-ins that return
tensors of the right shapes without computing, so what is timed is the host's own work: planning,
the torch ops between the kernels, host-to-device copies, publishing and the records. On a GPU each
of those torch ops is a launch, which costs the host more than a CPU op; `aten_ops_per_round` counts
them (torch.profiler) and `kernel_calls_per_round` the stand-ins' calls. `top_own_time` lists the
functions with the most own time over the rounds (cProfile).

    python -m bench.decode_round_cost --requests 30 --stagger --steps 256 [--no-join]

times every step instead (`host_ms_per_step`, after two intervals), with the requests admitted
over the first interval, as requests that reach the engine at different steps: they come due at
different steps, and the rounds are as many as requests unless they join each other's
(`JOIN_FRACTION`, engine/decode_eviction.py; `--no-join` turns that off).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import platform
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.decode_host_cost import decode_batch
from vllm_kvcomp.config import build_config
from vllm_kvcomp.engine.layout import cdiv


class StandIns:
    """The eviction kernels, replaced: right shapes, no compute; calls counted."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    @contextlib.contextmanager
    def installed(self):
        """The stand-ins in place of the kernels (and `selection_scores`) while inside; restored after."""
        import vllm_kvcomp.kernels as kernels

        from vllm_kvcomp.engine import executor

        names = ("score_gather", "select_keep_indices", "compact_kv_", "copy_pages_")
        saved = [getattr(kernels, name) for name in names], executor.selection_scores
        for name in names:
            setattr(kernels, name, getattr(self, name))
        executor.selection_scores = self.selection_scores
        try:
            yield self
        finally:
            for name, original in zip(names, saved[0]):
                setattr(kernels, name, original)
            executor.selection_scores = saved[1]

    def score_gather(self, queries, window_lens, pool, pages, lens, *, max_seq_len=None, **_):
        from vllm_kvcomp.kernels.reference import ScoreOutput

        self.calls["score_gather"] += 1
        shape = (pages.shape[0], pool.shape[3], int(max_seq_len or pages.shape[1] * pool.shape[2]))
        return ScoreOutput(torch.empty(shape), torch.empty(shape))

    def selection_scores(self, scores, *_, **__):
        self.calls["selection_scores"] += 1
        return scores

    def select_keep_indices(self, scores, lens, keep, *_, max_keep=None, **__):
        self.calls["select_keep_indices"] += 1
        return torch.arange(int(max_keep)).expand(scores.shape[0], scores.shape[1], -1)

    def compact_kv_(self, *_, **__):
        self.calls["compact_kv_"] += 1

    def copy_pages_(self, *_, **__):
        self.calls["copy_pages_"] += 1


class Harness:
    """One runtime and the scheduler side around it: block allocation, recycling, the runner's row writes."""

    def __init__(self, args) -> None:
        from vllm_kvcomp.engine.runtime import CompressionRuntime

        if args.prompt > args.budget:  # no prefill here: requests are followed from their prompt on
            raise SystemExit("decode_round_cost: --prompt must be within --budget (no prefill eviction is run)")
        L, hkv, group, dim, bs = args.layers, args.kv_heads, args.group, args.head_dim, 16
        self.args, self.bs = args, bs
        config = build_config(
            method="uniform", budget=str(args.budget), overrides={"metrics_port": None, "evict_every": args.evict_every}
        )
        per_request = cdiv(args.prompt + args.rounds * args.evict_every + args.evict_every, bs) + 8
        N = args.requests * per_request + 1
        width = cdiv(args.prompt + (args.rounds + 2) * args.evict_every, bs)
        self.rt = CompressionRuntime(config, vllm_config=None)
        pool = torch.empty(L * N, 2, bs, hkv, dim, dtype=torch.bfloat16)  # never touched: no memory committed
        self.rt.setup(
            layer_names=[f"model.layers.{i}.attn" for i in range(L)], pool=pool, blocks_per_layer=N,
            block_size=bs, num_heads=hkv * group, scale=dim**-0.5, max_reqs=args.requests + 1, width=width,
        )  # fmt: skip
        self.free = list(range(N - 1, 0, -1))
        self.context: dict[str, int] = {}
        self.req_ids: list[str] = []
        if not args.stagger:  # else admitted during the first interval (`_steps`)
            for i in range(args.requests):
                self.admit(i)

    def admit(self, i: int) -> None:
        req_id, prompt = f"r{i}", self.args.prompt
        blocks = [self.free.pop() for _ in range(cdiv(prompt, self.bs))]
        self.rt.add_request(req_id, index=i + 1, block_ids=blocks, prompt_len=prompt)
        self.context[req_id] = prompt
        self.req_ids.append(req_id)

    def due_next(self) -> bool:
        """Whether the next step evicts: some request's context reaches its last eviction + evict_every."""
        for req_id in self.req_ids:
            state = self.rt.requests[req_id].decode
            if self.context[req_id] + 1 - (state.evicted_at if state else self.args.prompt) >= self.args.evict_every:
                return True
        return False

    def step(self) -> tuple[object, float]:
        """One decode step of every request: (its eviction report, host seconds of end_step)."""
        rt = self.rt
        contexts = np.array([self.context[r] for r in self.req_ids], dtype=np.int32)
        for req_id, ctx in zip(self.req_ids, contexts.tolist()):
            if ctx % self.bs == 0:  # the scheduler's new block for this step's token
                rt.append_blocks(req_id, [self.free.pop()])
        rt.begin_step(decode_batch(self.req_ids, contexts))
        start = time.perf_counter()
        report = rt.end_step()
        seconds = time.perf_counter() - start
        for req_id in self.req_ids:
            self.context[req_id] += 1
        for record in report.evictions if report else []:
            self.free.extend(record.freed_block_ids)  # the scheduler frees them
        rt.decode_evictor.take_row_writes()
        return report, seconds


def run(args) -> dict:
    """`--rounds` rounds timed as they run, then one more under torch.profiler and cProfile; or,
    with `--steps`, that many steps (every round they hold) timed as they run."""
    from vllm_kvcomp.engine import decode_eviction

    stand_ins, join = StandIns(), decode_eviction.JOIN_FRACTION
    if args.no_join:  # a request would have to grow by 10 intervals to join a round: never
        decode_eviction.JOIN_FRACTION = 10.0
    try:
        with stand_ins.installed():
            return _steps(args, stand_ins) if args.steps else _rounds(args, stand_ins)
    finally:
        decode_eviction.JOIN_FRACTION = join


def _steps(args, stand_ins: StandIns) -> dict:
    """Host time of `--steps` decode steps after two intervals (every request followed), per step."""
    harness = Harness(args)
    for step in range(2 * args.evict_every):  # --stagger: request i admitted at step i * every / requests
        admitted = len(harness.req_ids)
        while args.stagger and admitted < args.requests and step >= admitted * args.evict_every // args.requests:
            harness.admit(admitted)
            admitted += 1
        harness.step()
    rounds, total = [], 0.0
    for _ in range(args.steps):
        record = _timed_step(harness, stand_ins)
        total += record["ms"] / 1e3
        if record["requests"]:
            rounds.append(record)
    return {
        "steps": args.steps,
        "host_ms_per_step": 1e3 * total / args.steps,
        "host_ms_in_rounds": sum(r["ms"] for r in rounds),
        "rounds_per_interval": len(rounds) * args.evict_every / args.steps,
        "requests_per_round_mean": float(np.mean([r["requests"] for r in rounds])) if rounds else 0.0,
        "rounds": rounds,
    }


def _timed_step(harness: Harness, stand_ins: StandIns) -> dict:
    """One step: the requests it evicted, its host ms (end_step) and the stand-ins' calls in it."""
    calls_before = sum(stand_ins.calls.values())
    report, seconds = harness.step()
    requests = len(report.evictions) if report else 0
    return {"requests": requests, "ms": 1e3 * seconds, "kernel_calls": sum(stand_ins.calls.values()) - calls_before}


def _rounds(args, stand_ins: StandIns) -> dict:
    harness = Harness(args)
    rounds: list[dict] = []
    other_steps: list[float] = []
    ops, profile = 0, cProfile.Profile()
    while len(rounds) <= args.rounds:
        if not harness.due_next():
            other_steps.append(harness.step()[1])
            continue
        if len(rounds) < args.rounds:
            rounds.append(_timed_step(harness, stand_ins))
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profile.enable()
            harness.step()
            profile.disable()
        ops = sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))
        rounds.append({"profiled": True})
    stats = pstats.Stats(profile)
    own = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[: args.top]  # type: ignore[attr-defined]
    timed = [r for r in rounds if "ms" in r]
    return {
        "rounds": timed,
        "ms_per_round_fastest": min(r["ms"] for r in timed),
        "aten_ops_per_round": ops,
        "us_per_step_between_rounds": 1e6 * float(np.median(other_steps)) if other_steps else None,
        "top_own_time_profiled_round": [
            {"function": f"{Path(f).name}:{line}({name})", "calls": cc, "own_ms": 1e3 * tt, "cumulative_ms": 1e3 * ct}
            for (f, line, name), (cc, _nc, tt, ct, _callers) in own
        ],
    }


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the runtime's warm-up runs its kernels (CPU)
    parser = argparse.ArgumentParser(prog="python -m bench.decode_round_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--evict-every", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="time this many steps instead of --rounds rounds")
    parser.add_argument("--stagger", action="store_true", help="admit the requests over an interval (with --steps)")
    parser.add_argument("--no-join", action="store_true", help="no request joins another's round (JOIN_FRACTION)")
    # Tiny heads by default: copies of the ring's queries and the scores are data-bound on the CPU
    # (tens of ms at the 1B shape), microseconds on the GPU; the host's own work does not depend on them.
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--group", type=int, default=1, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from bench.offline import bench_header, cpu_name, write_json

    device = f"CPU: {cpu_name()} (Python {platform.python_version()}, torch {torch.__version__})"
    write_json({**bench_header("bench.decode_round_cost", argv, device, args), **run(args)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
