"""Compression metrics: a prometheus_client registry served by the engine process.

vLLM's own /metrics is rendered by the API server process, which cannot see the
engine core's counters (vLLM uses prometheus multiprocess mode only with several
API servers). The scheduler, which receives every eviction report, therefore
serves its own registry on `metrics_port` (default 9464); scrape both.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from vllm_kvcomp.config import CompressionConfig

logger = logging.getLogger("vllm.kvcomp")

SUMMARY_INTERVAL_S = 60.0


class CompressionMetrics:
    def __init__(self, config: CompressionConfig, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.info = Gauge("vllm_kvcomp_info", "Compression settings of this engine", ["method", "budget"], registry=r)
        self.info.labels(config.method, str(config.budget)).set(1)
        self.requests = Counter("vllm_kvcomp_requests_compressed", "Requests whose KV cache was compressed", registry=r)
        self.skipped = Counter(
            "vllm_kvcomp_requests_skipped", "Requests served uncompressed although compression is on", ["reason"], registry=r
        )
        self.failed = Counter(
            "vllm_kvcomp_requests_failed",
            "Requests finished with an error because their eviction failed after rewriting their KV",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm_kvcomp_prompt_tokens", "Prompt tokens of compressed requests (per layer)", registry=r
        )
        self.kept = Counter("vllm_kvcomp_tokens_kept", "Prompt tokens kept after compression", ["layer"], registry=r)
        self.evicted = Counter("vllm_kvcomp_tokens_evicted", "Prompt tokens evicted", ["layer"], registry=r)
        self.blocks_freed = Counter("vllm_kvcomp_blocks_freed", "KV blocks returned to vLLM's block pool", registry=r)
        self.seconds = Histogram(
            "vllm_kvcomp_eviction_seconds",
            "Worker time per compressed request (scoring, budgets, selection, compaction launch)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        # Only fed when VLLM_KVCOMP_VERIFY is set (engine/verify.py).
        self.verify_checks = Counter(
            "vllm_kvcomp_verify_checks", "Self-checks of compacted layers", ["result"], registry=r
        )
        self.verify_needle = Counter(
            "vllm_kvcomp_verify_needle", "Oracle-kept needle found in every layer and head", ["result"], registry=r
        )
        self.verify_error = Gauge(
            "vllm_kvcomp_verify_attention_rel_err",
            "Largest relative error of FlashAttention over compacted pages vs dense attention",
            registry=r,
        )
        self.totals = {"requests": 0, "blocks_freed": 0, "tokens_kept": 0, "tokens_prompt": 0}
        self._last_summary = time.monotonic()
        self._max_verify_error = 0.0
        self.port: int | None = None
        if config.metrics_port is not None:
            try:
                start_http_server(config.metrics_port, registry=self.registry)
                self.port = config.metrics_port
                logger.info("vllm-kvcomp: compression metrics on :%d/metrics", config.metrics_port)
            except OSError as exc:
                logger.error(
                    "vllm-kvcomp: cannot serve compression metrics on port %d (%s); set metrics_port "
                    "in --kv-compression-config (null to disable). Compression itself is unaffected.",
                    config.metrics_port,
                    exc,
                )

    def record_eviction(self, record, blocks_freed: int) -> None:
        self.requests.inc()
        self.blocks_freed.inc(blocks_freed)
        self.seconds.observe(record.seconds)
        for layer, kept in enumerate(record.kept_tokens):
            self.kept.labels(str(layer)).inc(kept)
            self.evicted.labels(str(layer)).inc(record.prompt_len - kept)
        self.prompt_tokens.inc(record.prompt_len)
        if record.verify is not None:
            self.verify_checks.labels("exact" if record.verify["exact"] else "mismatch").inc()
            if "needle" in record.verify:  # the tests' needle oracle (tests/engine/needle_oracle.py)
                self.verify_needle.labels("kept" if record.verify["needle"] else "lost").inc()
            self._max_verify_error = max(record.verify["attention_rel_err"], self._max_verify_error)
            self.verify_error.set(self._max_verify_error)
        self.totals["requests"] += 1
        self.totals["blocks_freed"] += blocks_freed
        self.totals["tokens_kept"] += sum(record.kept_tokens)
        self.totals["tokens_prompt"] += record.prompt_len * len(record.kept_tokens)
        self._maybe_log_summary()

    def record_skip(self, reason: str) -> None:
        self.skipped.labels(reason).inc()

    def record_failure(self, reason: str) -> None:
        self.failed.labels(reason).inc()

    def _maybe_log_summary(self) -> None:
        now = time.monotonic()
        if now - self._last_summary < SUMMARY_INTERVAL_S and self.totals["requests"] > 1:
            return
        self._last_summary = now
        t = self.totals
        ratio = t["tokens_kept"] / max(t["tokens_prompt"], 1)
        logger.info(
            "vllm-kvcomp: %d requests compressed, %.1f%% of prompt KV kept, %d blocks freed",
            t["requests"],
            100 * ratio,
            t["blocks_freed"],
        )
