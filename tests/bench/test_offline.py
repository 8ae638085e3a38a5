"""bench.offline's provenance: what every results file records."""

from __future__ import annotations

import datetime

from bench.offline import provenance


def test_provenance_names_the_command_commit_date_device_and_versions(monkeypatch):
    monkeypatch.setenv("KVCOMP_COMMIT", "feed123")
    run = {"device": "NVIDIA H200", "vllm": "0.25.1", "torch": "2.11.0", "output_tokens": 5}
    record = provenance("pytest -m gpu x", run)
    assert {k: record[k] for k in ("command", "commit", "device", "vllm", "torch")} == {
        "command": "pytest -m gpu x",
        "commit": "feed123",
        "device": "NVIDIA H200",
        "vllm": "0.25.1",
        "torch": "2.11.0",
    }
    assert "output_tokens" not in record
    assert datetime.datetime.fromisoformat(record["date"]).tzinfo is not None


def test_run_workload_samples_the_mean_batch_and_kv_usage_while_generating():
    """mean_running / mean_kv_cache_usage average vLLM's gauges over the run (the footprint physics of
    bench.throughput); max_running and preemptions come from the same samples."""
    import time
    from types import SimpleNamespace

    from bench.offline import run_workload

    class FakeLLM:
        def __init__(self):
            self.gauges = {"vllm:num_requests_running": 0.0, "vllm:kv_cache_usage_perc": 0.0}
            self.preempted = 0.0

        def get_metrics(self):
            values = {**self.gauges, "vllm:num_preemptions": self.preempted}
            return [SimpleNamespace(name=k, value=v) for k, v in values.items()]

        def generate(self, prompts, params, use_tqdm=False):
            # half the run at 8 running / 80% of the pool, half at 2 / 20%, then one preemption
            for running, usage in ((8.0, 0.8), (2.0, 0.2)):
                self.gauges = {"vllm:num_requests_running": running, "vllm:kv_cache_usage_perc": usage}
                time.sleep(0.6)
            self.preempted = 1.0
            time.sleep(0.15)
            done = SimpleNamespace(token_ids=[1, 2, 3])
            return [SimpleNamespace(outputs=[done], metrics=None) for _ in prompts]

    workload = {"num_prompts": 2, "prompt_len": 4, "output_len": 3, "seed": 1}
    result = run_workload(FakeLLM(), workload, plugin=False, metrics_port=None, return_tokens=False)
    assert result["max_running"] == 8.0 and result["max_kv_cache_usage"] == 0.8
    assert 3.5 < result["mean_running"] < 5.5  # about (8 + 2) / 2, not the max
    assert 0.35 < result["mean_kv_cache_usage"] < 0.55
    assert result["preemptions"] == 1.0 and result["output_tokens"] == 6
