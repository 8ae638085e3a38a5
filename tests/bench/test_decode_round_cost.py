"""bench.decode_round_cost: whole rounds of decode evictions through the real evictor, kernels stood in."""

import json

import vllm_kvcomp.kernels as kernels

from bench.decode_round_cost import main
from vllm_kvcomp.engine import executor


def test_rounds_of_every_request_are_timed_and_the_kernels_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMP_COMMIT", "feed123")
    originals = kernels.score_gather, kernels.compact_kv_, executor.selection_scores
    out = tmp_path / "rounds.json"
    args = ["--layers", "3", "--requests", "5", "--prompt", "120", "--budget", "128", "--evict-every", "32"]
    assert main([*args, "--rounds", "2", "--top", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # every request is due together (same prompt, one token per step): each round evicts all five
    assert [r["requests"] for r in result["rounds"]] == [5, 5]
    assert all(r["ms"] > 0 and r["kernel_calls"] >= 4 for r in result["rounds"])
    assert result["ms_per_round_fastest"] == min(r["ms"] for r in result["rounds"])
    assert result["aten_ops_per_round"] > 0 and len(result["top_own_time_profiled_round"]) == 5
    assert result["commit"] == "feed123" and result["command"].startswith("python -m bench.decode_round_cost")
    assert (kernels.score_gather, kernels.compact_kv_, executor.selection_scores) == originals


def test_staggered_requests_share_rounds_unless_joining_is_off(tmp_path, monkeypatch):
    from vllm_kvcomp.engine import decode_eviction

    monkeypatch.setenv("KVCOMP_COMMIT", "feed123")
    args = ["--layers", "3", "--requests", "8", "--prompt", "120", "--budget", "128", "--evict-every", "32"]
    results = {}
    for name, extra in (("join", []), ("alone", ["--no-join"])):
        out = tmp_path / f"{name}.json"
        assert main([*args, "--stagger", "--steps", "64", *extra, "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    join, alone = results["join"], results["alone"]
    # admitted a step in four apart: without joining each is due alone, 8 rounds per interval of 32
    assert alone["rounds_per_interval"] == 8 and alone["requests_per_round_mean"] == 1
    assert join["rounds_per_interval"] <= 4 and join["requests_per_round_mean"] >= 2
    assert sum(r["requests"] for r in join["rounds"]) >= sum(r["requests"] for r in alone["rounds"])
    assert join["host_ms_per_step"] > 0 and decode_eviction.JOIN_FRACTION == 0.75  # restored
