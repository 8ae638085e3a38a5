"""The plugin's Prometheus registry, as the scheduler feeds it from eviction reports."""

from prometheus_client import generate_latest

from vllm_kvcomp.config import build_config
from vllm_kvcomp.engine.metrics import CompressionMetrics
from vllm_kvcomp.engine.runtime import EvictionRecord


def test_eviction_reports_become_counters():
    metrics = CompressionMetrics(build_config(method="zigzag", overrides={"metrics_port": None}))
    for err in (0.002, 0.001):
        check = {"exact": True, "needle": True, "attention_rel_err": err}
        metrics.record_eviction(EvictionRecord("a", [1, 2], 100, [20, 36], 0.01, check), blocks_freed=2)
    metrics.record_skip("capture_slots")
    text = generate_latest(metrics.registry).decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["vllm_kvcomp_requests_compressed_total"]) == 2
    assert float(lines["vllm_kvcomp_blocks_freed_total"]) == 4
    assert float(lines['vllm_kvcomp_tokens_kept_total{layer="1"}']) == 72
    assert float(lines['vllm_kvcomp_tokens_evicted_total{layer="0"}']) == 160
    assert float(lines['vllm_kvcomp_requests_skipped_total{reason="capture_slots"}']) == 1
    assert float(lines['vllm_kvcomp_verify_checks_total{result="exact"}']) == 2
    assert float(lines["vllm_kvcomp_verify_attention_rel_err"]) == 0.002  # the largest seen
    assert metrics.port is None
