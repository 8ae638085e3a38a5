"""GPU cost of the decode ring's write per decode step, as a FULL CUDA graph replays it (one GPU).

    python -m bench.ring_cost --out bench/results/lifetime/ring_cost.json

With `evict_every` set, attention writes every layer's query rows and their LSE into the decode ring
(engine/decode_ring.py) at every step, for every batch: one `record_queries_` launch per layer, also
for requests that are never evicted while decoding (budget 1.0: their rows go to the scratch row).
This captures the L writes of one step in a CUDA graph, as vLLM's FULL graphs hold them, and times
its replay against a graph of L tiny kernels (`add_` on one element: what any graph node costs) and
a graph of one such kernel (the replay itself). The difference from the tiny-kernel graph is the
writes' own work; the tiny-kernel graph is what L extra graph nodes cost at all. Reported in µs per
step, and as a share of `--tpot-ms` (decode-heavy's per-step time at budget 1.0 on the H200:
bench/results/throughput.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def replay_us(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Median of 5 timings of `replays` back-to-back replays, µs per replay."""
    for _ in range(20):
        graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(1000 * start.elapsed_time(end) / replays)
    return sorted(times)[2]


def capture(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def measure(args, tokens: int) -> dict:
    from vllm_kvcomp.kernels import record_queries_

    L, H, D, W, slots, dev = args.layers, args.heads, args.head_dim, args.window, args.slots, "cuda"
    ring = torch.zeros(L, slots + 1, W, H, D, dtype=torch.bfloat16, device=dev)
    ring_lse = torch.zeros(L, slots + 1, W, H, dtype=torch.float32, device=dev)
    queries = torch.randn(L, tokens, H, D, dtype=torch.bfloat16, device=dev)
    lse = torch.randn(L, H, tokens, dtype=torch.float32, device=dev)
    scratch = slots * W
    # tracked: every token to its own row (the plugin's budgets); untracked: all to scratch (budget 1.0)
    rows = {"tracked": torch.arange(tokens, device=dev) * W, "untracked": torch.full((tokens,), scratch, device=dev)}
    one = torch.zeros(1, device=dev)
    out = {"tokens": tokens}
    for name, dst in rows.items():
        dst = dst.to(torch.int64)

        def writes(dst=dst):
            for layer in range(L):
                record_queries_(ring[layer], ring_lse[layer], dst, queries[layer], lse[layer])

        out[f"ring_writes_{name}_us"] = replay_us(capture(writes), args.replays)
    out["tiny_kernels_us"] = replay_us(capture(lambda: [one.add_(1) for _ in range(L)]), args.replays)
    out["one_kernel_us"] = replay_us(capture(lambda: one.add_(1)), args.replays)
    moved = 2 * L * tokens * H * (D * 2 + 4)  # bytes read + written: queries (bf16) and LSE (fp32)
    out["ring_writes_tracked_GBps"] = moved / (out["ring_writes_tracked_us"] * 1e-6) / 1e9
    for name in rows:
        out[f"share_of_tpot_{name}"] = (out[f"ring_writes_{name}_us"] - out["one_kernel_us"]) / (1000 * args.tpot_ms)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ring_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32, help="query heads (llama-1b)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=32, help="decode_window")
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--tokens", default="8,32,64", help="decode tokens per step (CUDA-graph batch sizes)")
    parser.add_argument("--replays", type=int, default=2000)
    parser.add_argument("--tpot-ms", type=float, default=2.8, help="the step the writes are a share of")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from bench.offline import bench_header, write_json

    result = {
        **bench_header("bench.ring_cost", argv, torch.cuda.get_device_name(), args),
        "torch": torch.__version__,
        "results": [measure(args, int(t)) for t in args.tokens.split(",")],
    }
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
