"""vLLM scheduler that applies the workers' eviction reports.

Installed through `SchedulerConfig.scheduler_cls` (an extension point). Before
vLLM processes a step's output, the blocks the worker freed are dropped from
their requests and returned to the BlockPool, so the very next `schedule()`
call can admit more requests.
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvcomp.config import from_additional_config
from vllm_kvcomp.engine.kv_cache import CompressedAttentionManager
from vllm_kvcomp.engine.metrics import CompressionMetrics

logger = logging.getLogger("vllm.kvcomp")


class CompressionSchedulerMixin:
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

    def update_from_output(self, scheduler_output, model_runner_output):
        report = getattr(model_runner_output, "kvcomp_report", None)
        if report:
            self.apply_compression_report(report)
        return super().update_from_output(scheduler_output, model_runner_output)

    def apply_compression_report(self, report) -> None:
        for skip in report.skips:
            self.kvcomp_metrics.record_skip(skip.reason)
        for record in report.evictions:
            freed = self.kvcomp_manager.evict(record.req_id, record.freed_block_ids)
            self.kvcomp_metrics.record_eviction(record, freed)
            logger.debug(
                "vllm-kvcomp: %s prompt %d -> kept %s tokens per layer, %d blocks freed",
                record.req_id,
                record.prompt_len,
                record.kept_tokens,
                freed,
            )


class CompressionScheduler(CompressionSchedulerMixin, Scheduler):
    pass


class AsyncCompressionScheduler(CompressionSchedulerMixin, AsyncScheduler):
    pass
