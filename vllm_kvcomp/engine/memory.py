"""GPU memory the plugin needs beyond vLLM's own, so that vLLM can account for it.

* Persistent buffers, allocated when the KV pool is bound: per-layer page tables
  and lengths, the window-query capture buffers, the per-request layouts, and,
  only when some request can evict while decoding, the decode-query ring (engine/decode_ring.py).
* The eviction workspace, transient: fp32 temporaries of one eviction pass (the
  window sums per query head, then scores, mass and the sorts of the statistics
  and of the selection per KV head). It is bounded by `eviction_workspace_mb`:
  batches are split by requests, and a request too long for the bound is scored
  in groups of layers (scored twice: once for the budgets, once for selection).

`CompressionModelRunner.profile_run` allocates both during vLLM's memory profile,
so the KV cache vLLM sizes from the profiled peak leaves room for them.
"""

from __future__ import annotations

from dataclasses import dataclass


def workspace_bytes_per_row(num_heads: int, num_kv_heads: int, seq_len: int) -> int:
    """Transient bytes of one (layer, request) row of an eviction pass."""
    return seq_len * 4 * (num_heads + 6 * num_kv_heads)


def layer_groups(num_layers: int, bytes_per_layer: int, budget: int) -> list[range]:
    """Consecutive layer groups whose rows fit in `budget` (at least one layer each)."""
    per_group = max(1, budget // max(bytes_per_layer, 1))
    return [range(start, min(start + per_group, num_layers)) for start in range(0, num_layers, per_group)]


@dataclass(frozen=True)
class PluginMemory:
    """What one worker holds or may hold on its GPU besides the KV cache."""

    num_layers: int
    num_heads: int  # query heads of this rank
    head_size: int
    dtype_bytes: int
    max_reqs: int
    max_blocks_per_req: int
    capture_slots: int
    window: int
    workspace_bytes: int
    ring_slots: int = 0  # decode-ring slots (0: no ring, CompressionConfig.decode_ring_needed)
    decode_window: int = 0
    max_num_tokens: int = 0  # the ring's per-token row index

    @property
    def ring_bytes(self) -> int:
        """Decode ring: queries and fp32 LSE of `decode_window` rows per slot, plus a
        scratch slot, and the int64 row index of every token of a batch."""
        if not self.ring_slots:
            return 0
        rows = self.num_layers * (self.ring_slots + 1) * self.decode_window * self.num_heads
        return rows * (self.head_size * self.dtype_bytes + 4) + self.max_num_tokens * 8

    @property
    def persistent_bytes(self) -> int:
        L = self.num_layers
        tables = L * self.max_reqs * (self.max_blocks_per_req + 1) * 4
        layouts = 3 * (self.max_reqs + 1) * L * 4
        capture = L * self.capture_slots * self.window * self.num_heads * (self.head_size * self.dtype_bytes + 4)
        return tables + layouts + capture + self.ring_bytes

    @property
    def total_bytes(self) -> int:
        return self.persistent_bytes + self.workspace_bytes


def plugin_memory(vllm_config, config) -> PluginMemory:
    """The plugin's GPU memory for a vLLM engine config and a compression config (one worker)."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    block_size = vllm_config.cache_config.block_size
    scheduler = vllm_config.scheduler_config
    ring_on = config.decode_ring_needed  # as CompressionRuntime._decode_ring
    return PluginMemory(
        num_layers=model.get_num_layers(parallel),
        num_heads=model.get_num_attention_heads(parallel),
        head_size=model.get_head_size(),
        dtype_bytes=model.dtype.itemsize,
        max_reqs=scheduler.max_num_seqs,
        max_blocks_per_req=-(-model.max_model_len // block_size),
        capture_slots=config.max_pending_requests,
        window=config.window,
        workspace_bytes=config.eviction_workspace_mb << 20,
        ring_slots=scheduler.max_num_seqs if ring_on else 0,  # one per running request, as the runtime
        decode_window=config.decode_window if ring_on else 0,
        max_num_tokens=scheduler.max_num_batched_tokens if ring_on else 0,
    )
