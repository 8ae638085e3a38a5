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
