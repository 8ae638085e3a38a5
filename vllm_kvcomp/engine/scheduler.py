"""vLLM scheduler that applies the workers' eviction reports.

Installed through `SchedulerConfig.scheduler_cls` (an extension point). Before
vLLM processes a step's output, the blocks the worker freed are dropped from
their requests and returned to the BlockPool, so the very next `schedule()`
call can admit more requests.

Compression-aware admission (docs/LIFETIME-BUDGETS.md, section 4): each new
request's `bound_blocks` is computed here, where its sampling params and the
server config are (the worker's per-request config does not reach this
process), and handed to the manager, which reserves the running requests'
growth at admission. It needs vLLM's `scheduler_reserve_full_isl` (default on):
without it vLLM never asks the admission question and nothing is reserved.
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import RequestStatus

from vllm_kvcomp.config import from_additional_config
from vllm_kvcomp.engine.kv_cache import CompressedAttentionManager, bound_blocks
from vllm_kvcomp.engine.metrics import CompressionMetrics
from vllm_kvcomp.errors import CompressionConfigError
from vllm_kvcomp.request_options import request_config

logger = logging.getLogger("vllm.kvcomp")


class CompressionSchedulerMixin(Scheduler):
    """The plugin's part of the scheduler, placed before vLLM's Scheduler or AsyncScheduler
    (AsyncScheduler subclasses Scheduler, so the MRO is mixin -> AsyncScheduler -> Scheduler)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kvcomp_config = from_additional_config(self.vllm_config.additional_config)
        managers = self.kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1 or not isinstance(managers[0], CompressedAttentionManager):
            raise RuntimeError(
                "vllm-kvcomp: expected one KV cache group of CompressedAttentionSpec layers, got "
                + ", ".join(type(m).__name__ for m in managers)
            )
        self.kvcomp_manager: CompressedAttentionManager = managers[0]
        self.kvcomp_metrics = CompressionMetrics(self.kvcomp_config)

    def add_request(self, request) -> None:
        # Streaming-input sessions come back to the worker as "new" requests that
        # keep their blocks: a compressed layout cannot be re-entered, so they are
        # served with full KV, visibly (log line + skip metric), never half-compressed.
        params = request.sampling_params
        if request.resumable and request.request_id not in self.requests and params is not None:
            if self.kvcomp_config.enabled and (params.extra_args or {}).get("kv_compression") != "none":
                params.extra_args = {**(params.extra_args or {}), "kv_compression": "none"}
                self.kvcomp_metrics.record_skip("streaming_input")
                logger.warning(
                    "vllm-kvcomp: request %s is a streaming-input session: served with full KV", request.request_id
                )
        is_new = request.request_id not in self.requests
        super().add_request(request)
        if is_new:
            self.kvcomp_manager.set_bound(request.request_id, self.request_bound(request))

    def request_bound(self, request) -> int | None:
        """`bound_blocks` of a request from its extra_args and max_tokens; None: unbounded."""
        params = request.sampling_params
        if params is None or not self.kvcomp_config.enabled:
            return None
        try:
            config = request_config(self.kvcomp_config, params.extra_args, self.max_model_len)
        except CompressionConfigError:
            return None  # refused at the API already; here it only loses its reserve
        return bound_blocks(config, request.num_prompt_tokens, request.max_tokens, self.block_size, self.max_model_len)

    def update_from_output(self, scheduler_output, model_runner_output):
        report = getattr(model_runner_output, "kvcomp_report", None)
        failed = []
        if report:
            self.apply_compression_report(report)
            failed = self.finish_failed_requests(report.failures)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self.forget_finished_bounds(scheduler_output.finished_req_ids | self.finished_req_ids)
        return self._with_failures(outputs, failed)

    def forget_finished_bounds(self, req_ids) -> None:
        """Finished requests grow no more. Every finished id passes here: ids finished between steps
        (aborts) reach the next SchedulerOutput, ids finished in this update are in finished_req_ids.
        (Without overriding vLLM's private `_free_request`; the reserve of a request whose blocks
        are freed is 0 already, so a late prune only delays the dict entry's removal.)"""
        for req_id in req_ids:
            self.kvcomp_manager.set_bound(req_id, None)
        self.kvcomp_metrics.record_growth_reserve(self.kvcomp_manager.growth_reserve)

    def _with_failures(self, outputs, failed):
        for request in failed:
            # The client hears "error" as this request's finish reason (what vLLM
            # itself sends for a KV load failure).
            outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                )
            )
        return outputs

    def finish_failed_requests(self, failures) -> list:
        """Finish requests whose eviction failed after their KV was rewritten (FINISHED_ERROR)."""
        requests = [self.requests[f.req_id] for f in failures if f.req_id in self.requests]
        requests = [r for r in requests if not r.is_finished()]
        if requests:
            self.finish_requests([r.request_id for r in requests], RequestStatus.FINISHED_ERROR)
            for failure in failures:
                self.kvcomp_metrics.record_failure(failure.reason)
        return requests

    def apply_compression_report(self, report) -> None:
        self.kvcomp_metrics.record_eviction_seconds(report.eviction_seconds, report.eviction_host_seconds)
        for skip in report.skips:
            self.kvcomp_metrics.record_skip(skip.reason)
            # Served uncompressed from now on: its growth is stock, unbounded and not reserved.
            self.kvcomp_manager.set_bound(skip.req_id, None)
        for deferred in report.deferred:
            self.kvcomp_metrics.record_decode_deferred(deferred.reason)
        # A request may be evicted many times (decode-time eviction): each record frees blocks it
        # still holds, wherever they are in its list (`CompressedAttentionManager.evict`).
        decode = []
        for record in report.evictions:
            freed = self.kvcomp_manager.evict(record.req_id, record.freed_block_ids)
            if record.phase == "decode":  # a round's records are counted together
                decode.append((record, freed))
            else:
                self.kvcomp_metrics.record_eviction(record, freed)
            logger.debug(
                "vllm-kvcomp: %s %s at %d tokens -> kept %s tokens per layer, %d blocks freed",
                record.req_id,
                record.phase,
                record.prompt_len,
                record.kept_tokens,
                freed,
            )
        self.kvcomp_metrics.record_decode_evictions(decode)


class CompressionScheduler(CompressionSchedulerMixin, Scheduler):
    pass


class AsyncCompressionScheduler(CompressionSchedulerMixin, AsyncScheduler):
    pass
