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
from vllm_kvcomp.engine.decode_planning import decode_budgets
from vllm_kvcomp.engine.kv_cache import CompressedAttentionSpec
from vllm_kvcomp.engine.layout import cdiv, plan_eviction
from vllm_kvcomp.engine.records import CompressionReport, EvictionRecord, SkipRecord
from vllm_kvcomp.engine.reeviction import RequestLayout, plan_reeviction
from vllm_kvcomp.policies import LayerStats, make_policy

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


def make_scheduler(vllm_config, method: str, async_scheduling: bool, **options):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_kvcomp.engine.scheduler import AsyncCompressionScheduler, CompressionScheduler

    vllm_config.additional_config = {
        "kv_compression": {"method": method, "budget": 0.25, "num_recent": 16, "window": 8, **options}
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
        # decode-time eviction (evict_every): per request, its layout, last eviction and budget ratios
        self.follow: dict[str, dict] = {}
        self.decode_evictions = 0
        self.blocks: dict[str, list[int]] = {}
        self.prompt: dict[str, int] = {}
        self.prefill: dict[str, int] = {}
        self.computed: dict[str, int] = {}
        self.config: dict = {}
        self.evictions = 0

    def step(self, out):
        from vllm.v1.outputs import ModelRunnerOutput

        for req_id in out.finished_req_ids | (out.preempted_req_ids or set()):
            for table in (self.blocks, self.prompt, self.prefill, self.computed, self.config, self.follow):
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
            elif after > self.prefill[req_id] + self.server.decode_window:  # a decode step, the ring is full
                self._decode_evict(req_id, after, report)
        output = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                   sampled_token_ids=sampled)  # fmt: skip
        output.kvcomp_report = report if report else None
        return output

    def _compress(self, req_id: str, report: CompressionReport) -> None:
        config, prompt = self.config[req_id], self.prompt[req_id]
        if not config.should_compress(prompt):
            if config.enabled and config.evict_every is not None:  # within budget: followed from here
                self._follow(req_id, None, None, prompt)
            return
        draw = self.rng.random()
        if draw < self.fail_rate:  # eviction failed after compaction: finished with an error
            report.failures.append(SkipRecord(req_id, "eviction_error_compact"))
            return
        if draw < 2 * self.fail_rate:  # failed before: served uncompressed
            report.skips.append(SkipRecord(req_id, "eviction_error_score"))
            return
        stats = LayerStats(mba=self.rng.uniform(1, prompt, LAYERS), local_mass=self.rng.uniform(0, 1, LAYERS))
        budgets = make_policy(config).budgets(planner.budget_request(config, stats, prompt, LAYERS))
        plan = plan_eviction(budgets, prompt, BS)
        if config.evict_every is not None:
            self._follow(req_id, plan, budgets, prompt)
        if plan is None:
            return
        freed = [self.blocks[req_id][i] for i in plan.freed_block_indices]
        report.evictions.append(EvictionRecord(req_id, freed, prompt, plan.kept_tokens.tolist()))
        self.evictions += 1

    def _follow(self, req_id: str, plan, budgets, prompt: int) -> None:
        layout = RequestLayout.from_plan(plan) if plan is not None else RequestLayout.uncompressed(LAYERS, BS)
        average = self.config[req_id].average_budget(prompt)
        ratios = np.ones(LAYERS) if budgets is None else budgets / average
        self.follow[req_id] = dict(layout=layout, evicted_at=prompt, ratios=ratios)

    def _decode_evict(self, req_id: str, context: int, report: CompressionReport) -> None:
        """What engine/decode_eviction.py reports: the freed ids of the row, re-homed ids moved within it."""
        state, config = self.follow.get(req_id), self.config[req_id]
        if state is None or context - state["evicted_at"] < config.evict_every:
            return
        state["evicted_at"] = context
        draw = self.rng.random()
        if draw < self.fail_rate / 4:  # failed after compaction: finished with an error
            report.failures.append(SkipRecord(req_id, "decode_eviction_error_compact"))
            del self.follow[req_id]
            return
        if draw < self.fail_rate / 2:  # failed before: the layout stays, retried later
            report.deferred.append(SkipRecord(req_id, "decode_eviction_error_score"))
            return
        budgets = decode_budgets(state["ratios"], config, context)
        plan = plan_reeviction(state["layout"], budgets, context, config.num_sinks, config.num_recent)
        if plan is None:
            return
        row = self.blocks[req_id]
        freed = plan.freed_ids(row)
        self.blocks[req_id] = plan.new_row(row)
        state["layout"] = plan.after
        evicted = plan.before.live_tokens(context) - plan.kept_tokens
        report.evictions.append(
            EvictionRecord(
                req_id, freed, context, plan.kept_tokens.tolist(), phase="decode", evicted_tokens=list(evicted)
            )
        )
        self.decode_evictions += 1


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


DECODE_OVERRIDES = st.sampled_from([{}, {"kv_budget": 0.1}, {"kv_compression": "none"}, {"kv_budget": 64},
                                    {"kv_compression": "pyramid", "kv_budget": 80}])  # fmt: skip


def decode_server(evict_every: int):
    return build_config(
        method="uniform", budget=0.25, overrides={"num_recent": 16, "window": 8, "evict_every": evict_every}
    )


def check_bounded(scheduler, worker) -> None:
    """Section 1 of docs/LIFETIME-BUDGETS.md: a followed request holds at most
    ceil(B_avg / bs) + 2 + evict_every / bs blocks (+ the scheduled lookahead)."""
    manager = scheduler.kvcomp_manager
    lookahead = cdiv(scheduler.max_num_scheduled_tokens, BS)
    for req_id, state in worker.follow.items():
        request, blocks = scheduler.requests.get(req_id), manager.req_to_blocks.get(req_id)
        if request is None or not blocks or state["evicted_at"] <= worker.prompt[req_id]:
            continue  # not evicted while decoding yet
        config = worker.config[req_id]
        bound = cdiv(config.average_budget(request.num_computed_tokens), BS) + 2 + config.evict_every // BS
        assert len(blocks) <= bound + lookahead, (req_id, len(blocks), bound)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    num=st.integers(1, 6),
    async_scheduling=st.booleans(),
    fail_rate=st.sampled_from([0.0, 0.2]),
    evict_every=st.sampled_from([16, 32, 48]),
    seed=st.integers(0, 2**16),
)
def test_repeated_decode_evictions_keep_the_block_pool_whole(
    vllm_config, data, num, async_scheduling, fail_rate, evict_every, seed
):
    """Every request is evicted again and again while decoding (freed ids anywhere in its list,
    re-homed ids kept): the real scheduler's accounting holds at every step."""
    scheduler = make_scheduler(vllm_config, "uniform", async_scheduling, evict_every=evict_every)
    worker = FakeWorker(decode_server(evict_every), np.random.default_rng(seed), fail_rate)
    lengths = data.draw(st.lists(st.integers(20, 300), min_size=num, max_size=num))
    outputs = data.draw(st.lists(st.integers(1, 400), min_size=num, max_size=num))
    overrides = data.draw(st.lists(DECODE_OVERRIDES, min_size=num, max_size=num))
    aborts: dict[int, list[str]] = {}
    if data.draw(st.booleans()):
        aborts[data.draw(st.integers(0, 200))] = [f"r{data.draw(st.integers(0, num - 1))}"]
    update = scheduler.update_from_output

    def checked(*args):
        outputs = update(*args)
        check_bounded(scheduler, worker)
        check_reserve(scheduler)
        return outputs

    scheduler.update_from_output = checked
    finished, _ = run_stream(scheduler, worker, make_requests(lengths, outputs, overrides), aborts, max_steps=3000)
    assert not scheduler.has_requests(), "the stream did not drain"
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    assert not scheduler.kvcomp_manager.req_to_blocks and not scheduler.kvcomp_manager.evicted_blocks
    assert scheduler.kvcomp_manager.growth_reserve == 0 and not scheduler.kvcomp_manager.bounds
    assert len(finished) + len({r for ids in aborts.values() for r in ids}) >= num


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_long_generation_is_evicted_many_times(vllm_config, async_scheduling):
    """Absolute budgets: two requests generate 800 tokens each in a pool of 47 blocks, which stock
    vLLM would need 126 blocks for (it would preempt): no preemption, blocks bounded throughout."""
    scheduler = make_scheduler(vllm_config, "uniform", async_scheduling, evict_every=32)
    worker = FakeWorker(decode_server(32), np.random.default_rng(3), fail_rate=0.0)
    requests = make_requests([200, 150], [800, 800], [{"kv_budget": 64}, {"kv_budget": 96}])
    update = scheduler.update_from_output

    def checked(*args):
        outputs = update(*args)
        check_bounded(scheduler, worker)
        return outputs

    scheduler.update_from_output = checked
    finished, preempted = run_stream(scheduler, worker, requests, aborts={}, max_steps=3000)
    assert finished == {"r0": "length", "r1": "length"} and preempted == 0
    assert cdiv(1000, BS) + cdiv(950, BS) > NUM_BLOCKS
    assert worker.decode_evictions >= 2 * (800 // 32 - 2)  # every 32 tokens, once the ring is full
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1


# --- compression-aware admission (docs/LIFETIME-BUDGETS.md, section 4) ---------------------------


def check_reserve(scheduler) -> None:
    """The O(1) running reserve equals its definition recomputed from scratch."""
    manager = scheduler.kvcomp_manager
    expected = {}
    for req_id, bound in manager.bounds.items():
        held = len(manager.req_to_blocks.get(req_id, ()))
        if held and bound > held:
            expected[req_id] = bound - held
    assert manager._reserved == expected and manager.growth_reserve == sum(expected.values())
    # a finished request's bound is dropped at the next update at the latest: it holds nothing
    assert not set(manager._reserved) - set(scheduler.requests), "a finished request still reserves"


def run_pressure(vllm_config, async_scheduling: bool, reserve: bool, requests, evict_every: int):
    """Returns (finish reasons, preemptions, most requests running at once, largest reserve gauge)."""
    scheduler = make_scheduler(vllm_config, "uniform", async_scheduling, evict_every=evict_every)
    if not reserve:  # the counterfactual: stock admission, decode eviction unchanged
        scheduler.kvcomp_manager._admission_need = lambda req_id, need: need
    worker = FakeWorker(decode_server(evict_every), np.random.default_rng(5), fail_rate=0.0)
    update, seen = scheduler.update_from_output, {"running": 0, "gauge": 0.0}
    gauge = scheduler.kvcomp_metrics.growth_reserve

    def checked(*args):
        outputs = update(*args)
        check_reserve(scheduler)
        seen["running"] = max(seen["running"], len(scheduler.running))
        seen["gauge"] = max(seen["gauge"], gauge._value.get())
        return outputs

    scheduler.update_from_output = checked
    finished, preempted = run_stream(scheduler, worker, requests, aborts={}, max_steps=5000)
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    assert scheduler.kvcomp_manager.growth_reserve == 0 == gauge._value.get(), "the reserve outlived its requests"
    assert not scheduler.kvcomp_manager.bounds
    return finished, preempted, seen["running"], seen["gauge"]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_bounded_admission_avoids_the_preemptions_of_stock_admission(vllm_config, async_scheduling):
    """Six short prompts that each grow to 11 blocks (budget 96, evict_every 48) in a pool of 47:
    stock admission lets all six in on their 3-block prompts and preempts as they grow; with the
    reserve four run at once (4 x 11 <= 47), the others wait, and nobody is preempted."""
    requests = lambda: make_requests([40] * 6, [500] * 6, [{"kv_budget": 96}] * 6)  # noqa: E731
    finished, preempted, _, _ = run_pressure(vllm_config, async_scheduling, False, requests(), 48)
    assert preempted > 0, "the stream was meant to preempt under stock admission"
    assert finished == {f"r{i}": "length" for i in range(6)}
    finished, preempted, running, gauge = run_pressure(vllm_config, async_scheduling, True, requests(), 48)
    assert finished == {f"r{i}": "length" for i in range(6)} and preempted == 0
    assert running == 4 and gauge > 0  # not serialised: as many as the bounds allow


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_reserve_holds_with_unbounded_requests_preemption_resume_and_abort(vllm_config, async_scheduling):
    """Requests with kv_compression "none" grow unbounded (not reserved, as in stock), so the pool
    still preempts; the reserve stays exact through preemption, resume (re-prefill), abort and
    failures, and returns to 0."""
    scheduler = make_scheduler(vllm_config, "uniform", async_scheduling, evict_every=32)
    worker = FakeWorker(decode_server(32), np.random.default_rng(11), fail_rate=0.1)
    overrides = [{"kv_compression": "none"}, {"kv_budget": 64}, {}, {"kv_compression": "none"}, {"kv_budget": 0.1}]
    requests = make_requests([200, 150, 180, 160, 220], [300, 500, 400, 300, 450], overrides)
    update = scheduler.update_from_output

    def checked(*args):
        outputs = update(*args)
        check_reserve(scheduler)
        return outputs

    scheduler.update_from_output = checked
    finished, preempted = run_stream(scheduler, worker, requests, aborts={60: ["r2"]}, max_steps=5000)
    assert preempted > 0, "the stream was meant to preempt"
    assert set(finished) >= {"r0", "r1", "r3", "r4"}  # an abort is answered by the front end, not here
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    assert scheduler.kvcomp_manager.growth_reserve == 0 and not scheduler.kvcomp_manager.bounds


BOUNDED_OVERRIDES = st.sampled_from([{}, {"kv_budget": 0.1}, {"kv_budget": 64}, {"kv_budget": 96}, {"kv_budget": 128}])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    num=st.integers(4, 8),
    async_scheduling=st.booleans(),
    evict_every=st.sampled_from([16, 32, 48]),
    seed=st.integers(0, 2**16),
)
def test_bounded_streams_are_never_preempted(vllm_config, data, num, async_scheduling, evict_every, seed):
    """Every request bounded (decode eviction on, no failures), prompts of one chunk, long outputs
    (about half of such streams preempt under stock admission): admission keeps room for every
    running request's bound, so no request is ever preempted."""
    lengths = data.draw(st.lists(st.integers(20, 250), min_size=num, max_size=num))
    outputs = data.draw(st.lists(st.integers(1, 600), min_size=num, max_size=num))
    overrides = data.draw(st.lists(BOUNDED_OVERRIDES, min_size=num, max_size=num))
    requests = make_requests(lengths, outputs, overrides)
    finished, preempted, _, _ = run_pressure(vllm_config, async_scheduling, True, requests, evict_every)
    assert preempted == 0
    assert finished == {f"r{i}": "length" for i in range(num)}


def test_the_scheduler_computes_each_requests_bound_from_its_params(vllm_config):
    """The bound comes from what the scheduler process has: extra_args, max_tokens, the server config."""
    from vllm.v1.request import RequestStatus

    scheduler = make_scheduler(vllm_config, "uniform", False, evict_every=32)
    overrides = [{}, {"kv_budget": 64}, {"kv_compression": "none"}, {"kv_budget": "nonsense"}]
    requests = make_requests([100, 100, 100, 100], [500, 500, 500, 500], overrides)
    assert [scheduler.request_bound(r) for r in requests] == [cdiv(150, BS) + 2 + 2, 4 + 2 + 2, None, None]
    scheduler.add_request(requests[1])
    assert scheduler.kvcomp_manager.bounds == {"r1": 8}
    scheduler.finish_requests(["r1"], RequestStatus.FINISHED_ABORTED)  # aborted while waiting
    out = scheduler.schedule()
    scheduler.update_from_output(out, FakeWorker(decode_server(32), np.random.default_rng(0), 0.0).step(out))
    assert not scheduler.kvcomp_manager.bounds  # gone with it at the next update
    plain = make_scheduler(vllm_config, "uniform", False)  # no evict_every: stock admission
    assert plain.request_bound(make_requests([100], [500], [{}])[0]) is None
