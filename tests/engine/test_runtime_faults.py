"""The runtime's step path on CPU (begin_step -> capture -> end_step) and fault containment.

A fault in any eviction stage must stay with the requests of that batch: served
uncompressed while their KV is intact (pool bit-identical), finished with an
error once compaction rewrote it, and the runtime keeps serving the next batch.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_kvcomp.engine.layout import cdiv
from vllm_kvcomp.engine.verify import EvictionObserver

from test_runtime_cpu import BS, HQ, L, D, make_runtime


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


class FailAt(EvictionObserver):
    def __init__(self, stage):
        self.stage = stage

    def before(self, stage, args):
        if stage == self.stage:
            raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory")


def test_step_path_compresses_every_ready_request():
    runtime, pool = make_runtime("uniform", budget="0.3")
    report = prefill_step(runtime, {"a": 200, "b": 150, "short": 20})
    evicted = {r.req_id: r for r in report.evictions}
    assert set(evicted) == {"a", "b", "short"}
    assert evicted["a"].freed_block_ids and evicted["b"].freed_block_ids
    assert evicted["short"].freed_block_ids == [] and evicted["short"].kept_tokens == [20] * L  # one block: nothing to free
    assert not report.skips and not report.failures
    assert sorted(runtime.capture_buffers.free_slots) == [0, 1, 2, 3]


@pytest.mark.parametrize("stage", ["score", "plan", "compact"])
def test_fault_before_compaction_serves_the_batch_uncompressed(stage):
    runtime, pool = make_runtime("zigzag", budget="0.3")
    runtime.observer = FailAt(stage)
    snapshot = pool.clone()
    report = prefill_step(runtime, {"a": 200, "b": 150})
    assert not report.evictions and not report.failures
    assert {(s.req_id, s.reason) for s in report.skips} == {("a", f"eviction_error_{stage}"), ("b", f"eviction_error_{stage}")}
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
    assert {(f.req_id, f.reason) for f in report.failures} == {("a", "eviction_error_compact"), ("b", "eviction_error_compact")}


def test_capture_fault_inside_the_forward_is_contained():
    runtime, pool = make_runtime("uniform", budget="0.3")
    snapshot = pool.clone()
    runtime.add_request("a", index=1, block_ids=list(range(1, 14)), prompt_len=200)
    batch = SimpleNamespace(
        req_ids=["a"], num_reqs=1, idx_mapping=torch.tensor([1], dtype=torch.int32),
        is_prefilling_np=np.ones(1, dtype=bool), query_start_loc_np=np.array([0, 200]),
        num_computed_tokens_np=np.zeros(1, dtype=np.int64), num_scheduled_tokens=np.array([200]),
    )
    runtime.begin_step(batch)
    wrong_heads = torch.randn(200, HQ + 1, D).to(torch.bfloat16)
    runtime.capture(0, wrong_heads, torch.randn(HQ, 200), runtime.step_capture)  # must not raise
    report = runtime.end_step()
    assert [(s.req_id, s.reason) for s in report.skips] == [("a", "eviction_error_score")]
    assert torch.equal(pool, snapshot)
