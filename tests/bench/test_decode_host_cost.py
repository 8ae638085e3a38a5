"""bench.decode_host_cost: the host side of decode evictions, replayed through the planning code."""

import json

from bench.decode_host_cost import main


def test_a_whole_life_is_replayed_eviction_by_eviction(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMP_COMMIT", "feed123")
    out = tmp_path / "cost.json"
    args = ["--layers", "4", "--prompt", "256", "--output", "1024", "--budget", "128", "--evict-every", "64"]
    assert main([*args, "--requests", "8", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # one eviction every 64 generated tokens, each of which frees blocks (the context grows past the budget)
    assert result["evictions"] == 1024 // 64
    stages = result["us_per_request_eviction"]
    assert {"budgets", "plan", "logical_pages", "compaction_rows", "page_copies", "publish_host"} <= set(stages)
    assert all(v > 0 for v in stages.values())
    total = result["us_per_request_eviction_total"]
    assert abs(total - sum(stages.values())) < 1e-6 and abs(result["ms_per_round_of_8"] - 8 * total / 1e3) < 1e-9
    due_step = 8 * (total - stages["budgets"] - stages["plan"] - stages["precompute"]) / 1e3  # made ahead
    assert abs(result["ms_per_round_of_8_in_due_step"] - due_step) < 1e-9 and due_step < result["ms_per_round_of_8"]
    assert result["commit"] == "feed123" and result["command"].startswith("python -m bench.decode_host_cost")
    per_step = result["us_per_step"]
    assert set(per_step) == {f"budget {b}, {r} running" for b, r in (("1.0", 7), ("1.0", 64), ("0.2", 64), ("128", 64))}
    assert all(0 < v < 1e5 for v in per_step.values())


def test_the_same_life_with_every_plan_made(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMP_COMMIT", "feed123")
    args = ["--layers", "4", "--prompt", "256", "--output", "512", "--budget", "128", "--evict-every", "64"]
    results = []
    for extra in ([], ["--no-plan-cache"]):
        out = tmp_path / f"cost{len(extra)}.json"
        assert main([*args, "--requests", "4", "--repeats", "1", *extra, "--out", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    cached, made = results
    assert cached["evictions"] == made["evictions"] == 512 // 64
    assert cached["setup"]["plan_cache"] is True and made["setup"]["plan_cache"] is False
