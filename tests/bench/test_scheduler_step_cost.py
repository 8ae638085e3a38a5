"""bench.scheduler_step_cost: the scheduler side of a decode step, stock against the plugin (vLLM on CPU)."""

import json

from bench import scheduler_step_cost


def test_every_case_times_decode_steps_of_all_its_requests(tmp_path, monkeypatch):
    steps_seen = []
    real = scheduler_step_cost.time_steps

    def counting(scheduler, requests, prompt, extra_args, steps):
        us = real(scheduler, requests, prompt, extra_args, steps)
        # every request decoded through the timed steps: its prompt and about `steps` tokens computed
        computed = [r.num_computed_tokens for r in scheduler.requests.values()]
        steps_seen.append((type(scheduler).__name__, extra_args, len(computed), min(computed) >= prompt + steps - 1))
        return us

    monkeypatch.setattr(scheduler_step_cost, "time_steps", counting)
    out = tmp_path / "cost.json"
    argv = ["--requests", "4", "--prompt", "40", "--steps", "6", "--repeats", "1", "--out", str(out)]
    assert scheduler_step_cost.main(argv) == 0
    assert steps_seen == [
        ("AsyncScheduler", None, 4, True),
        ("AsyncCompressionScheduler", {"kv_budget": 1.0}, 4, True),
        ("AsyncCompressionScheduler", {"kv_budget": 1024}, 4, True),
    ]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"stock", "plugin@1.0", "plugin@1024"}
    assert all(row["us_per_step"] > 0 and len(row["runs"]) == 1 for row in report["results"].values())
    assert report["command"].startswith("python -m bench.scheduler_step_cost --requests 4")
