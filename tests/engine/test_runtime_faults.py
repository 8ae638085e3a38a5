"""The runtime's step path on CPU (begin_step -> capture -> end_step) and fault containment.

A fault in any eviction stage must stay with the requests of that batch: served
uncompressed while their KV is intact (pool bit-identical), finished with an
error once compaction rewrote it, and the runtime keeps serving the next batch.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from runtime_helpers import FailAt
from test_runtime_cpu import BS, HQ, D, L, make_runtime

from vllm_kvcomp.engine.layout import cdiv


def prefill_step(runtime, prompts: dict[str, int], seed=0):
    """Run one whole-prompt prefill step of `prompts` through the runtime's hooks, as the runner does."""
    g = torch.Generator().manual_seed(seed)
    blocks = iter(torch.randperm(40, generator=g).add(1).tolist())
    for i, (req_id, p) in enumerate(prompts.items()):
        runtime.add_request(req_id, index=i + 1, block_ids=[next(blocks) for _ in range(cdiv(p, BS))], prompt_len=p)
    lens = np.array(list(prompts.values()))
    batch = SimpleNamespace(
        req_ids=list(prompts),
        num_reqs=len(prompts),
        idx_mapping=torch.arange(1, len(prompts) + 1, dtype=torch.int32),
        is_prefilling_np=np.ones(len(prompts), dtype=bool),
        query_start_loc_np=np.concatenate([[0], np.cumsum(lens)]),
        num_computed_tokens_np=np.zeros(len(prompts), dtype=np.int64),
        num_scheduled_tokens=lens,
    )
    runtime.begin_step(batch)
    plan = runtime.step_capture
    tokens = int(lens.sum())
    for layer in range(L):  # what the attention backend does per layer
        query = torch.randn(tokens, HQ, D, generator=g).to(torch.bfloat16)
        lse = torch.randn(HQ, tokens, generator=g) + 5.0
        if plan is not None:
            runtime.capture(layer, query, lse, plan)
    return runtime.end_step()


def test_step_path_compresses_every_ready_request():
    runtime, pool = make_runtime("uniform", budget="0.3")
    report = prefill_step(runtime, {"a": 200, "b": 150, "short": 20})
    evicted = {r.req_id: r for r in report.evictions}
    assert set(evicted) == {"a", "b", "short"}
    assert evicted["a"].freed_block_ids and evicted["b"].freed_block_ids
    assert (
        evicted["short"].freed_block_ids == [] and evicted["short"].kept_tokens == [20] * L
    )  # one block: nothing to free
    assert not report.skips and not report.failures
    assert sorted(runtime.capture_buffers.free_slots) == [0, 1, 2, 3]


@pytest.mark.parametrize("stage", ["score", "plan", "compact"])
def test_fault_before_compaction_serves_the_batch_uncompressed(stage):
    runtime, pool = make_runtime("zigzag", budget="0.3")
    runtime.observer = FailAt(stage)
    snapshot = pool.clone()
    report = prefill_step(runtime, {"a": 200, "b": 150})
    assert not report.evictions and not report.failures
    assert {(s.req_id, s.reason) for s in report.skips} == {
        ("a", f"eviction_error_{stage}"),
        ("b", f"eviction_error_{stage}"),
    }
    assert torch.equal(pool, snapshot), "a failed eviction must leave the KV pool untouched"
    assert sorted(runtime.capture_buffers.free_slots) == [0, 1, 2, 3]
    # the engine keeps going: the next batch compresses
    runtime.observer = None
    report = prefill_step(runtime, {"c": 200}, seed=1)
    assert [r.req_id for r in report.evictions] == ["c"]


def test_fault_after_compaction_finishes_the_requests_with_an_error(monkeypatch):
    runtime, pool = make_runtime("uniform", budget="0.3")

    def broken_relocate(compressed):
        raise RuntimeError("injected after compaction")

    monkeypatch.setattr(runtime.executor, "relocate", broken_relocate)
    report = prefill_step(runtime, {"a": 200, "b": 150})
    assert not report.evictions and not report.skips
    assert {(f.req_id, f.reason) for f in report.failures} == {
        ("a", "eviction_error_compact"),
        ("b", "eviction_error_compact"),
    }


def test_capture_fault_inside_the_forward_is_contained():
    runtime, pool = make_runtime("uniform", budget="0.3")
    snapshot = pool.clone()
    runtime.add_request("a", index=1, block_ids=list(range(1, 14)), prompt_len=200)
    batch = SimpleNamespace(
        req_ids=["a"],
        num_reqs=1,
        idx_mapping=torch.tensor([1], dtype=torch.int32),
        is_prefilling_np=np.ones(1, dtype=bool),
        query_start_loc_np=np.array([0, 200]),
        num_computed_tokens_np=np.zeros(1, dtype=np.int64),
        num_scheduled_tokens=np.array([200]),
    )
    runtime.begin_step(batch)
    wrong_heads = torch.randn(200, HQ + 1, D).to(torch.bfloat16)
    runtime.capture(0, wrong_heads, torch.randn(HQ, 200), runtime.step_capture)  # must not raise
    report = runtime.end_step()
    assert [(s.req_id, s.reason) for s in report.skips] == [("a", "eviction_error_score")]
    assert torch.equal(pool, snapshot)


def test_fault_injector_used_on_the_gpu_marks_requests_by_id():
    """tests/engine/fault_injector.py (loaded by the GPU serve test) fails exactly the marked batches."""
    import os
    from pathlib import Path

    from vllm_kvcomp.engine.verify import load_observer

    os.environ["VLLM_KVCOMP_OBSERVER"] = f"{Path(__file__).with_name('fault_injector.py')}:FaultInjector"
    try:
        injector = load_observer()
    finally:
        del os.environ["VLLM_KVCOMP_OBSERVER"]
    runtime, pool = make_runtime("uniform", budget="0.3")
    runtime.observer = injector
    snapshot = pool.clone()
    report = prefill_step(runtime, {"cmpl-kvfault-plan-1-ab12": 200})
    assert [s.reason for s in report.skips] == ["eviction_error_plan"] and torch.equal(pool, snapshot)
    report = prefill_step(runtime, {"cmpl-kvfault-relocate-1-cd34": 200}, seed=2)
    assert [f.reason for f in report.failures] == ["eviction_error_compact"]
    report = prefill_step(runtime, {"cmpl-plain-ef56": 200}, seed=3)
    assert len(report.evictions) == 1


def _chunk(runtime, req_id, computed, scheduled, prompt_len):
    return SimpleNamespace(
        req_ids=[req_id],
        num_reqs=1,
        idx_mapping=torch.tensor([1], dtype=torch.int32),
        is_prefilling_np=np.ones(1, dtype=bool),
        query_start_loc_np=np.array([0, scheduled]),
        num_computed_tokens_np=np.array([computed]),
        num_scheduled_tokens=np.array([scheduled]),
    )


def test_last_chunk_inside_a_full_cuda_graph_still_compresses():
    """Chunked prefill whose last chunk replays a FULL CUDA graph (no attention hook runs):
    the window rows captured by the earlier chunk score the prompt."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    runtime.add_request("a", index=1, block_ids=list(range(1, 14)), prompt_len=200)
    runtime.begin_step(_chunk(runtime, "a", 0, 196, 200))
    for layer in range(L):
        runtime.capture(
            layer, torch.randn(196, HQ, D).to(torch.bfloat16), torch.randn(HQ, 196) + 5, runtime.step_capture
        )
    assert runtime.end_step() is None  # prompt not complete yet
    runtime.begin_step(_chunk(runtime, "a", 196, 4, 200))
    assert runtime.step_capture is not None  # rows 196..199 were planned, but the graph runs no hook
    (record,) = runtime.end_step().evictions
    assert record.freed_block_ids and runtime.requests["a"].rows is None


def test_window_of_one_inside_a_full_cuda_graph_is_skipped_visibly():
    runtime, pool = make_runtime("uniform", budget="0.3", window=1)
    runtime.add_request("a", index=1, block_ids=list(range(1, 14)), prompt_len=200)
    runtime.begin_step(_chunk(runtime, "a", 0, 199, 200))
    assert runtime.step_capture is None  # the window row is in the next chunk
    runtime.begin_step(_chunk(runtime, "a", 199, 1, 200))
    report = runtime.end_step()
    assert [(s.req_id, s.reason) for s in report.skips] == [("a", "no_window_queries")]


def test_fault_injector_rank1_faults_fire_on_rank_one_only(monkeypatch):
    """`kvfault-rank1-<stage>` (the TP=2 chaos run) fails the batch on rank 1 alone; rank 0 goes on."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fault_injector", Path(__file__).with_name("fault_injector.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for rank, expected in ((0, []), (1, ["eviction_error_score"])):
        monkeypatch.setattr(module, "_tp_rank", lambda rank=rank: rank)
        runtime, pool = make_runtime("uniform", budget="0.3")
        runtime.observer = module.FaultInjector()
        snapshot = pool.clone()
        report = prefill_step(runtime, {"cmpl-kvfault-rank1-score-7": 200})
        assert [s.reason for s in report.skips] == expected
        assert (len(report.evictions) == 1) == (rank == 0)
        if rank == 1:
            assert torch.equal(pool, snapshot)


def test_a_plan_failure_on_another_rank_stops_this_rank_before_it_compacts(monkeypatch):
    """TP: planning is host work after the shared statistics; if another rank fails there, this
    rank (whose plan succeeded) must not rewrite its KV (found by the TP=2 chaos run)."""
    runtime, pool = make_runtime("uniform", budget="0.3")
    snapshot = pool.clone()
    calls = []

    def other_rank_failed_planning(flags):  # the first agreement after the statistics is the plan's
        calls.append(list(flags))
        return [True] + list(flags[1:]) if len(calls) == 1 else list(flags)

    monkeypatch.setattr(runtime.executor, "any_rank", other_rank_failed_planning)
    report = prefill_step(runtime, {"a": 200})
    assert calls[0] == [False]  # this rank planned fine
    assert [s.reason for s in report.skips] == ["eviction_error_other_rank_plan"] and not report.failures
    assert torch.equal(pool, snapshot)
    report = prefill_step(runtime, {"b": 200}, seed=4)  # and the next batch compresses
    assert len(report.evictions) == 1
