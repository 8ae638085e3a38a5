"""vLLM GPU worker and V2 model runner with the eviction engine wired in.

Installed through `ParallelConfig.worker_cls` (an extension point). The worker:
  * declares every full-attention layer as `CompressedAttentionSpec`,
  * allocates the KV cache as ONE pool shared by all layers (so a layer's
    survivors can sit in another layer's page of the same block), and
  * gives its model runner the hooks of the runtime: request lifecycle, the
    step's capture plan before attention metadata is built, and eviction after
    sampling, whose report rides on the ModelRunnerOutput to the scheduler.
"""

from __future__ import annotations

import copy
import logging

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor
from vllm.v1.worker.gpu.model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_kvcomp.config import CompressionConfigError, from_additional_config, request_config
from vllm_kvcomp.engine.kv_cache import CompressedAttentionSpec
from vllm_kvcomp.engine.memory import plugin_memory
from vllm_kvcomp.engine.runtime import CompressionRuntime, set_runtime
from vllm_kvcomp.engine.timing import profiled

logger = logging.getLogger("vllm.kvcomp")


def pooled_kv_cache_config(kv_cache_config):
    """The same memory as one tensor shared by every layer (see engine/layout.py)."""
    if len(kv_cache_config.kv_cache_groups) != 1:
        raise RuntimeError(f"vllm-kvcomp: expected one KV cache group, got {len(kv_cache_config.kv_cache_groups)}")
    (group,) = kv_cache_config.kv_cache_groups
    if not isinstance(group.kv_cache_spec, CompressedAttentionSpec):
        raise RuntimeError(f"vllm-kvcomp: unexpected KV cache spec {type(group.kv_cache_spec).__name__}")
    pooled = copy.copy(kv_cache_config)
    pooled.kv_cache_tensors = [
        KVCacheTensor(size=sum(t.size for t in kv_cache_config.kv_cache_tensors), shared_by=list(group.layer_names))
    ]
    return pooled


class CompressionModelRunner(GPUModelRunner):
    """vLLM's V2 GPU model runner plus the runtime's hooks (no other change)."""

    kvcomp: CompressionRuntime

    def profile_run(self) -> None:
        super().profile_run()
        # vLLM sizes the KV cache from the peak memory of this run: allocate what the plugin
        # will hold besides it (page tables, capture buffers, the decode ring when evict_every
        # is set, the eviction workspace) once here.
        reserve = plugin_memory(self.vllm_config, self.kvcomp.config).total_bytes
        torch.empty(reserve, dtype=torch.uint8, device=self.device)
        logger.info("vllm-kvcomp: %.0f MiB reserved for page tables, capture buffers and eviction", reserve / 2**20)

    def initialize_kv_cache(self, kv_cache_config) -> None:
        super().initialize_kv_cache(kv_cache_config)
        self.kvcomp.bind(self, kv_cache_config)

    def add_requests(self, scheduler_output) -> None:
        super().add_requests(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            index = self.req_states.req_id_to_index[new.req_id]
            # The original prompt, also when a preempted request comes back with its
            # generated tokens to re-prefill: its prompt is compressed with the
            # prompt's own observation window (README, "Preemption").
            prompt_len = len(new.prompt_token_ids)
            self.kvcomp.add_request(new.req_id, index, new.block_ids[0], prompt_len, self._request_config(new))

    def _request_config(self, new):
        """Per-request method/budget (validated by the front end, vllm_adapter)."""
        params = new.sampling_params
        try:
            extra_args = params.extra_args if params is not None else None
            geometry = getattr(self.kvcomp, "geometry", None)  # set once the KV pool is bound
            block_size = geometry.block_size if geometry is not None else None
            return request_config(self.kvcomp.config, extra_args, block_size=block_size)
        except CompressionConfigError as err:  # not validated (another entry point): the server's settings
            logger.warning("vllm-kvcomp: request %s: %s; using the server's settings", new.req_id, err)
            return None

    def update_requests(self, scheduler_output) -> None:
        super().update_requests(scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_block_ids in zip(cached.req_ids, cached.new_block_ids):
            if new_block_ids is not None:
                self.kvcomp.append_blocks(req_id, new_block_ids[0])
        self.write_rehomed_rows()

    def write_rehomed_rows(self) -> None:
        """Stage the ids that decode-time evictions re-homed (engine/decode_eviction.py) into their
        requests' block-table rows. `execute_model` applies staged writes right after
        `update_requests` (`BlockTables.apply_staged_writes`), before this step's block tables and
        slot mappings are built from the rows. Writes of requests removed since (finished or
        preempted: the runner may have given their row to another request) are dropped."""
        for req, start, block_ids in self.kvcomp.decode_evictor.take_row_writes():
            if self.kvcomp.requests.get(req.req_id) is req:
                self.write_block_ids(req.index, start, block_ids)

    def write_block_ids(self, req_index: int, start: int, block_ids: list[int]) -> None:
        """Overwrite positions `start..` of a request's block-table row (KV blocks, expanded to
        kernel blocks as `BlockTables.append_block_ids` does); its block count is unchanged."""
        tables = self.block_tables
        per = tables.blocks_per_kv_block[0]
        ids = [b * per + k for b in block_ids for k in range(per)]
        tables.block_tables[0].stage_write(req_index, start * per, ids)

    def _remove_request(self, req_id: str) -> bool:
        self.kvcomp.remove_request(req_id)
        return super()._remove_request(req_id)

    def prepare_attn(self, input_batch):
        with profiled("kvcomp::begin_step"):
            self.kvcomp.begin_step(input_batch)
        return super().prepare_attn(input_batch)

    def prepare_dummy_attn(self, input_batch):
        self.kvcomp.begin_dummy_step()
        return super().prepare_dummy_attn(input_batch)

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        with torch.inference_mode(), profiled("kvcomp::end_step"):
            report = self.kvcomp.end_step()
        if report is not None and output is not None:
            target = getattr(output, "model_runner_output", output)
            target.kvcomp_report = report
        return output


class CompressionWorker(Worker):
    def init_device(self) -> None:
        super().init_device()
        if not self.use_v2_model_runner:
            raise CompressionConfigError("vllm-kvcomp: needs vLLM's V2 model runner (unset VLLM_USE_V2_MODEL_RUNNER)")
        config = from_additional_config(self.vllm_config.additional_config)
        # The runner is built by Worker.init_device; give it the hooks by
        # switching it to the subclass (it adds no state of its own).
        self.model_runner.__class__ = CompressionModelRunner
        runtime = CompressionRuntime(config, self.vllm_config)
        self.model_runner.kvcomp = runtime
        set_runtime(runtime)

    def get_kv_cache_spec(self):
        specs = super().get_kv_cache_spec()
        converted = {}
        for name, spec in specs.items():
            if type(spec) is not FullAttentionSpec or spec.sliding_window or spec.attention_chunk_size:
                raise CompressionConfigError(
                    f"vllm-kvcomp: layer {name} uses {type(spec).__name__}; only full attention can be compressed"
                )
            if spec.non_causal:  # the plugin's attention is causal: a prefix-LM would be served wrongly
                raise CompressionConfigError(
                    f"vllm-kvcomp: layer {name} uses non-causal attention; only causal decoders can be compressed"
                )
            converted[name] = CompressedAttentionSpec.from_full_attention(spec)
        return converted

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(pooled_kv_cache_config(kv_cache_config))
