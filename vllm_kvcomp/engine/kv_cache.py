"""Scheduler-side block accounting for compressed requests.

Why one KV cache group (and not one per layer): with per-layer budgets each
layer could own its own block table as its own KV cache group, but then the
scheduler walks L managers per request per step (allocate_slots is O(L * reqs)
Python work) and the worker builds L block tables, slot mappings and metadata
objects per step; at budget 1.0 that costs far more than the 5% overhead we allow
(bench/group_overhead.py measures it with vLLM's own classes).

Instead every layer stays in one group, so vLLM's block `b` still means "one page
per layer". After a request's prefill the worker compacts each layer's survivors
into pages of the request's first K' blocks (pages of one layer may sit in other
layers' slots of those blocks, see engine/layout.py), keeps the block holding
the last prompt token and everything after it, and frees the prompt blocks
between. The worker reports the freed block ids; this manager drops them from
the request and returns them to the BlockPool. From then on the request needs
`cdiv(num_tokens, block_size) - evicted` blocks, which is all the scheduler must
know. With `evict_every` the worker evicts a running request again and again
(engine/decode_eviction.py): each report frees ids the request still holds,
wherever they sit in its list (held blocks are a multiset to this manager; the
worker may move ids inside its block-table row), and `evicted` adds up.

Compression-aware admission (docs/LIFETIME-BUDGETS.md, section 4): such a
request never holds more than `bound_blocks` blocks, so the manager keeps
`growth_reserve`, what the running bounded requests may still grow into, and a
waiting or preempted request is admitted only if its blocks fit next to it
(`get_num_blocks_to_allocate`). Requests without decode-time eviction have no
bound: their growth is not reserved, as in stock vLLM (which reserves none).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvcomp.engine.layout import cdiv

if TYPE_CHECKING:
    from vllm_kvcomp.config import CompressionConfig

logger = logging.getLogger("vllm.kvcomp")


@dataclass(frozen=True, kw_only=True)
class CompressedAttentionSpec(FullAttentionSpec):
    """Full attention whose prompt blocks may be freed after compression.

    Same fields (and page size) as FullAttentionSpec; registered with
    `CompressedAttentionManager` and grouped like full attention.
    """

    @classmethod
    def from_full_attention(cls, spec: FullAttentionSpec) -> CompressedAttentionSpec:
        return cls(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=spec.dtype,
            kv_quant_mode=spec.kv_quant_mode,
            page_size_padded=spec.page_size_padded,
            indexes_kv_by_block_stride=spec.indexes_kv_by_block_stride,
            sliding_window=spec.sliding_window,
            attention_chunk_size=spec.attention_chunk_size,
            non_causal=spec.non_causal,
        )


def bound_blocks(
    config: CompressionConfig, prompt_len: int, max_tokens: int, block_size: int, max_model_len: int | None = None
) -> int | None:
    """Most blocks a request holds in its life when decode-time eviction follows it, or None.

    Section 1 of docs/LIFETIME-BUDGETS.md: `ceil(B_avg / bs) + 2 + evict_every / bs`, B_avg at the
    longest context the request can reach (prompt + max_tokens): exact for integer budgets, an
    upper estimate for fractions (B_avg only grows with the context). Never above that whole
    context. None (unbounded, stock growth) when the worker does not follow it: method "none",
    no `evict_every`, or a prompt under `min_prompt_len` (engine/decode_eviction.py `_due`).
    """
    if not config.enabled or config.evict_every is None or prompt_len < config.min_prompt_len:
        return None
    context = prompt_len + max_tokens
    if max_model_len is not None:
        context = min(context, max_model_len)
    bound = cdiv(config.average_budget(context), block_size) + 2 + cdiv(config.evict_every, block_size)
    return min(bound, cdiv(context, block_size))


class CompressedAttentionManager(FullAttentionManager):
    """FullAttentionManager that knows how many of a request's blocks were evicted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # request id -> blocks freed by compression (positions they covered are gone).
        self.evicted_blocks: dict[str, int] = {}
        # request id -> bound_blocks, for the life of a request (kept across preemptions).
        self.bounds: dict[str, int] = {}
        # request id -> max(bound - held, 0) while it holds blocks; growth_reserve is their sum.
        self._reserved: dict[str, int] = {}
        self.growth_reserve = 0

    def set_bound(self, request_id: str, bound: int | None) -> None:
        """`bound_blocks` of a request (the scheduler knows its sampling params); None: unbounded."""
        if bound is None:
            self.bounds.pop(request_id, None)
        else:
            self.bounds[request_id] = bound
        self._update_reserve(request_id)

    def _update_reserve(self, request_id: str) -> None:
        # O(1); called wherever the request's held count changes. A request holding no blocks
        # (waiting, preempted, finished) reserves nothing: it is not running.
        bound = self.bounds.get(request_id)
        held = len(self.req_to_blocks.get(request_id, ()))
        new = max(bound - held, 0) if bound is not None and held else 0
        old = self._reserved.pop(request_id, 0)
        if new:
            self._reserved[request_id] = new
        self.growth_reserve += new - old

    def _evicted_tokens(self, request_id: str) -> int:
        # Called for every running request every step (allocate_slots): one lookup per call.
        return self.evicted_blocks.get(request_id, 0) * self.block_size

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
    ) -> int:
        evicted = self._evicted_tokens(request_id)
        need = super().get_num_blocks_to_allocate(
            request_id,
            num_tokens - evicted,
            new_computed_blocks,
            total_computed_tokens,
            num_tokens_main_model - evicted,
            apply_admission_cap,
        )
        # vLLM's admission gate (KVCacheManager.allocate_slots with full_sequence_must_fit, the
        # scheduler's default) is the only caller with the cap and a request holding no blocks
        # (Scheduler._request_remaining_blocks asks for in-flight prefills, which hold blocks).
        if apply_admission_cap and not self.req_to_blocks.get(request_id):
            return self._admission_need(request_id, need)
        return need

    def _admission_need(self, request_id: str, need: int) -> int:
        """A newcomer's need: its own peak (its whole sequence now, as stock counts, or its bound
        if it can grow beyond that) plus what the running bounded requests may still grow into."""
        bound = self.bounds.get(request_id)
        if bound is not None:
            # Capped at the pool: alone in an empty pool a request is always admitted, as in stock.
            need = max(need, min(bound, self.block_pool.num_gpu_blocks - 1))
        return need + self.growth_reserve

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list[KVCacheBlock]:
        evicted = self._evicted_tokens(request_id)
        blocks = super().allocate_new_blocks(request_id, num_tokens - evicted, num_tokens_main_model - evicted)
        if blocks:
            self._update_reserve(request_id)
        return blocks

    def evict(self, request_id: str, block_ids: Sequence[int]) -> int:
        """Return `block_ids` of a running request to the pool; the count freed.

        Ids the request no longer holds (it was preempted or finished while the
        report was in flight) are ignored: its blocks were freed whole then.
        """
        blocks = self.req_to_blocks.get(request_id)
        if not blocks or not block_ids:
            return 0
        wanted = set(block_ids)
        kept: list[KVCacheBlock] = []
        dropped: list[KVCacheBlock] = []
        for block in blocks:
            (dropped if block.block_id in wanted else kept).append(block)
        if len(dropped) != len(wanted):
            logger.warning(
                "vllm-kvcomp: request %s holds %d of the %d blocks the worker freed; "
                "ignoring the report (request was preempted or finished meanwhile)",
                request_id,
                len(dropped),
                len(wanted),
            )
            return 0
        self.req_to_blocks[request_id] = kept
        self.block_pool.free_blocks(dropped)
        self.evicted_blocks[request_id] = self.evicted_blocks.get(request_id, 0) + len(dropped)
        self._update_reserve(request_id)
        return len(dropped)

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        self.evicted_blocks.pop(request_id, None)
        blocks = super().pop_blocks_for_free(request_id)
        self._update_reserve(request_id)  # holds none now: reserves nothing until it runs again
        return blocks
