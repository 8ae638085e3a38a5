"""The plugin's Prometheus registry, as the scheduler feeds it from eviction reports."""

from prometheus_client import generate_latest

from vllm_kvcomp.config import build_config
from vllm_kvcomp.engine.metrics import CompressionMetrics
from vllm_kvcomp.engine.records import EvictionRecord


def test_eviction_reports_become_counters():
    metrics = CompressionMetrics(build_config(method="zigzag", overrides={"metrics_port": None}))
    for err in (0.002, 0.001):
        check = {"exact": True, "needle": True, "attention_rel_err": err}
        metrics.record_eviction(EvictionRecord("a", [1, 2], 100, [20, 36], check), blocks_freed=2)
    metrics.record_eviction_seconds([0.004, 0.006], [0.001, 0.002])
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
    assert float(lines["vllm_kvcomp_eviction_seconds_count"]) == 2
    assert 'vllm_kvcomp_verify_decode_checks_total{result="exact"}' not in lines  # prefill checks only
    check = {"exact": True, "attention_rel_err": 0.001, "ring_lse_abs_err": 1e-6}
    metrics.record_decode_eviction(EvictionRecord("a", [3], 228, [20, 20], check, phase="decode"), blocks_freed=1)
    text = generate_latest(metrics.registry).decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines['vllm_kvcomp_verify_decode_checks_total{result="exact"}']) == 1
    assert float(lines['vllm_kvcomp_verify_checks_total{result="exact"}']) == 3  # all checks, both phases
    assert float(lines["vllm_kvcomp_eviction_host_seconds_sum"]) == 0.003
    assert metrics.port is None


ENGINE_PROCESS = """
import sys
from vllm_kvcomp.config import build_config
from vllm_kvcomp.engine.metrics import CompressionMetrics
from vllm_kvcomp.engine.records import EvictionRecord
metrics = CompressionMetrics(build_config(method="zigzag"))
metrics.record_eviction(EvictionRecord("a", [1, 2, 3], 100, [20, 36]), blocks_freed=3)
metrics.record_skip("capture_slots")
metrics.record_failure("eviction_error_compact")
"""


def test_engine_process_metrics_reach_the_api_servers_registry(monkeypatch):
    """What `vllm serve` does: the API process collects the files of the engine process it starts."""
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry

    from vllm_kvcomp.engine.metrics import METRICS_DIR_ENV, expose_on_vllm_metrics

    monkeypatch.delenv(METRICS_DIR_ENV, raising=False)
    api_registry = CollectorRegistry()  # stands for vLLM's registry behind /metrics
    expose_on_vllm_metrics(api_registry)
    subprocess.run([sys.executable, "-c", ENGINE_PROCESS], check=True, timeout=120)
    text = generate_latest(api_registry).decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["vllm_kvcomp_requests_compressed_total"]) == 1
    assert float(lines["vllm_kvcomp_blocks_freed_total"]) == 3
    assert float(lines['vllm_kvcomp_requests_failed_total{reason="eviction_error_compact"}']) == 1
    assert float(lines['vllm_kvcomp_info{budget="0.2",method="zigzag"}']) == 1


def test_separate_exporter_binds_localhost_and_refuses_a_taken_port():
    import socket
    import urllib.request

    import pytest

    from vllm_kvcomp.config import CompressionConfigError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = CompressionMetrics(build_config(method="zigzag", overrides={"metrics_port": port}))
    assert first.port == port
    assert b"vllm_kvcomp_info" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    with pytest.raises(CompressionConfigError, match=f"cannot serve the compression metrics on 127.0.0.1:{port}"):
        CompressionMetrics(build_config(method="zigzag", overrides={"metrics_port": port}))


def test_decode_evictions_count_apart_and_feed_the_self_check():
    metrics = CompressionMetrics(build_config(method="zigzag", overrides={"metrics_port": None}))
    check = {"exact": True, "attention_rel_err": 0.003, "ring_lse_abs_err": 0.004}
    record = EvictionRecord("a", [7], 900, [512, 512], check, phase="decode", evicted_tokens=[128, 128])
    metrics.record_eviction(record, blocks_freed=1)
    inexact_ring = {"exact": True, "attention_rel_err": 0.001, "ring_lse_abs_err": None}
    metrics.record_eviction(EvictionRecord("b", [], 950, [512, 512], inexact_ring, phase="decode"), blocks_freed=0)
    metrics.record_eviction(EvictionRecord("a", [], 1000, [512, 512], None, phase="decode"), blocks_freed=0)
    text = generate_latest(metrics.registry).decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["vllm_kvcomp_decode_evictions_total"]) == 3
    assert float(lines["vllm_kvcomp_decode_blocks_freed_total"]) == 1
    assert float(lines['vllm_kvcomp_decode_tokens_evicted_total{layer="1"}']) == 128
    assert float(lines["vllm_kvcomp_requests_compressed_total"]) == 0  # prefill counters keep their meaning
    assert float(lines['vllm_kvcomp_verify_checks_total{result="exact"}']) == 2
    assert float(lines["vllm_kvcomp_verify_attention_rel_err"]) == 0.003
    assert float(lines["vllm_kvcomp_verify_ring_lse_abs_err"]) == 0.004  # a None (inexact ring) leaves it


def test_a_round_of_decode_evictions_is_counted_per_layer_once():
    metrics = CompressionMetrics(build_config(method="uniform", overrides={"metrics_port": None}))
    check = {"exact": False, "attention_rel_err": 0.5}
    round_ = [
        (EvictionRecord("a", [1, 2], 300, [64, 64], phase="decode", evicted_tokens=[128, 120]), 2),
        (EvictionRecord("b", [3], 300, [64, 64, 64], check, phase="decode", evicted_tokens=[7, 8, 9]), 1),
        (EvictionRecord("c", [], 300, [64], phase="decode", evicted_tokens=None), 0),
    ]
    metrics.record_decode_evictions(round_)
    metrics.record_decode_evictions([])  # a report without decode evictions: nothing
    text = generate_latest(metrics.registry).decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["vllm_kvcomp_decode_evictions_total"]) == 3
    assert float(lines["vllm_kvcomp_decode_blocks_freed_total"]) == 3
    per_layer = [float(lines[f'vllm_kvcomp_decode_tokens_evicted_total{{layer="{layer}"}}']) for layer in range(3)]
    assert per_layer == [135, 128, 9]
    assert float(lines['vllm_kvcomp_verify_checks_total{result="mismatch"}']) == 1
    assert float(lines['vllm_kvcomp_verify_decode_checks_total{result="mismatch"}']) == 1
