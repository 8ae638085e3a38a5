"""Scheduler-side accounting with vLLM 0.25.1's real KVCacheManager and BlockPool.

Random request streams (hypothesis): prefill, eviction reports (as the worker
sends them), decode growth, finish / abort / preemption. Invariants: the pool
never leaks or double-frees a block, a compressed request holds exactly
cdiv(tokens, bs) - evicted blocks, and freed blocks are immediately reusable.
"""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.request import Request

import vllm_kvcomp
from vllm_kvcomp.config import build_config
from vllm_kvcomp.engine.kv_cache import CompressedAttentionManager, CompressedAttentionSpec, bound_blocks
from vllm_kvcomp.engine.layout import cdiv, plan_eviction

BS = 16
LAYERS = 4

vllm_kvcomp.register()


def spec(cls=CompressedAttentionSpec):
    return cls(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)


def test_spec_is_registered_and_grouped_as_full_attention():
    s = spec()
    assert KVCacheSpecRegistry.get_manager_class(s) is CompressedAttentionManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(s) is FullAttentionSpec
    # built-ins survived our registration
    assert KVCacheSpecRegistry.get_manager_class(spec(FullAttentionSpec)).__name__ == "FullAttentionManager"
    # all layers of the model form ONE group (one block table), see engine/kv_cache.py
    from types import SimpleNamespace

    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False))
    groups = get_kv_cache_groups(cfg, {f"layers.{i}.attn": spec() for i in range(LAYERS)})
    assert len(groups) == 1 and len(groups[0].layer_names) == LAYERS
    assert isinstance(groups[0].kv_cache_spec, CompressedAttentionSpec)
    # the conversion keeps the page size (memory accounting unchanged)
    assert CompressedAttentionSpec.from_full_attention(spec(FullAttentionSpec)).page_size_bytes == s.page_size_bytes


def make_manager(num_blocks: int) -> KVCacheManager:
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[
            KVCacheTensor(size=spec().page_size_bytes * num_blocks, shared_by=[f"l{i}"]) for i in range(LAYERS)
        ],
        kv_cache_groups=[KVCacheGroupSpec([f"l{i}" for i in range(LAYERS)], spec())],
    )
    return KVCacheManager(config, max_model_len=8192, scheduler_block_size=BS, hash_block_size=BS, enable_caching=False)


def make_request(rid: str, prompt_len: int) -> Request:
    return Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=10_000), None)


def compressed_manager(manager: KVCacheManager) -> CompressedAttentionManager:
    (single,) = manager.coordinator.single_type_managers
    assert isinstance(single, CompressedAttentionManager)
    return single


def test_eviction_frees_blocks_and_shrinks_demand():
    manager = make_manager(200)
    single = compressed_manager(manager)
    free0 = manager.block_pool.get_num_free_blocks()
    req = make_request("a", 100)  # 7 blocks (6 full + boundary)
    blocks = manager.allocate_slots(req, 100)
    assert len(blocks.get_block_ids()[0]) == 7
    req.num_computed_tokens = 100
    plan = plan_eviction(np.array([36, 20, 40, 20]), prompt_len=100, block_size=BS)
    ids = manager.get_block_ids("a")[0]
    freed = [ids[i] for i in plan.freed_block_indices]
    # c = [2, 1, 3, 1] pages -> keep ceil(7 / 4) = 2 blocks, free blocks 2..5
    assert single.evict("a", freed) == len(freed) == 4
    assert manager.block_pool.get_num_free_blocks() == free0 - 7 + 4
    assert manager.get_block_ids("a")[0] == ids[:2] + ids[6:]
    # decode up to the boundary block's end needs nothing new; one more token needs 1 block
    assert manager.allocate_slots(req, 12).get_block_ids()[0] == []
    req.num_computed_tokens = 112
    new = manager.allocate_slots(req, 1).get_block_ids()[0]
    assert len(new) == 1 and len(manager.get_block_ids("a")[0]) == cdiv(113, BS) - 4
    manager.free(req)
    assert manager.block_pool.get_num_free_blocks() == free0
    assert "a" not in single.evicted_blocks


def test_stale_report_after_preemption_is_ignored():
    manager = make_manager(50)
    single = compressed_manager(manager)
    free0 = manager.block_pool.get_num_free_blocks()
    req = make_request("a", 100)
    ids = manager.allocate_slots(req, 100).get_block_ids()[0]
    manager.free(req)  # preempted before the report arrived
    assert single.evict("a", ids[3:6]) == 0
    assert manager.block_pool.get_num_free_blocks() == free0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_streams_never_leak(data):
    num_blocks = data.draw(st.integers(64, 400))
    manager = make_manager(num_blocks)
    single = compressed_manager(manager)
    free0 = manager.block_pool.get_num_free_blocks()
    live: dict[str, Request] = {}
    evicted: dict[str, int] = {}
    for step in range(data.draw(st.integers(5, 40))):
        action = data.draw(st.sampled_from(["new", "decode", "evict", "finish"]))
        if action == "new":
            rid = f"r{step}"
            req = make_request(rid, data.draw(st.integers(1, 600)))
            if manager.allocate_slots(req, req.num_tokens) is None:
                continue
            req.num_computed_tokens = req.num_tokens
            live[rid] = req
        elif action == "decode" and live:
            req = live[data.draw(st.sampled_from(sorted(live)))]
            n = data.draw(st.integers(1, 40))
            if manager.allocate_slots(req, n) is None:
                manager.free(req)  # preempt
                del live[req.request_id]
                evicted.pop(req.request_id, None)
                continue
            req.num_computed_tokens += n
            req.append_output_token_ids([0] * n)
        elif action == "evict" and live:
            rid = data.draw(st.sampled_from(sorted(live)))
            req = live[rid]
            if rid in evicted:
                continue
            budgets = np.array(
                data.draw(st.lists(st.integers(68, max(68, req.num_computed_tokens)), min_size=LAYERS, max_size=LAYERS))
            )
            plan = plan_eviction(budgets, req.num_computed_tokens, BS)
            if plan is None:
                continue
            ids = manager.get_block_ids(rid)[0]
            freed = [ids[i] for i in plan.freed_block_indices]
            before = manager.block_pool.get_num_free_blocks()
            assert single.evict(rid, freed) == len(freed)
            assert manager.block_pool.get_num_free_blocks() == before + len(freed)
            evicted[rid] = len(freed)
        elif action == "finish" and live:
            rid = data.draw(st.sampled_from(sorted(live)))
            manager.free(live.pop(rid))
            evicted.pop(rid, None)
        # invariant: each request holds exactly what its live tokens need
        held = 0
        for rid, req in live.items():
            n_blocks = len(manager.get_block_ids(rid)[0])
            assert n_blocks == cdiv(req.num_computed_tokens, BS) - evicted.get(rid, 0)
            held += n_blocks
        assert manager.block_pool.get_num_free_blocks() == free0 - held
    for req in live.values():
        manager.free(req)
    assert manager.block_pool.get_num_free_blocks() == free0
    assert not single.evicted_blocks


def decode_config(budget, evict_every=32, **options):
    overrides = {"num_recent": 16, "window": 8, "evict_every": evict_every, **options}
    return build_config(method="uniform", budget=budget, overrides=overrides)


def test_bound_blocks_arithmetic():
    # integer budget: ceil(B / bs) + 2 + evict_every / bs, whatever the length
    assert bound_blocks(decode_config(100), 300, 4000, BS) == cdiv(100, BS) + 2 + 2 == 11
    assert bound_blocks(decode_config(100, evict_every=64), 300, 4000, BS) == 7 + 2 + 4
    # fraction: B estimated at the longest context, prompt + max_tokens (capped by max_model_len)
    assert bound_blocks(decode_config(0.25), 300, 700, BS) == cdiv(250, BS) + 4 == 20
    assert bound_blocks(decode_config(0.25), 300, 700, BS, max_model_len=500) == cdiv(125, BS) + 4 == 12
    # never below the protected tokens (4 sinks + 16 recent = 20 -> 2 blocks)
    assert bound_blocks(decode_config(0.01), 300, 700, BS) == 2 + 4
    # never above the whole context
    assert bound_blocks(decode_config(100), 40, 20, BS) == cdiv(60, BS) == 4
    # unbounded (stock growth): no decode eviction, method none, prompt under min_prompt_len
    assert bound_blocks(decode_config(100, evict_every=None), 300, 4000, BS) is None
    assert bound_blocks(build_config(method="none"), 300, 4000, BS) is None
    assert bound_blocks(decode_config(100, min_prompt_len=301), 300, 4000, BS) is None
    assert bound_blocks(decode_config(100, min_prompt_len=300), 300, 4000, BS) == 11


def test_growth_reserve_follows_allocation_eviction_and_free():
    manager = make_manager(100)
    single = compressed_manager(manager)
    a, b = make_request("a", 100), make_request("b", 40)
    single.set_bound("a", 10)
    single.set_bound("b", 12)
    single.set_bound("c", 6)
    assert single.growth_reserve == 0  # nobody holds blocks: nothing runs
    # a newcomer needs max(its blocks now, its bound) + the reserve of the running requests
    assert manager.coordinator.get_num_blocks_to_allocate("a", 100, ((),), 0, 0, 100, True) == 10
    manager.allocate_slots(a, 100)  # 7 blocks of 10
    assert single.growth_reserve == 3
    assert manager.coordinator.get_num_blocks_to_allocate("b", 40, ((),), 0, 0, 40, True) == 12 + 3
    assert manager.coordinator.get_num_blocks_to_allocate("c", 50, ((),), 0, 0, 50, True) == 6 + 3
    # not the admission gate (no cap, or a running request): stock counts, no reserve
    assert manager.coordinator.get_num_blocks_to_allocate("b", 40, ((),), 0, 0, 40) == 3
    assert manager.coordinator.get_num_blocks_to_allocate("a", 120, ((),), 0, 100, 120, True) == 1
    manager.allocate_slots(b, 40)  # 3 of 12
    assert single.growth_reserve == 3 + 9
    a.num_computed_tokens = 100
    ids = manager.get_block_ids("a")[0]
    assert single.evict("a", ids[2:6]) == 4  # holds 3: may grow by 7
    assert single.growth_reserve == 7 + 9
    assert manager.allocate_slots(a, 100).get_block_ids()[0]  # 200 tokens - 64 evicted: 9 blocks
    assert single.growth_reserve == 1 + 9
    single.set_bound("b", None)  # served uncompressed: stock, unreserved
    assert single.growth_reserve == 1
    manager.free(a)  # preempted: holds nothing, reserves nothing, keeps its bound
    assert single.growth_reserve == 0 and single.bounds == {"a": 10, "c": 6}
    manager.free(b)
    assert single.growth_reserve == 0 and not single._reserved


def test_an_empty_pool_always_admits_a_request_that_fits():
    """The newcomer's bound is capped at the pool: alone, it is admitted as stock admits it."""
    manager = make_manager(20)
    single = compressed_manager(manager)
    single.set_bound("a", 50)
    assert manager.allocate_slots(make_request("a", 100), 100, full_sequence_must_fit=True) is not None
