"""The plugin's scheduler inside vLLM 0.25.1's real Scheduler / AsyncScheduler, KVCacheManager and BlockPool.

A fake worker plays the model runner and the runtime's bookkeeping (block lists
from the scheduler outputs, the planner's block plan when a prompt completes),
so every eviction report is what the GPU worker would send. Random streams
(hypothesis) mix per-request budgets and "none", preemption under a small KV
pool, resume (re-prefill of prompt + output), aborts that land between the
prefill and its report (async scheduling delays reports by a step), and
eviction failures. After every step: no block is held twice or leaked, and a
request holds exactly cdiv(tokens, block) - evicted blocks; at the end the pool
is whole again and the plugin's per-request state is gone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vllm_kvcomp
from vllm_kvcomp import planner
from vllm_kvcomp.config import build_config, request_config
from vllm_kvcomp.engine.kv_cache import CompressedAttentionSpec
from vllm_kvcomp.engine.layout import cdiv
from vllm_kvcomp.engine.records import CompressionReport, EvictionRecord, SkipRecord
from vllm_kvcomp.policies import LayerStats

vllm_kvcomp.register()

BS, LAYERS, NUM_BLOCKS = 16, 4, 48


CONFIG_MAKER = """
import json, pickle, sys
import vllm.platforms as platforms
from vllm.platforms.cpu import CpuPlatform
platforms._current_platform = CpuPlatform()  # before vLLM's config modules capture the platform
from vllm.engine.arg_utils import EngineArgs
model, layers, bs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(model + "/config.json", "w") as f:
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
               "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_hidden_layers": layers, "vocab_size": 1000, "max_position_embeddings": 4096}, f)
args = EngineArgs(model=model, skip_tokenizer_init=True, max_model_len=1024, block_size=bs, max_num_seqs=6,
                  max_num_batched_tokens=256, enable_prefix_caching=False)
with open(out, "wb") as f:
    pickle.dump(args.create_engine_config(), f)
"""


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    """vLLM's real VllmConfig for a tiny Llama, built in a fresh process on the CPU platform."""
    import pickle
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("tiny-llama")
    out = work / "config.pkl"
    cmd = [sys.executable, "-c", CONFIG_MAKER, str(work), str(LAYERS), str(BS), str(out)]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    config = pickle.loads(out.read_bytes())
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    return config


def make_scheduler(vllm_config, method: str, async_scheduling: bool):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_kvcomp.engine.scheduler import AsyncCompressionScheduler, CompressionScheduler

    vllm_config.additional_config = {
        "kv_compression": {"method": method, "budget": 0.25, "num_recent": 16, "window": 8}
    }
    spec = CompressedAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    names = [f"layers.{i}" for i in range(LAYERS)]
    kv = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[KVCacheTensor(size=spec.page_size_bytes * NUM_BLOCKS, shared_by=[n]) for n in names],
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
    )
    cls = AsyncCompressionScheduler if async_scheduling else CompressionScheduler
    scheduler = cls(
        vllm_config=vllm_config, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BS, log_stats=True,
    )  # fmt: skip
    scheduler.use_v2_model_runner = True  # as on a GPU: resumed requests come back to the worker as new
    return scheduler


class FakeWorker:
    """The runner's and the runtime's host bookkeeping, with the planner's real block plans."""

    def __init__(self, server, rng: np.random.Generator, fail_rate: float):
        self.server, self.rng, self.fail_rate = server, rng, fail_rate
        self.blocks: dict[str, list[int]] = {}
        self.prompt: dict[str, int] = {}
        self.prefill: dict[str, int] = {}
        self.computed: dict[str, int] = {}
        self.config: dict = {}
        self.evictions = 0

    def step(self, out):
        from vllm.v1.outputs import ModelRunnerOutput

        for req_id in out.finished_req_ids | (out.preempted_req_ids or set()):
            for table in (self.blocks, self.prompt, self.prefill, self.computed, self.config):
                table.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            self.blocks[new.req_id] = list(new.block_ids[0])
            self.prompt[new.req_id] = len(new.prompt_token_ids)  # the original prompt, also when resumed
            self.prefill[new.req_id] = len(new.prefill_token_ids)
            self.computed[new.req_id] = new.num_computed_tokens
            self.config[new.req_id] = request_config(self.server, new.sampling_params.extra_args)
        cached = out.scheduled_cached_reqs
        for req_id, new_blocks in zip(cached.req_ids, cached.new_block_ids):
            if new_blocks is not None:
                self.blocks[req_id].extend(new_blocks[0])
        report, req_ids, sampled = CompressionReport(), [], []
        for req_id, n in out.num_scheduled_tokens.items():
            before, after = self.computed[req_id], self.computed[req_id] + n
            self.computed[req_id] = after
            req_ids.append(req_id)
            sampled.append([int(self.rng.integers(1, 999))] if after >= self.prefill[req_id] else [])
            if before < self.prompt[req_id] <= after:  # the prompt completes: the runtime compresses now
                self._compress(req_id, report)
        output = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                   sampled_token_ids=sampled)  # fmt: skip
        output.kvcomp_report = report if report else None
        return output

    def _compress(self, req_id: str, report: CompressionReport) -> None:
        config, prompt = self.config[req_id], self.prompt[req_id]
        if not config.should_compress(prompt):
            return
        draw = self.rng.random()
        if draw < self.fail_rate:  # eviction failed after compaction: finished with an error
            report.failures.append(SkipRecord(req_id, "eviction_error_compact"))
            return
        if draw < 2 * self.fail_rate:  # failed before: served uncompressed
            report.skips.append(SkipRecord(req_id, "eviction_error_score"))
            return
        stats = LayerStats(mba=self.rng.uniform(1, prompt, LAYERS), local_mass=self.rng.uniform(0, 1, LAYERS))
        plan = planner.plan(config, stats, prompt, LAYERS, BS)
        if plan is None:
            return
        freed = [self.blocks[req_id][i] for i in plan.freed_block_indices]
        report.evictions.append(EvictionRecord(req_id, freed, prompt, plan.kept_tokens.tolist()))
        self.evictions += 1


def check_accounting(scheduler) -> None:
    manager = scheduler.kvcomp_manager
    pool = scheduler.kv_cache_manager.block_pool
    held = [b.block_id for blocks in manager.req_to_blocks.values() for b in blocks if not b.is_null]
    assert len(held) == len(set(held)), "a block is held by two requests"
    assert pool.get_num_free_blocks() + len(held) == NUM_BLOCKS - 1, "a block leaked or was freed twice"
    for req_id, blocks in manager.req_to_blocks.items():
        request = scheduler.requests.get(req_id)
        if request is None or not blocks:
            continue
        tokens = request.num_computed_tokens
        expected = cdiv(tokens, BS) - manager.evicted_blocks.get(req_id, 0)
        assert expected <= len(blocks) <= expected + cdiv(scheduler.max_num_scheduled_tokens, BS), (req_id, tokens)


def run_stream(scheduler, worker, requests, aborts, max_steps=600):
    """Drive the scheduler like EngineCore (one step of delay for async scheduling); returns finish reasons."""
    from vllm.v1.request import RequestStatus

    for request in requests:
        scheduler.add_request(request)
    finished, in_flight, preempted = {}, [], 0
    for step in range(max_steps):
        for req_id in aborts.get(step, []):
            scheduler.finish_requests([req_id], RequestStatus.FINISHED_ABORTED)
        out = scheduler.schedule()
        preempted += len(out.preempted_req_ids or ())
        in_flight.append((out, worker.step(out)))
        depth = 2 if scheduler.__class__.__name__.startswith("Async") else 1
        while len(in_flight) >= depth or (in_flight and not scheduler.has_requests()):
            done_out, result = in_flight.pop(0)
            for outputs in scheduler.update_from_output(done_out, result).values():
                for o in outputs.outputs:
                    if o.finish_reason is not None:
                        finished[o.request_id] = str(o.finish_reason)
            check_accounting(scheduler)
        if not scheduler.has_requests() and not in_flight:
            break
    return finished, preempted


def make_requests(lengths, outputs, overrides):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    requests = []
    for i, (p, o, extra) in enumerate(zip(lengths, outputs, overrides)):
        params = SamplingParams(max_tokens=o, ignore_eos=True, extra_args=extra or None)
        requests.append(Request(f"r{i}", list(range(3, 3 + p)), params, None, arrival_time=float(i)))
    return requests


OVERRIDES = st.sampled_from([{}, {"kv_budget": 0.1}, {"kv_budget": 0.5}, {"kv_compression": "none"},
                             {"kv_compression": "zigzag", "kv_budget": 0.2}, {"kv_budget": 64}])  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    num=st.integers(1, 8),
    async_scheduling=st.booleans(),
    fail_rate=st.sampled_from([0.0, 0.15]),
    seed=st.integers(0, 2**16),
)
def test_random_streams_keep_the_block_pool_whole(vllm_config, data, num, async_scheduling, fail_rate, seed):
    scheduler = make_scheduler(vllm_config, "uniform", async_scheduling)
    server = build_config(method="uniform", budget=0.25, overrides={"num_recent": 16, "window": 8})
    worker = FakeWorker(server, np.random.default_rng(seed), fail_rate)
    lengths = data.draw(st.lists(st.integers(20, 500), min_size=num, max_size=num))
    outputs = data.draw(st.lists(st.integers(1, 60), min_size=num, max_size=num))
    overrides = data.draw(st.lists(OVERRIDES, min_size=num, max_size=num))
    aborts: dict[int, list[str]] = {}
    for i in range(num):
        if data.draw(st.booleans()) and data.draw(st.booleans()):  # a quarter of them
            aborts.setdefault(data.draw(st.integers(0, 40)), []).append(f"r{i}")
    finished, _ = run_stream(scheduler, worker, make_requests(lengths, outputs, overrides), aborts)
    assert not scheduler.has_requests(), "the stream did not drain"
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    assert not scheduler.kvcomp_manager.req_to_blocks and not scheduler.kvcomp_manager.evicted_blocks
    aborted = {r for ids in aborts.values() for r in ids}
    for i in range(num):
        if f"r{i}" not in aborted:
            assert f"r{i}" in finished, f"r{i} never finished"


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_resume_and_failures_under_pressure(vllm_config, async_scheduling):
    """A fixed heavy stream: preemptions happen, compressed requests free blocks, failures end one request."""
    scheduler = make_scheduler(vllm_config, "uniform", async_scheduling)
    server = build_config(method="uniform", budget=0.25, overrides={"num_recent": 16, "window": 8})
    worker = FakeWorker(server, np.random.default_rng(7), fail_rate=0.1)
    requests = make_requests([300, 250, 280, 200, 260, 240], [400, 350, 420, 300, 380, 360], [{}] * 6)
    finished, preempted = run_stream(scheduler, worker, requests, aborts={}, max_steps=5000)
    assert preempted > 0, "the stream was meant to preempt"
    assert worker.evictions > 0
    assert set(finished) == {f"r{i}" for i in range(6)}
    assert "error" in finished.values() or worker.fail_rate == 0
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
