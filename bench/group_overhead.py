"""Scheduler cost of one KV cache group per layer vs one group for all layers.

Why the plugin keeps all layers in one KV cache group (vllm_kvcomp/engine/kv_cache.py):
this drives vLLM 0.25.1's real KVCacheManager (NoPrefixCache coordinator, BlockPool,
FullAttentionManager) through decode steps of R running requests and times
`allocate_slots`, the per-request call the scheduler makes every step.

    python bench/group_overhead.py [--layers 32] [--requests 256] [--steps 64]

CPU-only; prints a markdown table (committed in bench/results/group_overhead.md).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
from vllm.v1.request import Request

BS = 16


def manager(num_layers: int, per_layer_groups: bool, num_blocks: int) -> KVCacheManager:
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    names = [f"layers.{i}.attn" for i in range(num_layers)]
    if per_layer_groups:
        groups = [KVCacheGroupSpec([n], spec) for n in names]
        tensors = [KVCacheTensor(size=spec.page_size_bytes * num_blocks, shared_by=names)]
    else:
        groups = [KVCacheGroupSpec(names, spec)]
        tensors = [KVCacheTensor(size=spec.page_size_bytes * num_blocks, shared_by=[n]) for n in names]
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=tensors, kv_cache_groups=groups)
    return KVCacheManager(
        config, max_model_len=65536, scheduler_block_size=BS, hash_block_size=BS, enable_caching=False
    )


def decode_step_ms(num_layers: int, per_layer: bool, requests: int, steps: int, prompt: int) -> float:
    blocks_per_req = (prompt + steps) // BS + 2
    m = manager(num_layers, per_layer, requests * blocks_per_req * (num_layers if per_layer else 1) + 8)
    reqs = []
    for i in range(requests):
        r = Request(f"r{i}", list(range(prompt)), SamplingParams(max_tokens=steps + 1), None)
        assert m.allocate_slots(r, prompt) is not None
        r.num_computed_tokens = prompt
        reqs.append(r)
    t0 = time.perf_counter()
    for _ in range(steps):
        for r in reqs:
            assert m.allocate_slots(r, 1) is not None
            r.num_computed_tokens += 1
            r.append_output_token_ids(0)
    return (time.perf_counter() - t0) * 1000 / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1000)
    args = ap.parse_args()
    print(
        f"vLLM KVCacheManager.allocate_slots per decode step, {args.requests} running requests, "
        f"{args.steps} steps, {platform.processor() or platform.machine()}, Python {platform.python_version()}\n"
    )
    print("| layers | one group (ms/step) | one group per layer (ms/step) | ratio |")
    print("| --- | --- | --- | --- |")
    for layers in args.layers:
        one = min(decode_step_ms(layers, False, args.requests, args.steps, args.prompt) for _ in range(2))
        per = min(decode_step_ms(layers, True, args.requests, args.steps, args.prompt) for _ in range(2))
        print(f"| {layers} | {one:.2f} | {per:.2f} | {per / one:.1f}x |")


if __name__ == "__main__":
    main()
