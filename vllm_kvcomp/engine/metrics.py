"""Compression metrics, on vLLM's own /metrics (the API port).

The counters live in the scheduler (engine core process), which receives every
eviction report; vLLM renders /metrics in the API server process. The process
that builds the engine config (`vllm serve`'s API server, or the script calling
`LLM(...)`) calls `expose_on_vllm_metrics()`: it makes a directory for the
engine's metric files and registers prometheus_client's MultiProcessCollector
for it on vLLM's registry. The engine process, started afterwards, inherits
the directory's name and writes its metrics there (prometheus multiprocess
files). An engine running inside the same process registers them directly.

`metrics_port` additionally serves them on a separate port (off by default;
bound to `metrics_host`, 127.0.0.1 unless configured); a port that cannot be
bound stops the engine with a clear error instead of losing the metrics.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from vllm_kvcomp.config import CompressionConfig, CompressionConfigError

logger = logging.getLogger("vllm.kvcomp")

SUMMARY_INTERVAL_S = 60.0
# "<directory>:<pid of the process that reads it>", inherited by the engine process.
METRICS_DIR_ENV = "VLLM_KVCOMP_METRICS_DIR"


def expose_on_vllm_metrics(registry: CollectorRegistry = REGISTRY) -> str:
    """In the process serving /metrics, before the engine starts: collect the engine's metric files."""
    if METRICS_DIR_ENV in os.environ:
        return os.environ[METRICS_DIR_ENV].rpartition(":")[0]
    vllm_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if vllm_dir:  # vLLM's own multiprocess mode (several API servers) already collects every file there
        os.environ[METRICS_DIR_ENV] = f"{vllm_dir}:{os.getpid()}"
        return vllm_dir
    path = tempfile.mkdtemp(prefix="vllm-kvcomp-metrics-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    multiprocess.MultiProcessCollector(registry, path=path)
    os.environ[METRICS_DIR_ENV] = f"{path}:{os.getpid()}"
    return path


_in_process: list[CollectorRegistry] = []


def _in_process_registry() -> CollectorRegistry:
    """A registry shown through vLLM's (one engine's at a time: a new engine replaces the last)."""
    registry = CollectorRegistry()
    while _in_process:
        REGISTRY.unregister(_in_process.pop())
    REGISTRY.register(registry)
    _in_process.append(registry)
    return registry


def _engine_registry() -> CollectorRegistry:
    """Where this process's metrics go so that vLLM's /metrics shows them."""
    where = os.environ.get(METRICS_DIR_ENV)
    if not where:
        return CollectorRegistry()  # nobody collects them: the separate exporter only
    path, _, reader_pid = where.rpartition(":")
    if reader_pid == str(os.getpid()):
        return _in_process_registry()  # the engine runs inside the process that serves /metrics
    # A separate engine process: file-backed values, read by the collector above.
    from prometheus_client import values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.MultiProcessValue()
    return CollectorRegistry()


class CompressionMetrics:
    def __init__(self, config: CompressionConfig, registry: CollectorRegistry | None = None):
        self.registry = registry or _engine_registry()
        self._layer_children: dict[int, list] = {}  # id(counter) -> its child per layer (`_per_layer`)
        r = self.registry
        self.info = Gauge(
            "vllm_kvcomp_info",
            "Compression settings of this engine",
            ["method", "budget"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.info.labels(config.method, str(config.budget)).set(1)
        self.requests = Counter("vllm_kvcomp_requests_compressed", "Requests whose KV cache was compressed", registry=r)
        self.skipped = Counter(
            "vllm_kvcomp_requests_skipped",
            "Requests served uncompressed although compression is on",
            ["reason"],
            registry=r,
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
        self.blocks_freed = Counter(
            "vllm_kvcomp_blocks_freed", "KV blocks returned to vLLM's block pool after prefills", registry=r
        )
        self._decode_counters(r)
        self._scheduling_gauges(r)
        self.seconds = Histogram(
            "vllm_kvcomp_eviction_seconds",
            "GPU time per compressed request: scoring, statistics, budgets, selection, compaction (CUDA events)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.host_seconds = Histogram(
            "vllm_kvcomp_eviction_host_seconds",
            "Host time per compressed request: planning and enqueueing its eviction batch's kernels "
            "(not waiting for the GPU)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self._verify_metrics(r)
        self.totals = {"requests": 0, "blocks_freed": 0, "tokens_kept": 0, "tokens_prompt": 0}
        self._last_summary = time.monotonic()
        self.port: int | None = None
        if config.metrics_port is not None:
            self._serve(config.metrics_host, config.metrics_port)

    def _verify_metrics(self, r: CollectorRegistry) -> None:
        """The self-check's (engine/verify.py): only fed when VLLM_KVCOMP_VERIFY is set."""
        self.verify_checks = Counter(
            "vllm_kvcomp_verify_checks", "Self-checks of compacted layers", ["result"], registry=r
        )
        # Those of decode-time evictions alone: how many prefill batches vLLM forms (and so how many
        # prefill checks there are) depends on when requests reach the engine core.
        self.verify_decode_checks = Counter(
            "vllm_kvcomp_verify_decode_checks", "Self-checks after decode-time evictions", ["result"], registry=r
        )
        self.verify_needle = Counter(
            "vllm_kvcomp_verify_needle", "Oracle-kept needle found in every layer and head", ["result"], registry=r
        )
        self.verify_error = Gauge(
            "vllm_kvcomp_verify_attention_rel_err",
            "Largest relative error of FlashAttention over compacted pages vs dense attention",
            registry=r,
            multiprocess_mode="max",
        )
        self.verify_ring_error = Gauge(
            "vllm_kvcomp_verify_ring_lse_abs_err",
            "Largest |LSE from the decode-query ring's queries - LSE recorded with them| (decode self-checks)",
            registry=r,
            multiprocess_mode="max",
        )
        self._max_verify_error = 0.0
        self._max_ring_error = 0.0

    def _decode_counters(self, r: CollectorRegistry) -> None:
        """Decode-time eviction (evict_every): its own counters, so the prefill ones keep their meaning."""
        self.decode_evictions = Counter(
            "vllm_kvcomp_decode_evictions", "Decode-time evictions (a running request evicted again)", registry=r
        )
        self.decode_evicted = Counter(
            "vllm_kvcomp_decode_tokens_evicted", "Tokens evicted by decode-time evictions", ["layer"], registry=r
        )
        self.decode_blocks_freed = Counter(
            "vllm_kvcomp_decode_blocks_freed", "KV blocks returned to vLLM's block pool while decoding", registry=r
        )
        self.decode_deferred = Counter(
            "vllm_kvcomp_decode_evictions_deferred",
            "Decode-time evictions that failed before rewriting the KV (the request is evicted later)",
            ["reason"],
            registry=r,
        )

    def _scheduling_gauges(self, r: CollectorRegistry) -> None:
        """Compression-aware admission (engine/kv_cache.py): what is held back for running requests."""
        self.growth_reserve = Gauge(
            "vllm_kvcomp_growth_reserve_blocks",
            "KV blocks kept free at admission for running requests to grow into their decode-eviction bound",
            registry=r,
            multiprocess_mode="livesum",
        )

    def record_growth_reserve(self, blocks: int) -> None:
        self.growth_reserve.set(blocks)

    def _serve(self, host: str, port: int) -> None:
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise CompressionConfigError(
                f"kv-compression config: metrics_port: cannot serve the compression metrics on {host}:{port} "
                f"({exc.strerror or exc}); choose another port, or null (they are on vLLM's /metrics too)"
            ) from None
        self.port = port
        logger.info("vllm-kvcomp: compression metrics on %s:%d/metrics", host, port)

    def record_eviction(self, record, blocks_freed: int) -> None:
        if getattr(record, "phase", "prefill") == "decode":
            self.record_decode_eviction(record, blocks_freed)
            return
        self.requests.inc()
        self.blocks_freed.inc(blocks_freed)
        for layer, kept in enumerate(record.kept_tokens):
            self._per_layer(self.kept, layer).inc(kept)
            self._per_layer(self.evicted, layer).inc(record.prompt_len - kept)
        self.prompt_tokens.inc(record.prompt_len)
        self._record_verify(record)
        self.totals["requests"] += 1
        self.totals["blocks_freed"] += blocks_freed
        self.totals["tokens_kept"] += sum(record.kept_tokens)
        self.totals["tokens_prompt"] += record.prompt_len * len(record.kept_tokens)
        self._maybe_log_summary()

    def _record_verify(self, record) -> None:
        """The self-check's result of a prefill or decode eviction (when VLLM_KVCOMP_VERIFY is on)."""
        if record.verify is None:
            return
        result = "exact" if record.verify["exact"] else "mismatch"
        self.verify_checks.labels(result).inc()
        if record.phase == "decode":
            self.verify_decode_checks.labels(result).inc()
        if "needle" in record.verify:  # the tests' needle oracle (tests/engine/needle_oracle.py)
            self.verify_needle.labels("kept" if record.verify["needle"] else "lost").inc()
        self._max_verify_error = max(record.verify["attention_rel_err"], self._max_verify_error)
        self.verify_error.set(self._max_verify_error)
        if record.verify.get("ring_lse_abs_err") is not None:  # decode checks whose ring rows are exact
            self._max_ring_error = max(record.verify["ring_lse_abs_err"], self._max_ring_error)
            self.verify_ring_error.set(self._max_ring_error)

    def record_decode_eviction(self, record, blocks_freed: int) -> None:
        self.record_decode_evictions([(record, blocks_freed)])

    def record_decode_evictions(self, evictions: Sequence[tuple]) -> None:
        """(record, blocks freed) of a report's decode evictions: a round holds up to every running
        request, so the per-layer counters are summed over it and incremented once per layer (a labelled
        increment per record and layer was about 2 µs, 2 ms per round of 64 at 16 layers)."""
        if not evictions:
            return
        self.decode_evictions.inc(len(evictions))
        self.decode_blocks_freed.inc(sum(freed for _, freed in evictions))
        per_layer: list[int] = []
        for record, _ in evictions:
            evicted = record.evicted_tokens or []
            per_layer.extend([0] * (len(evicted) - len(per_layer)))
            for layer, tokens in enumerate(evicted):
                per_layer[layer] += tokens
            self._record_verify(record)
        for layer, tokens in enumerate(per_layer):
            self._per_layer(self.decode_evicted, layer).inc(tokens)

    def _per_layer(self, counter: Counter, layer: int):
        """The counter's child for `layer`, looked up once (`labels()` costs more than the increment)."""
        children = self._layer_children.setdefault(id(counter), [])
        while len(children) <= layer:
            children.append(counter.labels(str(len(children))))
        return children[layer]

    def record_decode_deferred(self, reason: str) -> None:
        self.decode_deferred.labels(reason).inc()

    def record_eviction_seconds(self, seconds: Sequence[float], host_seconds: Sequence[float] = ()) -> None:
        for value in seconds:
            self.seconds.observe(value)
        for value in host_seconds:
            self.host_seconds.observe(value)

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
