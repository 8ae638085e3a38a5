"""FlashAttention backend that reads each layer through its own page table.

Registered as vLLM's `AttentionBackendEnum.CUSTOM` (selected by the plugin when
compression is on). Differences from vLLM's FlashAttention backend:

* The KV pool is one tensor shared by all layers (engine/layout.py). KV writes
  go to the layer's own region with vLLM's unchanged slot mapping; attention
  reads through per-layer page tables and per-layer sequence lengths that the
  runtime rebuilds each step (one Triton launch, outside any CUDA graph).
* On prefill steps that end inside a request's observation window, the
  post-RoPE queries of the window and their softmax LSE (returned by the same
  FlashAttention call) are captured for scoring.
* With `evict_every` set, every step also writes each decode query of a tracked
  request and its LSE into the decode ring (engine/decode_ring.py), with
  fixed-shape copies that FULL CUDA graphs capture.
* Cascade attention is off: it assumes every layer sees the batch's sequence
  lengths. FA3's ahead-of-time schedule stays on (vLLM computes it once per step
  from the batch's lengths), although each layer attends over its own, shorter
  live length: the schedule holds only per-request split counts, query-block
  counts, a processing order and L2 head groups. FA3 takes each split's key
  range from `seqused_k` (the layer's length), so a layer with fewer live keys
  than the batch's length gets empty splits, which FA3 writes as zero output
  with an LSE of -inf and its combine step ignores. The alternative, FA3's own
  per-call scheduler, is one more kernel in every layer (36 µs per decode step
  on the 1B shape, bench/results/lifetime/h200_plan_ahead_suite/).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
from vllm.v1.attention.backends import fa_utils
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from vllm_kvcomp.engine.capture import CapturePlan
from vllm_kvcomp.engine.runtime import get_runtime
from vllm_kvcomp.engine.timing import profiled


@dataclass
class CompressedFlashAttentionMetadata(FlashAttentionMetadata):
    # Per layer: [num_reqs_padded, max_pages] page table and [num_reqs_padded] lengths.
    layer_block_tables: list[torch.Tensor] | None = None
    layer_seq_lens: list[torch.Tensor] | None = None
    capture: CapturePlan | None = None


class CompressedFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        base = super().build(0, common_attn_metadata, fast_build)
        runtime = get_runtime()
        with profiled("kvcomp::layer_tables"):
            tables, lens = runtime.layer_tables(common_attn_metadata.block_table_tensor, common_attn_metadata.seq_lens)
        return CompressedFlashAttentionMetadata(
            **{f.name: getattr(base, f.name) for f in fields(FlashAttentionMetadata)},
            layer_block_tables=tables,
            layer_seq_lens=lens,
            capture=runtime.step_capture,
        )

    def build_for_cudagraph_capture(self, common_attn_metadata):
        # Graphs are captured on dummy batches: uncompressed page tables.
        get_runtime().begin_dummy_step()
        return self.build(0, common_attn_metadata)

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        return False


class CompressedFlashAttentionImpl(FlashAttentionImpl):
    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm-kvcomp: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        runtime = get_runtime()
        index = runtime.layer_index[layer.layer_name]
        num_tokens = attn_metadata.num_actual_tokens
        key_cache, value_cache = kv_cache.unbind(1)
        # As vLLM's FlashAttention backend: FA3 on Hopper (TMA) needs >= 16-byte strides on size-1
        # dims (one KV head per tensor-parallel rank).
        key_cache = canonicalize_singleton_dim_strides(key_cache)
        value_cache = canonicalize_singleton_dim_strides(value_cache)
        descale_shape = (attn_metadata.query_start_loc.shape[0] - 1, self.num_kv_heads)
        capture = attn_metadata.capture
        ring = runtime.decode_ring
        # FlashAttention computes the LSE anyway; it is only returned when asked for.
        want_lse = capture is not None or ring is not None
        result = fa_utils.flash_attn_varlen_func(
            q=query[:num_tokens],
            k=key_cache,
            v=value_cache,
            out=output[:num_tokens],
            cu_seqlens_q=attn_metadata.query_start_loc,
            max_seqlen_q=attn_metadata.max_query_len,
            seqused_k=attn_metadata.layer_seq_lens[index],
            max_seqlen_k=attn_metadata.max_seq_len,
            softmax_scale=self.scale,
            causal=True,
            alibi_slopes=self.alibi_slopes,
            window_size=None,
            block_table=attn_metadata.layer_block_tables[index],
            softcap=self.logits_soft_cap,
            # vLLM's AOT schedule from the batch's lengths, valid for every layer (module docstring)
            scheduler_metadata=attn_metadata.scheduler_metadata,
            fa_version=self.vllm_flash_attn_version,
            q_descale=layer._q_scale.expand(descale_shape) if self.supports_quant_query_input else None,
            k_descale=layer._k_scale.expand(descale_shape),
            v_descale=layer._v_scale.expand(descale_shape),
            num_splits=attn_metadata.max_num_splits,
            s_aux=self.sinks,
            return_softmax_lse=want_lse,
        )
        if capture is not None:
            runtime.capture(index, query, result[1], capture)
        if ring is not None:
            # Every step and batch shape (inside FULL graphs too): untracked tokens go to scratch.
            ring.record(index, query[:num_tokens], result[1])
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        # vLLM's slot mapping addresses the layer's own region of the pool.
        region = get_runtime().layer_region(layer.layer_name, kv_cache)
        super().do_kv_cache_update(layer, key, value, region, slot_mapping)


class CompressedFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return CompressedFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return CompressedFlashAttentionMetadataBuilder
