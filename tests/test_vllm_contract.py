"""The vLLM contract: every vLLM internal vllm-kvcomp relies on, pinned (docs/VLLM-CONTRACT.md).

The plugin supports exactly one vLLM (`vllm_kvcomp.SUPPORTED_VLLM_VERSION`) but reaches into
its internals: it subclasses vLLM classes and overrides their methods, replaces four methods
on vLLM classes, calls private functions and reads attributes vLLM never promised to keep.
This test pins all of it, so a vLLM upgrade fails here, in CI, and not at serve time:

* OVERRIDDEN: the signature of every vLLM method a plugin class overrides. The overrides are
  found by introspection (every class of `vllm_kvcomp.engine.*` with a vLLM base: methods
  written in the plugin whose name a vLLM base defines), so a new override that is not pinned
  fails, and so does a pin whose override is gone.
* PATCHED: the signature of every vLLM method the plugin replaces on its class, found by
  scanning the plugin's source for `<vLLM class>.<name> = ...`; same two-way check.
  PATCH_BYPASS: vLLM subclasses of a patched class that define a patched method themselves.
* CALLED, CALLED_FROM_SOURCE: vLLM functions the plugin calls (the FlashAttention kernel's
  parameters are read from vLLM's source: that module cannot be imported without a GPU).
* CALL_SITES: where vLLM calls the methods the plugin hooks; a hook vLLM stops calling is
  a silent no-op, so the call (or `return`, or `if`) must still be in vLLM's source.
* ATTRIBUTES: the fields, properties and `self.<name>` attributes the plugin reads or writes.
* EXACT_FIELDS: the dataclasses the plugin rebuilds field by field (a new field would be
  silently dropped); DEFAULTS: the `EngineArgs` defaults its checks assume; VALUES.

vLLM's side is read in a subprocess that imports vLLM and not the plugin, with
`VLLM_PLUGINS=""` so that vLLM loads no general plugin: the pinned methods are vLLM's own
even when other tests in this process have already called `vllm_kvcomp.register()`.

Updating the pins on a vLLM upgrade (after bumping SUPPORTED_VLLM_VERSION):

    python tests/test_vllm_contract.py --print

prints the generated tables (OVERRIDDEN ... VALUES) with the installed vLLM's values, then
the call sites and attributes vLLM no longer has. Read each changed line against vLLM's
source: a changed signature or call site means the override's assumptions about the base
method must be re-checked, not just re-pinned. Then update docs/VLLM-CONTRACT.md, paste
the tables over the ones below and run `ruff format` on this file.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import enum
import importlib
import importlib.util
import inspect
import json
import os
import pickle
import pkgutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "vllm_kvcomp"

PINNED_VLLM_VERSION = "0.25.1"

# "<module>:<vLLM class the plugin subclasses>.<method>" -> "<class defining it>.<method><parameters>"
# (annotations dropped; defaults that are not plain literals shown as <TypeName>).
OVERRIDDEN: dict[str, str] = {
    "vllm.v1.attention.backends.flash_attn:FlashAttentionBackend.get_builder_cls": (
        "@staticmethod FlashAttentionBackend.get_builder_cls()"
    ),
    "vllm.v1.attention.backends.flash_attn:FlashAttentionBackend.get_impl_cls": (
        "@staticmethod FlashAttentionBackend.get_impl_cls()"
    ),
    "vllm.v1.attention.backends.flash_attn:FlashAttentionBackend.get_name": (
        "@staticmethod FlashAttentionBackend.get_name()"
    ),
    "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.do_kv_cache_update": (
        "FlashAttentionImpl.do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping)"
    ),
    "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.forward": (
        "FlashAttentionImpl.forward(self, layer, query, key, value, kv_cache, attn_metadata, "
        "output, output_scale=None, output_block_scale=None)"
    ),
    "vllm.v1.attention.backends.flash_attn:FlashAttentionMetadataBuilder.build": (
        "FlashAttentionMetadataBuilder.build(self, common_prefix_len, common_attn_metadata, fast_build=False)"
    ),
    "vllm.v1.attention.backends.flash_attn:FlashAttentionMetadataBuilder.build_for_cudagraph_capture": (
        "AttentionMetadataBuilder.build_for_cudagraph_capture(self, common_attn_metadata)"
    ),
    "vllm.v1.attention.backends.flash_attn:FlashAttentionMetadataBuilder.use_cascade_attention": (
        "FlashAttentionMetadataBuilder.use_cascade_attention(self, *args, **kwargs)"
    ),
    "vllm.v1.core.sched.async_scheduler:AsyncScheduler.__init__": "AsyncScheduler.__init__(self, *args, **kwargs)",
    "vllm.v1.core.sched.async_scheduler:AsyncScheduler.add_request": "Scheduler.add_request(self, request)",
    "vllm.v1.core.sched.async_scheduler:AsyncScheduler.update_from_output": (
        "Scheduler.update_from_output(self, scheduler_output, model_runner_output)"
    ),
    "vllm.v1.core.sched.scheduler:Scheduler.__init__": (
        "Scheduler.__init__(self, vllm_config, kv_cache_config, structured_output_manager, "
        "block_size, hash_block_size=None, mm_registry=<MultiModalRegistry>, "
        "include_finished_set=False, log_stats=False)"
    ),
    "vllm.v1.core.sched.scheduler:Scheduler.add_request": "Scheduler.add_request(self, request)",
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output": (
        "Scheduler.update_from_output(self, scheduler_output, model_runner_output)"
    ),
    "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.__init__": (
        "SingleTypeKVCacheManager.__init__(self, kv_cache_spec, block_pool, enable_caching, "
        "kv_cache_group_id, scheduler_block_size, dcp_world_size=1, pcp_world_size=1, "
        "max_admission_blocks_per_request=None)"
    ),
    "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.allocate_new_blocks": (
        "SingleTypeKVCacheManager.allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model)"
    ),
    "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.get_num_blocks_to_allocate": (
        "SingleTypeKVCacheManager.get_num_blocks_to_allocate(self, request_id, num_tokens, "
        "new_computed_blocks, total_computed_tokens, num_tokens_main_model, "
        "apply_admission_cap=False)"
    ),
    "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.pop_blocks_for_free": (
        "SingleTypeKVCacheManager.pop_blocks_for_free(self, request_id)"
    ),
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner._remove_request": "GPUModelRunner._remove_request(self, req_id)",
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.add_requests": (
        "GPUModelRunner.add_requests(self, scheduler_output)"
    ),
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.profile_run": "GPUModelRunner.profile_run(self)",
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.initialize_kv_cache": (
        "GPUModelRunner.initialize_kv_cache(self, kv_cache_config)"
    ),
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.prepare_attn": "GPUModelRunner.prepare_attn(self, input_batch)",
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.prepare_dummy_attn": (
        "GPUModelRunner.prepare_dummy_attn(self, input_batch)"
    ),
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.sample_tokens": (
        "GPUModelRunner.sample_tokens(self, grammar_output)"
    ),
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.update_requests": (
        "GPUModelRunner.update_requests(self, scheduler_output)"
    ),
    "vllm.v1.worker.gpu_worker:Worker.get_kv_cache_spec": "Worker.get_kv_cache_spec(self)",
    "vllm.v1.worker.gpu_worker:Worker.init_device": "Worker.init_device(self)",
    "vllm.v1.worker.gpu_worker:Worker.initialize_from_config": "Worker.initialize_from_config(self, kv_cache_config)",
}

# Methods vllm_kvcomp/vllm_adapter.py replaces on the vLLM class (their stock signatures).
PATCHED: dict[str, str] = {
    "vllm.engine.arg_utils:EngineArgs.add_cli_args": "@staticmethod EngineArgs.add_cli_args(parser)",
    "vllm.engine.arg_utils:EngineArgs.create_engine_config": (
        "EngineArgs.create_engine_config(self, usage_context=None, headless=False)"
    ),
    "vllm.engine.arg_utils:EngineArgs.from_cli_args": "@classmethod EngineArgs.from_cli_args(args)",
    "vllm.v1.engine.input_processor:InputProcessor._validate_params": (
        "InputProcessor._validate_params(self, params, supported_tasks)"
    ),
}

# vLLM subclasses of a patched class -> the patched methods they define themselves.
PATCH_BYPASS: dict[str, dict[str, list[str]]] = {
    "vllm.engine.arg_utils:EngineArgs": {"vllm.engine.arg_utils:AsyncEngineArgs": ["add_cli_args"]},
    "vllm.v1.engine.input_processor:InputProcessor": {},
}

# vLLM functions and methods the plugin calls (private ones included).
CALLED: dict[str, str] = {
    "vllm.config.model:ModelConfig.get_sliding_window": "ModelConfig.get_sliding_window(self)",
    "vllm.config.model:ModelConfig.get_total_num_hidden_layers": "ModelConfig.get_total_num_hidden_layers(self)",
    "vllm.distributed:get_tensor_model_parallel_world_size": "get_tensor_model_parallel_world_size()",
    "vllm.distributed:tensor_model_parallel_all_reduce": "tensor_model_parallel_all_reduce(input_)",
    "vllm.exceptions:VLLMValidationError": "VLLMValidationError(message, *, parameter=None, value=None)",
    "vllm.v1.attention.backends.fa_utils:get_flash_attn_version": (
        "get_flash_attn_version(requires_alibi=False, head_size=None, head_size_v=None, has_sinks=False)"
    ),
    "vllm.v1.attention.backends.registry:register_backend": (
        "register_backend(backend, class_path=None, is_mamba=False)"
    ),
    "vllm.v1.core.block_pool:BlockPool.free_blocks": "BlockPool.free_blocks(self, ordered_blocks)",
    "vllm.v1.core.sched.scheduler:Scheduler.finish_requests": (
        "Scheduler.finish_requests(self, request_ids, finished_status)"
    ),
    "vllm.v1.engine:EngineCoreOutput": (
        "EngineCoreOutput(request_id, new_token_ids, new_logprobs=None, "
        "new_prompt_logprobs_tensors=None, pooling_output=None, finish_reason=None, "
        "stop_reason=None, events=None, kv_transfer_params=None, trace_headers=None, "
        "prefill_stats=None, routed_experts=None, num_nans_in_logits=0)"
    ),
    "vllm.v1.engine:EngineCoreOutputs": (
        "EngineCoreOutputs(engine_index=0, outputs=<Factory>, scheduler_stats=None, "
        "timestamp=0.0, utility_output=None, finished_requests=None, wave_complete=None, "
        "start_wave=None)"
    ),
    "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered": (
        "@classmethod KVCacheSpecRegistry._ensure_registered(vllm_config=None)"
    ),
    "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register": (
        "@classmethod KVCacheSpecRegistry.register(kvcache_spec_cls, manager_class=None, uniform_type_base_spec=None)"
    ),
    "vllm.v1.request:Request.get_finished_reason": "Request.get_finished_reason(self)",
    "vllm.v1.request:Request.is_finished": "Request.is_finished(self)",
    "vllm.v1.request:Request.take_events": "Request.take_events(self)",
    "vllm.v1.worker.gpu.buffer_utils:StagedWriteTensor.stage_write": (
        "StagedWriteTensor.stage_write(self, index, start, x)"
    ),
}

# Parameter names and default expressions, read from vLLM's source.
CALLED_FROM_SOURCE: dict[str, str] = {
    "vllm.vllm_flash_attn.flash_attn_interface:flash_attn_varlen_func": (
        "flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, "
        "cu_seqlens_k=None, seqused_k=None, q_v=None, dropout_p=0.0, softmax_scale=None, "
        "causal=False, window_size=None, softcap=0.0, alibi_slopes=None, "
        "deterministic=False, return_attn_probs=False, block_table=None, "
        "return_softmax_lse=False, out=None, scheduler_metadata=None, q_descale=None, "
        "k_descale=None, v_descale=None, num_splits=0, output_scale=None, "
        "fa_version=DEFAULT_FA_VERSION, s_aux=None, cp_world_size=1, cp_rank=0, "
        "cp_tot_seqused_k=None, mask_mod=None, aux_tensors=None, dynamic_causal=None)"
    ),
}

# "<module>:<function>" -> what its source must still contain (`calls X`, `returns X`, `if X`)
# for the plugin's hooks to run and its assumptions to hold.
CALL_SITES: dict[str, list[str]] = {
    # engine core -> the plugin's scheduler (update_from_output applies the eviction report)
    "vllm.v1.engine.core:EngineCore.add_request": ["calls self.scheduler.add_request"],
    "vllm.v1.engine.core:EngineCore.step": ["calls self.scheduler.update_from_output"],
    "vllm.v1.engine.core:EngineCore.step_with_batch_queue": ["calls self.scheduler.update_from_output"],
    "vllm.config.scheduler:SchedulerConfig.get_scheduler_cls": ["calls resolve_obj_by_qualname"],
    # requests the plugin finished (FINISHED_ERROR) before vLLM processes the step are skipped
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output": ["if request is None or request.is_finished()"],
    # /metrics renders prometheus_client's global registry, where the plugin's collector sits
    "vllm.entrypoints.serve.instrumentator.metrics:attach_router": ["calls get_prometheus_registry"],
    "vllm.v1.metrics.prometheus:get_prometheus_registry": [
        "if os.getenv('PROMETHEUS_MULTIPROC_DIR') is not None",
        "returns REGISTRY",
    ],
    "vllm.v1.worker.worker_base:WorkerWrapperBase.init_worker": [
        "calls load_general_plugins",
        "calls resolve_obj_by_qualname",
    ],
    # scheduler -> the plugin's KV cache manager
    "vllm.v1.core.single_type_kv_cache_manager:get_manager_for_kv_cache_spec": [
        "calls KVCacheSpecRegistry.get_manager_class",
    ],
    "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered": ["if _REGISTRY_KVCACHESPEC_LIST"],
    "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator.get_num_blocks_to_allocate": [
        "calls manager.get_num_blocks_to_allocate",
    ],
    "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator.allocate_new_blocks": ["calls manager.allocate_new_blocks"],
    "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator.pop_blocks_for_free": ["calls manager.pop_blocks_for_free"],
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.free": ["calls self.pop_blocks_for_free"],
    # admission (lifetime budgets): the growth reserve is added where the full sequence must fit
    "vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots": [
        "if full_sequence_must_fit",
        "calls self.coordinator.get_num_blocks_to_allocate",
    ],
    # worker -> the plugin's runner hooks
    "vllm.v1.worker.gpu_worker:Worker.init_device": ["calls GPUModelRunnerV2"],
    "vllm.v1.worker.gpu_worker:Worker.initialize_from_config": ["calls self.model_runner.initialize_kv_cache"],
    "vllm.v1.worker.gpu_worker:Worker.sample_tokens": ["returns self.model_runner.sample_tokens(grammar_output)"],
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.execute_model": [
        "calls self.add_requests",
        "calls self.block_tables.apply_staged_writes",
        "calls self.finish_requests",
        "calls self.prepare_attn",
        "calls self.prepare_dummy_attn",
        "calls self.update_requests",
    ],
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.finish_requests": ["calls self._remove_request"],
    "vllm.v1.worker.gpu.async_utils:AsyncOutput.get_output": ["returns self.model_runner_output"],
    # the KV cache layout the pool, the compaction kernels and the attention backend assume
    "vllm.v1.attention.backends.flash_attn:FlashAttentionBackend.get_kv_cache_shape": [
        "returns (num_blocks, 2, block_size, num_kv_heads, head_size)",
    ],
    "vllm.v1.worker.gpu.attn_utils:build_attn_metadata": [
        "calls attn_metadata_builder.build",
        "calls attn_metadata_builder.build_for_cudagraph_capture",
    ],
    # front end -> the patched methods
    "vllm.engine.arg_utils:AsyncEngineArgs.add_cli_args": ["calls EngineArgs.add_cli_args"],
    "vllm.v1.engine.input_processor:InputProcessor.process_inputs": ["calls self._validate_params"],
}

# Attributes the plugin reads or writes, per vLLM class.
ATTRIBUTES: dict[str, list[str]] = {
    "vllm.config.attention:AttentionConfig": ["backend"],
    "vllm.config.cache:CacheConfig": ["block_size", "cache_dtype", "enable_prefix_caching"],
    "vllm.config.compilation:CompilationConfig": ["static_forward_context"],
    "vllm.config.model:ModelConfig": [
        "get_sliding_window",
        "get_total_num_hidden_layers",
        "hf_text_config",
        "is_attention_free",
        "is_encoder_decoder",
        "is_hybrid",
        "is_multimodal_model",
        "runner_type",
        "use_mla",
    ],
    "vllm.config.parallel:ParallelConfig": ["worker_cls"],
    "vllm.config.scheduler:SchedulerConfig": ["async_scheduling", "scheduler_cls"],
    "vllm.config.vllm:VllmConfig": [
        "additional_config",
        "cache_config",
        "compilation_config",
        "model_config",
        "parallel_config",
        "scheduler_config",
        "use_v2_model_runner",
    ],
    "vllm.engine.arg_utils:EngineArgs": [
        "additional_config",
        "attention_backend",
        "attention_config",
        "block_size",
        "data_parallel_size",
        "decode_context_parallel_size",
        "enable_prefix_caching",
        "kv_cache_dtype",
        "kv_offloading_size",
        "kv_transfer_config",
        "pipeline_parallel_size",
        "prefill_context_parallel_size",
        "scheduler_cls",
        "speculative_config",
        "worker_cls",
    ],
    "vllm.model_executor.layers.attention.attention:Attention": [
        "_k_scale",
        "_q_scale",
        "_v_scale",
        "impl",
        "layer_name",
    ],
    "vllm.sampling_params:SamplingParams": ["extra_args"],
    "vllm.v1.attention.backend:CommonAttentionMetadata": ["block_table_tensor", "seq_lens"],
    "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl": [
        "alibi_slopes",
        "logits_soft_cap",
        "num_heads",
        "num_kv_heads",
        "scale",
        "sinks",
        "supports_quant_query_input",
        "vllm_flash_attn_version",
    ],
    "vllm.v1.attention.backends.flash_attn:FlashAttentionMetadata": [
        "max_num_splits",
        "max_query_len",
        "max_seq_len",
        "num_actual_tokens",
        "query_start_loc",
        "scheduler_metadata",
    ],
    "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator": ["single_type_managers"],
    "vllm.v1.core.kv_cache_manager:KVCacheManager": ["coordinator"],
    "vllm.v1.core.kv_cache_utils:KVCacheBlock": ["block_id"],
    "vllm.v1.core.sched.output:CachedRequestData": ["new_block_ids", "req_ids"],
    "vllm.v1.core.sched.output:NewRequestData": ["block_ids", "prompt_token_ids", "req_id", "sampling_params"],
    "vllm.v1.core.sched.output:SchedulerOutput": ["finished_req_ids", "scheduled_cached_reqs", "scheduled_new_reqs"],
    "vllm.v1.core.sched.scheduler:Scheduler": ["finish_requests", "kv_cache_manager", "requests", "vllm_config"],
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager": ["block_pool", "block_size", "req_to_blocks"],
    "vllm.v1.engine.input_processor:InputProcessor": ["vllm_config"],
    "vllm.v1.engine:EngineCoreOutput": ["events", "finish_reason", "new_token_ids", "request_id", "trace_headers"],
    "vllm.v1.engine:EngineCoreOutputs": ["outputs"],
    "vllm.v1.request:Request": [
        "client_index",
        "get_finished_reason",
        "is_finished",
        "request_id",
        "resumable",
        "sampling_params",
        "take_events",
        "trace_headers",
    ],
    "vllm.v1.kv_cache_interface:FullAttentionSpec": ["attention_chunk_size", "block_size", "sliding_window"],
    "vllm.v1.kv_cache_interface:KVCacheConfig": ["kv_cache_groups", "kv_cache_tensors", "num_blocks"],
    "vllm.v1.kv_cache_interface:KVCacheGroupSpec": ["kv_cache_spec", "layer_names"],
    "vllm.v1.worker.gpu.async_utils:AsyncOutput": ["model_runner_output"],
    "vllm.v1.worker.gpu.block_table:BlockTables": ["block_tables", "blocks_per_kv_block", "input_block_tables"],
    "vllm.v1.worker.gpu.input_batch:InputBatch": [
        "idx_mapping",
        "is_prefilling_np",
        "num_computed_tokens_np",
        "num_reqs",
        "num_scheduled_tokens",
        "query_start_loc_np",
        "req_ids",
    ],
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner": ["block_tables", "kv_caches", "max_num_reqs", "req_states"],
    "vllm.v1.worker.gpu.states:RequestState": ["req_id_to_index"],
    "vllm.v1.worker.gpu_worker:Worker": ["model_runner", "use_v2_model_runner", "vllm_config"],
}

# Dataclasses the plugin rebuilds field by field: all their fields, in order.
EXACT_FIELDS: dict[str, list[str]] = {
    "vllm.v1.kv_cache_interface:FullAttentionSpec": [
        "block_size",
        "num_kv_heads",
        "head_size",
        "dtype",
        "kv_quant_mode",
        "page_size_padded",
        "indexes_kv_by_block_stride",
        "head_size_v",
        "sliding_window",
        "attention_chunk_size",
        "non_causal",
    ],
    "vllm.v1.kv_cache_interface:KVCacheTensor": ["size", "shared_by", "offset", "block_stride"],
}

# Defaults the plugin's checks (engine/requirements.py) assume.
DEFAULTS: dict[str, dict[str, str]] = {
    "vllm.engine.arg_utils:EngineArgs": {
        "attention_backend": "None",
        "block_size": "None",
        "data_parallel_size": "1",
        "decode_context_parallel_size": "1",
        "enable_prefix_caching": "None",
        "kv_cache_dtype": "'auto'",
        "kv_offloading_size": "None",
        "kv_transfer_config": "None",
        "pipeline_parallel_size": "1",
        "prefill_context_parallel_size": "1",
        "scheduler_cls": "None",
        "speculative_config": "None",
        "worker_cls": "'auto'",
    },
}

# Module-level values and enum members the plugin uses.
VALUES: dict[str, str] = {
    "vllm.plugins:DEFAULT_PLUGINS_GROUP": "'vllm.general_plugins'",
    "vllm.v1.attention.backends.registry:AttentionBackendEnum.CUSTOM": "AttentionBackendEnum.CUSTOM",
    "vllm.v1.request:RequestStatus.FINISHED_ERROR": "RequestStatus.FINISHED_ERROR",
}


# --------------------------------------------------------------------------------------
# Reading vLLM (runs in the subprocess, where vllm_kvcomp is never imported)
# --------------------------------------------------------------------------------------


class _Shown:
    """A default value shown by a fixed text (no memory addresses in the pins)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _value_text(value) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, (tuple, frozenset)) and all(
        v is None or isinstance(v, (bool, int, float, str)) for v in value
    ):
        return repr(value)
    return f"<{type(value).__name__}>"


def _signature_text(func) -> str:
    """Parameters, kinds and defaults; annotations dropped (they are strings or aliases)."""
    sig = inspect.signature(func)  # follows functools.wraps' __wrapped__
    params = [
        p.replace(
            annotation=inspect.Parameter.empty,
            default=p.default if p.default is inspect.Parameter.empty else _Shown(_value_text(p.default)),
        )
        for p in sig.parameters.values()
    ]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _resolve(dotted: str):
    """'pkg.module:Outer.name' -> the object."""
    module_name, _, qualname = dotted.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def _split(key: str) -> tuple[str, str]:
    """'pkg.module:Class.method' -> ('pkg.module:Class', 'method')."""
    owner, _, name = key.rpartition(".")
    if ":" not in owner:  # a module-level function: 'pkg.module:function'
        owner, _, name = key.partition(":")
        owner += ":"
    return owner, name


def method_text(key: str) -> str:
    owner_key, name = _split(key)
    try:
        owner = _resolve(owner_key)
    except (ImportError, AttributeError) as exc:
        return f"<missing: {exc}>"
    if not inspect.isclass(owner):
        func = getattr(owner, name, None)
        return "<missing>" if func is None else name + _signature_text(func)
    definer = next((c for c in owner.__mro__ if name in vars(c)), None)
    if definer is None:
        return "<missing>"
    raw = vars(definer)[name]
    prefix = (
        "@staticmethod " if isinstance(raw, staticmethod) else "@classmethod " if isinstance(raw, classmethod) else ""
    )
    return f"{prefix}{definer.__qualname__}.{name}{_signature_text(getattr(owner, name))}"


def _vllm_source_path(module_name: str) -> Path:
    vllm_dir = Path(importlib.util.find_spec("vllm").origin).parent
    return vllm_dir.joinpath(*module_name.split(".")[1:]).with_suffix(".py")


def source_function_text(key: str) -> str:
    """A module-level function's parameters as written in vLLM's source (no import)."""
    module_name, _, name = key.partition(":")
    path = _vllm_source_path(module_name)
    if not path.exists():
        return f"<missing: {path}>"
    tree = ast.parse(path.read_text())
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        return "<missing>"
    args = copy.deepcopy(node.args)
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if arg is not None:
            arg.annotation = None
    return f"{name}({ast.unparse(args)})"


def _class_sources(cls):
    for klass in cls.__mro__:
        if klass.__module__.partition(".")[0] != "vllm":
            continue
        try:
            yield klass, ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue


def _attribute_targets(tree):
    """Every `x.attr` assigned to (`=`, annotated or augmented) in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        else:
            continue
        for target in (t for tt in targets for t in _assigned_names(tt)):
            if isinstance(target, ast.Attribute):
                yield target


def _assigned_names(target) -> list[ast.expr]:
    if isinstance(target, (ast.Tuple, ast.List)):
        return [t for elt in target.elts for t in _assigned_names(elt)]
    if isinstance(target, ast.Starred):
        return _assigned_names(target.value)
    return [target]


def attribute_names(cls) -> set[str]:
    """Names an instance of a vLLM class has: class attributes, fields, `self.x = ...`, buffers."""
    names = set(dir(cls))
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    names |= set(getattr(cls, "__struct_fields__", ()))  # msgspec structs (SamplingParams)
    for klass, tree in _class_sources(cls):
        for target in _attribute_targets(tree):
            if isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
        # nn.Module buffers registered by module-level helpers (the attention layer's scales)
        module_tree = ast.parse(Path(inspect.getsourcefile(klass)).read_text())
        for node in ast.walk(module_tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "register_buffer"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value)
    return names


def call_site_facts(func) -> set[str]:
    """`calls X`, `returns X` and `if X` for every call, return and if of a function's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    facts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            facts.add(f"calls {ast.unparse(node.func)}")
        elif isinstance(node, ast.Return) and node.value is not None:
            facts.add(f"returns {ast.unparse(node.value)}")
        elif isinstance(node, ast.If):
            facts.add(f"if {ast.unparse(node.test)}")
    return facts


def _field_default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return _value_text(field.default)
    if field.default_factory is not dataclasses.MISSING:
        factory = field.default_factory
        return f"<factory {getattr(factory, '__name__', type(factory).__name__)}>"
    return "<required>"


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def collect(extra_methods: list[str] = (), extra_patched: list[str] = ()) -> dict:
    """Everything the pins describe, as the installed vLLM has it (plus extra method keys)."""
    import vllm

    result: dict = {"vllm_version": vllm.__version__}
    method_keys = sorted({*OVERRIDDEN, *PATCHED, *CALLED, *extra_methods, *extra_patched})
    result["methods"] = {key: method_text(key) for key in method_keys}
    result["source_functions"] = {key: source_function_text(key) for key in CALLED_FROM_SOURCE}

    patched_names: dict[str, set[str]] = {}
    for key in {*PATCHED, *extra_patched}:
        owner_key, name = _split(key)
        patched_names.setdefault(owner_key, set()).add(name)
    result["patch_bypass"] = {}
    for owner_key, names in sorted(patched_names.items()):
        owner = _resolve(owner_key)
        result["patch_bypass"][owner_key] = {
            f"{sub.__module__}:{sub.__qualname__}": sorted(names & set(vars(sub)))
            for sub in _subclasses(owner)
            if names & set(vars(sub))
        }

    result["call_sites"] = {}
    for key, wanted in CALL_SITES.items():
        try:
            facts = call_site_facts(_resolve(key))
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            facts = {f"<missing: {exc}>"}
        result["call_sites"][key] = {"missing": sorted(set(wanted) - facts), "facts": sorted(facts)}

    result["attributes_missing"] = {}
    for key, names in ATTRIBUTES.items():
        try:
            present = attribute_names(_resolve(key))
        except (ImportError, AttributeError) as exc:
            present, names = set(), [f"<class missing: {exc}>"]
        result["attributes_missing"][key] = sorted(set(names) - present)

    result["exact_fields"] = {key: [f.name for f in dataclasses.fields(_resolve(key))] for key in EXACT_FIELDS}
    result["defaults"] = {}
    for key, pinned in DEFAULTS.items():
        fields = {f.name: f for f in dataclasses.fields(_resolve(key))}
        result["defaults"][key] = {
            name: _field_default_text(fields[name]) if name in fields else "<missing>" for name in pinned
        }
    values = {}
    for key in VALUES:
        try:
            values[key] = _value_text(_resolve(key))
        except (ImportError, AttributeError):
            values[key] = "<missing>"
    result["values"] = values

    # The collection must have seen stock vLLM: no plugin imported, nothing patched.
    from vllm.engine.arg_utils import EngineArgs

    result["plugin_loaded"] = "vllm_kvcomp" in sys.modules or hasattr(EngineArgs, "_vllm_kvcomp_wrapped")
    return result


def run_collect(extra_methods: list[str] = (), extra_patched: list[str] = ()) -> dict:
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_LOGGING_LEVEL": "ERROR"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "contract.json"
        proc = subprocess.run(
            [sys.executable, __file__, "--collect", str(out), json.dumps([list(extra_methods), list(extra_patched)])],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"collecting vLLM's side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------------
# Reading the plugin (this process)
# --------------------------------------------------------------------------------------


def _is_vllm(cls) -> bool:
    return cls.__module__.partition(".")[0] == "vllm"


def plugin_modules() -> list:
    import vllm_kvcomp.engine

    return [
        importlib.import_module(f"vllm_kvcomp.engine.{info.name}")
        for info in pkgutil.iter_modules(vllm_kvcomp.engine.__path__)
    ]


def find_overrides(classes) -> dict[str, str]:
    """Methods written in a plugin class whose name a vLLM base class defines.

    Key: '<module>:<first vLLM class in the MRO>.<method>'; value: the plugin class.
    Methods generated by @dataclass (no source file of their own) are not overrides.
    """
    found: dict[str, str] = {}
    for cls in classes:
        mro = cls.__mro__
        vllm_bases = [c for c in mro if _is_vllm(c)]
        if not vllm_bases:
            continue
        first = vllm_bases[0]
        for i, klass in enumerate(mro):
            if _is_vllm(klass) or klass.__module__ in ("builtins", "abc", "typing"):
                continue
            source_file = getattr(sys.modules.get(klass.__module__), "__file__", None)
            for name, raw in vars(klass).items():
                func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
                if not inspect.isfunction(func) or func.__code__.co_filename != source_file:
                    continue
                if any(name in vars(base) for base in mro[i + 1 :] if _is_vllm(base)):
                    found[f"{first.__module__}:{first.__qualname__}.{name}"] = f"{cls.__module__}.{cls.__qualname__}"
    return found


def plugin_overrides() -> dict[str, str]:
    classes = [
        obj
        for module in plugin_modules()
        for obj in vars(module).values()
        if inspect.isclass(obj) and obj.__module__ == module.__name__
    ]
    return find_overrides(classes)


def plugin_patches() -> dict[str, str]:
    """`<name imported from vllm>.<attr> = ...` anywhere in the plugin's source."""
    found: dict[str, str] = {}
    for path in sorted(PLUGIN_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {
            alias.asname or alias.name: node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.partition(".")[0] == "vllm"
            for alias in node.names
        }
        for target in _attribute_targets(tree):
            if isinstance(target.value, ast.Name) and target.value.id in imported:
                key = f"{imported[target.value.id]}:{target.value.id}.{target.attr}"
                found[key] = f"{path.relative_to(ROOT)}:{target.lineno}"
    return found


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_side() -> dict:
    return run_collect()


def test_pinned_version_is_the_supported_one(vllm_side):
    import vllm_kvcomp

    assert vllm_kvcomp.SUPPORTED_VLLM_VERSION == PINNED_VLLM_VERSION, (
        "SUPPORTED_VLLM_VERSION changed: re-pin (python tests/test_vllm_contract.py --print)"
    )
    assert vllm_side["vllm_version"] == PINNED_VLLM_VERSION


def test_collection_saw_stock_vllm(vllm_side):
    assert not vllm_side["plugin_loaded"], "the subprocess must read vLLM without vllm_kvcomp"


@pytest.mark.parametrize("key", sorted({**OVERRIDDEN, **PATCHED, **CALLED}))
def test_method_signature(vllm_side, key):
    pinned = {**OVERRIDDEN, **PATCHED, **CALLED}[key]
    assert vllm_side["methods"][key] == pinned, f"vLLM changed {key}: re-check the plugin's use of it"


@pytest.mark.parametrize("key", sorted(CALLED_FROM_SOURCE))
def test_source_function_signature(vllm_side, key):
    assert vllm_side["source_functions"][key] == CALLED_FROM_SOURCE[key]


def test_every_override_is_pinned():
    found = plugin_overrides()
    unpinned = sorted(set(found) - set(OVERRIDDEN))
    stale = sorted(set(OVERRIDDEN) - set(found))
    assert not unpinned, f"plugin overrides vLLM methods that are not pinned: {[(k, found[k]) for k in unpinned]}"
    assert not stale, f"pinned overrides the plugin no longer has: {stale}"


def test_every_monkeypatch_is_pinned():
    found = plugin_patches()
    unpinned = sorted(set(found) - set(PATCHED))
    stale = sorted(set(PATCHED) - set(found))
    assert not unpinned, f"plugin patches vLLM methods that are not pinned: {[(k, found[k]) for k in unpinned]}"
    assert not stale, f"pinned patches the plugin no longer makes: {stale}"


def test_no_vllm_subclass_bypasses_a_patch(vllm_side):
    assert vllm_side["patch_bypass"] == PATCH_BYPASS


@pytest.mark.parametrize("key", sorted(CALL_SITES))
def test_vllm_still_calls_the_hooks(vllm_side, key):
    missing = vllm_side["call_sites"][key]["missing"]
    assert not missing, f"{key} no longer contains {missing}"


@pytest.mark.parametrize("key", sorted(ATTRIBUTES))
def test_attributes_exist(vllm_side, key):
    assert vllm_side["attributes_missing"][key] == [], f"{key} lost attributes the plugin uses"


@pytest.mark.parametrize("key", sorted(EXACT_FIELDS))
def test_rebuilt_dataclasses_have_the_pinned_fields(vllm_side, key):
    assert vllm_side["exact_fields"][key] == EXACT_FIELDS[key]


def test_engine_args_defaults(vllm_side):
    assert vllm_side["defaults"] == DEFAULTS


def test_values(vllm_side):
    assert vllm_side["values"] == VALUES


def test_signature_pins_can_fail():
    """A changed parameter, default or kind changes the pinned text; a new override is found."""

    class Base:
        __module__ = "vllm.fake"

        def step(self, output, flag=False): ...

    class Changed:
        def step(self, output, flag=True, extra=None): ...

    assert _signature_text(Base.step) == "(self, output, flag=False)"
    assert _signature_text(Changed.step) != _signature_text(Base.step)

    plugin_module = sys.modules[__name__]

    class Plugin(Base):
        __module__ = plugin_module.__name__

        def step(self, output, flag=False): ...

    assert find_overrides([Plugin]) == {
        "vllm.fake:test_signature_pins_can_fail.<locals>.Base.step": f"{__name__}.{Plugin.__qualname__}"
    }


def test_from_full_attention_copies_every_field():
    """CompressedAttentionSpec.from_full_attention passes FullAttentionSpec's fields one by one."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode

    from vllm_kvcomp.engine.kv_cache import CompressedAttentionSpec

    sample = {
        "block_size": 32,
        "num_kv_heads": 3,
        "head_size": 80,
        "dtype": torch.float16,
        "kv_quant_mode": list(KVQuantMode)[-1],
        "page_size_padded": 1 << 20,
        "indexes_kv_by_block_stride": True,
        "head_size_v": 48,
        "sliding_window": 64,
        "attention_chunk_size": 128,
        "non_causal": True,
    }
    names = [f.name for f in dataclasses.fields(FullAttentionSpec)]
    assert set(names) <= set(sample), f"new FullAttentionSpec fields: {set(names) - set(sample)}"
    spec = FullAttentionSpec(**{name: sample[name] for name in names})
    converted = CompressedAttentionSpec.from_full_attention(spec)
    assert {n: getattr(converted, n) for n in names} == {n: getattr(spec, n) for n in names}


def test_model_runner_output_carries_the_report():
    """The worker sets `kvcomp_report` on ModelRunnerOutput; it must survive the pickle to the scheduler."""
    from vllm.v1.outputs import ModelRunnerOutput

    assert "kvcomp_report" not in {f.name for f in dataclasses.fields(ModelRunnerOutput)}
    output = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    output.kvcomp_report = {"evictions": [1]}
    assert pickle.loads(pickle.dumps(output)).kvcomp_report == {"evictions": [1]}


# --------------------------------------------------------------------------------------
# python tests/test_vllm_contract.py --print | --collect OUT [JSON [methods, patched]]
# --------------------------------------------------------------------------------------


def _py(value) -> str:
    """A Python literal, double-quoted, long strings split at ", " (ruff format lays it out)."""
    if isinstance(value, str):
        if len(value) <= 80:
            return json.dumps(value)
        chunks, line = [], ""
        for piece in value.split(", "):
            if line and len(line) + len(piece) > 80:
                chunks.append(line + ", ")
                line = ""
            line += piece if not line else ", " + piece
        return "(" + " ".join(json.dumps(c) for c in [*chunks, line]) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    return repr(value)


def _print_tables() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs to stdout
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    overrides, patches = plugin_overrides(), plugin_patches()
    side = run_collect(sorted(overrides), sorted(patches))
    methods = side["methods"]

    def show(name, table):
        print(f"{name} = {{")
        for key in sorted(table):
            value = _py(table[key])
            if len(f"    {json.dumps(key)}: {value},") > 120 and value.startswith('"'):
                value = f"({value})"
            print(f"    {json.dumps(key)}: {value},")
        print("}\n")

    print(f"# vLLM {side['vllm_version']}\n")
    print(f'PINNED_VLLM_VERSION = "{side["vllm_version"]}"\n')
    show("OVERRIDDEN: dict[str, str]", {k: methods[k] for k in overrides})
    show("PATCHED: dict[str, str]", {k: methods[k] for k in patches})
    show("PATCH_BYPASS: dict[str, dict[str, list[str]]]", side["patch_bypass"])
    show("CALLED: dict[str, str]", {k: methods[k] for k in CALLED})
    show("CALLED_FROM_SOURCE: dict[str, str]", side["source_functions"])
    show("EXACT_FIELDS: dict[str, list[str]]", side["exact_fields"])
    show("DEFAULTS: dict[str, dict[str, str]]", side["defaults"])
    show("VALUES: dict[str, str]", side["values"])
    print("# CALL_SITES and ATTRIBUTES are the plugin's needs (edit them by hand); what vLLM no longer has:")
    gone = [
        f"#   {key}: missing {site['missing']}; it now has {site['facts']}"
        for key, site in sorted(side["call_sites"].items())
        if site["missing"]
    ] + [
        f"#   {key}: missing attributes {missing}"
        for key, missing in sorted(side["attributes_missing"].items())
        if missing
    ]
    print("\n".join(gone) or "#   nothing")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--collect"]:
        extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else [[], []]
        Path(sys.argv[2]).write_text(json.dumps(collect(*extra), indent=1))
    elif sys.argv[1:2] == ["--print"]:
        _print_tables()
    else:
        sys.exit(__doc__)
