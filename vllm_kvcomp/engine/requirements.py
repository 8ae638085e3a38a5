"""What compression needs from the engine, checked before anything starts.

Each refusal is one line saying which option and why; each forced change is
logged. Called from the wrapped `EngineArgs.create_engine_config` (process 0,
and offline `LLM(...)`), so a bad combination fails before a GPU is touched.
"""

from __future__ import annotations

import logging

from vllm_kvcomp.config import CompressionConfig, CompressionConfigError

logger = logging.getLogger("vllm.kvcomp")

FA_BLOCK_MULTIPLE = 16

# The plugin's classes, installed through vLLM's extension points.
ATTENTION_BACKEND_PATH = "vllm_kvcomp.engine.attention.CompressedFlashAttentionBackend"
WORKER_CLS = "vllm_kvcomp.engine.worker.CompressionWorker"
SCHEDULER_CLS = "vllm_kvcomp.engine.scheduler.CompressionScheduler"
ASYNC_SCHEDULER_CLS = "vllm_kvcomp.engine.scheduler.AsyncCompressionScheduler"


def _refuse(option: str, why: str) -> CompressionConfigError:
    return CompressionConfigError(f"--kv-compression cannot be combined with {option}: {why}")


def prepare_engine_args(engine_args, config: CompressionConfig) -> None:
    """Refuse conflicting options and force what compression needs (in place)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if engine_args.enable_prefix_caching:
        raise _refuse(
            "--enable-prefix-caching",
            "compression moves and frees prompt blocks, so cached block hashes would point at "
            "evicted tokens; drop the flag (the plugin switches prefix caching off)",
        )
    if engine_args.enable_prefix_caching is None:
        engine_args.enable_prefix_caching = False
        logger.info("vllm-kvcomp: prefix caching switched off (compressed blocks cannot be shared)")
    if engine_args.speculative_config:
        raise _refuse("speculative decoding", "draft and target KV would disagree after eviction")
    if engine_args.kv_transfer_config is not None:
        raise _refuse("a KV connector (--kv-transfer-config)", "connectors ship blocks that compression rewrites")
    if getattr(engine_args, "kv_offloading_size", None):
        raise _refuse("--kv-offloading-size", "offloaded blocks would miss the in-place compaction")
    if engine_args.kv_cache_dtype not in ("auto", None):
        raise _refuse(
            f"--kv-cache-dtype {engine_args.kv_cache_dtype}",
            "the scorer and compaction kernels support bf16/fp16 KV caches only",
        )
    for name, flag in (
        ("pipeline_parallel_size", "--pipeline-parallel-size"),
        ("data_parallel_size", "--data-parallel-size"),
        ("decode_context_parallel_size", "--decode-context-parallel-size"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size"),
    ):
        if (getattr(engine_args, name, 1) or 1) > 1:
            raise _refuse(f"{flag} > 1", "only tensor parallelism is supported")
    configured = getattr(engine_args.attention_config, "backend", None)
    for backend in (engine_args.attention_backend, configured):
        if backend is not None and getattr(backend, "name", str(backend)) != "CUSTOM":
            raise _refuse(
                f"--attention-backend {getattr(backend, 'name', backend)}",
                "compression reads the cache through its own FlashAttention-based backend",
            )
    if configured is None:
        engine_args.attention_backend = AttentionBackendEnum.CUSTOM
    if engine_args.worker_cls not in ("auto", None):
        raise _refuse(f"--worker-cls {engine_args.worker_cls}", "the plugin installs its own worker")
    if engine_args.scheduler_cls is not None:
        raise _refuse(f"--scheduler-cls {engine_args.scheduler_cls}", "the plugin installs its own scheduler")
    if engine_args.block_size is not None and engine_args.block_size % FA_BLOCK_MULTIPLE:
        raise _refuse(f"--block-size {engine_args.block_size}", "FlashAttention needs a multiple of 16")


def check_vllm_config(vllm_config, config: CompressionConfig) -> None:
    """Model-level checks, once vLLM has resolved the model and cache config."""
    model_config = vllm_config.model_config
    if model_config.runner_type != "generate":
        raise _refuse(f"--runner {model_config.runner_type}", "only generative models keep a KV cache to compress")
    if model_config.use_mla:
        raise _refuse("an MLA model", "latent KV caches are not supported")
    if model_config.get_sliding_window() is not None or _has_layer_types(model_config, ("sliding", "local")):
        raise _refuse(
            "a sliding-window or hybrid-attention model",
            "only models whose layers all use full attention are supported",
        )
    if getattr(model_config, "is_hybrid", False) or getattr(model_config, "is_attention_free", False):
        raise _refuse("a hybrid (Mamba/linear attention) model", "only full-attention layers can be compressed")
    if model_config.is_encoder_decoder:
        raise _refuse("an encoder-decoder model", "only decoder-only models are supported")
    if model_config.is_multimodal_model:
        raise _refuse("a multimodal model", "multimodal prompts are not supported yet")
    if not vllm_config.use_v2_model_runner:
        raise _refuse(
            "the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0 or an MoE model)",
            "the plugin hooks vLLM's V2 GPU model runner",
        )
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        raise _refuse("prefix caching", "it is still on after the plugin switched it off")
    if cache_config.cache_dtype != "auto":
        raise _refuse(f"--kv-cache-dtype {cache_config.cache_dtype}", "bf16/fp16 KV caches only")
    block_size = cache_config.block_size
    if block_size % FA_BLOCK_MULTIPLE:
        raise _refuse(f"block size {block_size}", "FlashAttention needs a multiple of 16")
    if config.num_recent < block_size:
        raise CompressionConfigError(
            f"kv-compression config: num_recent ({config.num_recent}) must be >= the KV block size "
            f"({block_size}): the block holding the last prompt token is always kept whole"
        )
    if config.evict_every is not None and config.evict_every % block_size:
        # Decode evictions then always happen at the prefill's offset in its block
        # (docs/LIFETIME-BUDGETS.md, section 1: the slack is evict_every + block_size - 1).
        raise CompressionConfigError(
            f"kv-compression config: evict_every ({config.evict_every}) must be a multiple of the KV block size "
            f"({block_size})"
        )
    # A calibrated profile (method profile, or available to per-request
    # kv_compression=profile) must match the model's depth: refuse at startup,
    # not at the first request's eviction.
    get_layers = getattr(model_config, "get_total_num_hidden_layers", None)
    profile = config.section("profile")
    if profile.layer_weights is not None and callable(get_layers):
        profile.check_num_layers(get_layers())


def _has_layer_types(model_config, markers: tuple[str, ...]) -> bool:
    text_config = getattr(model_config, "hf_text_config", None)
    layer_types = getattr(text_config, "layer_types", None) or []
    return any(any(m in str(t) for m in markers) for t in layer_types)


def install_engine_classes(vllm_config) -> None:
    """Point vLLM at the plugin's worker and scheduler (extension points)."""
    vllm_config.parallel_config.worker_cls = WORKER_CLS
    scheduler_config = vllm_config.scheduler_config
    scheduler_config.scheduler_cls = ASYNC_SCHEDULER_CLS if scheduler_config.async_scheduling else SCHEDULER_CLS
