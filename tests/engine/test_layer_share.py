"""Inter-layer shared scoring (`layer_share`, arXiv 2412.02252) on the CPU eviction path.

A layer of a share group keeps the tokens its group's first layer ranks first:
with equal budgets every layer of a group keeps the same positions, and the
result does not depend on how the eviction workspace splits the layers.
"""

import pytest
import torch
from test_runtime_cpu import L, make_runtime, prepare

from vllm_kvcomp.engine import eviction
from vllm_kvcomp.engine.verify import EvictionObserver


class KeepRecorder(EvictionObserver):
    """Records the first request's keep indices per layer (what the self-check compares)."""

    def __init__(self):
        self.keep: dict[int, torch.Tensor] = {}

    def wants(self):
        return True

    def snapshot(self, runtime, req):
        return []  # not None: the runtime calls check() only after a snapshot

    def check(self, runtime, req, plan, keep_by_layer, snapshot):
        self.keep = {layer: k.clone() for layer, k in keep_by_layer.items()}
        return {"exact": True, "attention_rel_err": 0.0}


def _evict(share: int, split_layers: bool = False, monkeypatch=None):
    torch.manual_seed(5)  # the same pool contents in every run
    runtime, pool = make_runtime("uniform", budget="0.3", layer_share=share)
    recorder = runtime.observer = KeepRecorder()
    if split_layers:  # a workspace that holds one layer at a time
        monkeypatch.setattr(eviction, "layer_groups", lambda n, per_layer, budget: [range(i, i + 1) for i in range(n)])
    _, reqs = prepare(runtime, pool, [200, 150], [0, 0], seed=11)
    runtime._evict(reqs)
    return recorder.keep, pool


def test_one_share_group_keeps_the_same_tokens_in_every_layer():
    keep, _ = _evict(share=L)
    assert len(keep) == L
    for layer in range(1, L):
        assert torch.equal(keep[layer], keep[0])


def test_share_two_pairs_layers_and_differs_from_per_layer_scoring():
    own, _ = _evict(share=1)
    shared, _ = _evict(share=2)
    assert torch.equal(shared[1], shared[0]) and torch.equal(shared[0], own[0])
    assert torch.equal(shared[2], own[2])  # layer 2 starts its own group
    assert not torch.equal(own[1], own[0])  # the windows differ, so sharing changed layer 1


@pytest.mark.parametrize("share", [1, 2])
def test_workspace_groups_do_not_change_the_result(share, monkeypatch):
    keep_whole, pool_whole = _evict(share=share)
    keep_split, pool_split = _evict(share=share, split_layers=True, monkeypatch=monkeypatch)
    assert torch.equal(pool_whole, pool_split)
    assert all(torch.equal(keep_whole[layer], keep_split[layer]) for layer in range(L))


def test_shared_layers_never_score_more_layers_than_given():
    runtime, _ = make_runtime("uniform", layer_share=4)
    assert runtime.executor.shared_layers(range(0, 3)) == ([0], [0, 0, 0])
    assert runtime.executor.shared_layers(range(2, 3)) == ([0], [0])  # its group starts before
    runtime, _ = make_runtime("uniform", layer_share=2)
    assert runtime.executor.shared_layers(range(1, 3)) == ([0, 2], [0, 1])
