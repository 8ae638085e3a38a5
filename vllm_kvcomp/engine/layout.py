"""Where each layer's surviving tokens live after compression (pure host logic).

vLLM's block `b` of a request is one page per layer: with L layers and N blocks,
the KV pool is one tensor of L * N pages and layer `l`'s page of block `b` is
`page_id = l * N + b` (each layer's pages form the stock per-layer region, so
vLLM's own slot mapping writes new tokens unchanged).

A prompt of P tokens fills `full = P // bs` whole blocks plus `rem = P % bs`
tokens of the boundary block (block index `full`). Compression keeps, per layer:
  * the boundary block whole (it holds the last `rem` prompt tokens, which the
    recent window protects, and the decode tokens that follow), and
  * `c_l` compacted pages holding the layer's `c_l * bs` best tokens of the first
    `full * bs` positions, so the layer keeps `k_l = c_l * bs + rem` tokens.
The request then needs `sum_l c_l` pages below the boundary: it keeps its first
`K = ceil(sum_l c_l / L)` blocks and frees blocks `K .. full-1`.

Layer l's compacted page j sits in its own page of block j while `j < K`. Pages
`j >= K` of layers with `c_l > K` ("overflow") are copied into the unused
pages `(i, s)` (block i < K, slot of layer s with `c_s <= i`); those destinations
are free and the sources are about to be freed, so the copies never race.

Logical page j of layer l (what attention reads) is then
  * j <  c_l: the compacted page above, found through an entry table kept in the
    request's own retained pages (entry `q = C_l + j`, C_l = sum of c over
    earlier layers, lives at `(q % L) * N + row[q // L]`);
  * j >= c_l: the stock page `l * N + row[j + d_l]`, `d_l = full - c_l`, so
    position `pos >= P` sits at logical token `pos - d_l * bs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class EvictionPlan:
    """The block-level decision for one request (identical on every TP rank)."""

    prompt_len: int
    block_size: int
    num_layers: int
    compact_pages: np.ndarray  # c_l, int64 [L]
    kept_blocks: int  # K: leading prompt blocks retained
    # int64 [n, 4]: (layer, page j, block index i, layer slot s) per overflow page.
    relocation_array: np.ndarray

    @property
    def full_blocks(self) -> int:
        return self.prompt_len // self.block_size

    @property
    def boundary_tokens(self) -> int:
        return self.prompt_len % self.block_size

    @property
    def kept_tokens(self) -> np.ndarray:
        """k_l: tokens each layer keeps of the prompt."""
        return self.compact_pages * self.block_size + self.boundary_tokens

    @property
    def shift_pages(self) -> np.ndarray:
        """d_l: logical pages removed before the boundary block."""
        return self.full_blocks - self.compact_pages

    @property
    def entry_offsets(self) -> np.ndarray:
        """C_l: first entry of layer l in the request's entry table."""
        return np.concatenate([[0], np.cumsum(self.compact_pages)[:-1]]).astype(np.int64)

    @property
    def freed_block_indices(self) -> range:
        """Indices (into the request's block list) of the blocks handed back."""
        return range(self.kept_blocks, self.full_blocks)

    @property
    def evicted_layers(self) -> np.ndarray:
        """Layers that lose tokens (the others keep the whole prompt)."""
        return self.compact_pages < self.full_blocks

    def page_location(self, layer: int, page: int) -> tuple[int, int]:
        """(block index, layer slot) of compacted page `page` of `layer`."""
        if not 0 <= page < self.compact_pages[layer]:
            raise IndexError(f"layer {layer} has {self.compact_pages[layer]} compacted pages, asked {page}")
        if page < self.kept_blocks:
            return page, layer
        return self._relocation_map[(layer, page)]

    @cached_property
    def _relocation_map(self) -> dict[tuple[int, int], tuple[int, int]]:
        return {(l, j): (i, s) for l, j, i, s in self.relocations}

    @property
    def relocations(self) -> list[tuple[int, int, int, int]]:
        """`relocation_array` as tuples: (layer, page j) -> (block index i, layer slot s)."""
        return _quads(self.relocation_array)

    @cached_property
    def entry_array(self) -> np.ndarray:
        """int64 [sum c_l, 4]: (entry block, entry slot, page block, page slot) per compacted page.

        Entry q = C_l + j of layer l stores where its page j lives. Vectorised
        `entries()`: overflow pages are enumerated layer-major, page-ascending,
        the same order as `relocations`.
        """
        L = self.num_layers
        layer = np.repeat(np.arange(L, dtype=np.int64), self.compact_pages)
        page = np.arange(len(layer), dtype=np.int64) - np.repeat(self.entry_offsets, self.compact_pages)
        q = np.arange(len(layer), dtype=np.int64)  # C_l + j, by construction
        block, slot = page.copy(), layer.copy()
        overflow = page >= self.kept_blocks
        rel = self.relocation_array
        block[overflow], slot[overflow] = rel[:, 2], rel[:, 3]
        return np.stack([q // L, q % L, block, slot], axis=1)

    def entries(self) -> list[tuple[int, int, int, int]]:
        """`entry_array` as tuples (tests, reference page tables)."""
        return _quads(self.entry_array)


def _quads(array: np.ndarray) -> list[tuple[int, int, int, int]]:
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in array]


def plan_eviction(budgets: np.ndarray, prompt_len: int, block_size: int) -> EvictionPlan | None:
    """Turn per-layer token budgets into a block plan; None when nothing can be freed."""
    budgets = np.asarray(budgets, dtype=np.int64)
    num_layers = len(budgets)
    full = prompt_len // block_size
    rem = prompt_len % block_size
    if num_layers == 0 or full == 0:
        return None
    need = np.maximum(budgets - rem, 0)
    compact = np.minimum(-(-need // block_size), full).astype(np.int64)
    kept_blocks = cdiv(int(compact.sum()), num_layers)
    if kept_blocks >= full:
        return None
    # Overflow pages (layer-major, page-ascending) go to free slots (slot-major,
    # block-ascending), pairwise in these orders.
    layers = np.arange(num_layers, dtype=np.int64)
    n_over = np.maximum(compact - kept_blocks, 0)
    over_l = np.repeat(layers, n_over)
    over_j = kept_blocks + np.arange(len(over_l)) - np.repeat(np.cumsum(n_over) - n_over, n_over)
    n_free = np.maximum(kept_blocks - compact, 0)
    free_s = np.repeat(layers, n_free)
    free_i = np.repeat(compact, n_free) + np.arange(len(free_s)) - np.repeat(np.cumsum(n_free) - n_free, n_free)
    assert len(free_s) >= len(over_l), "retained blocks cannot hold the survivors"
    n = len(over_l)
    relocation_array = np.stack([over_l, over_j, free_i[:n], free_s[:n]], axis=1).astype(np.int64)
    return EvictionPlan(
        prompt_len=prompt_len,
        block_size=block_size,
        num_layers=num_layers,
        compact_pages=compact,
        kept_blocks=kept_blocks,
        relocation_array=relocation_array,
    )


def page_id(block_id: int, slot: int, blocks_per_layer: int) -> int:
    return slot * blocks_per_layer + block_id


def layer_page_table_reference(
    row: list[int],
    seq_len: int,
    layer: int,
    plan: EvictionPlan | None,
    blocks_per_layer: int,
    block_size: int,
) -> tuple[list[int], int]:
    """(pages, live tokens) of one layer of one request: the oracle of the kernel."""
    if plan is None:
        return [page_id(b, layer, blocks_per_layer) for b in row[: cdiv(seq_len, block_size)]], seq_len
    shift = int(plan.shift_pages[layer])
    live = seq_len - shift * block_size
    pages = []
    for j in range(cdiv(live, block_size)):
        if j < plan.compact_pages[layer]:
            block, slot = plan.page_location(layer, j)
            pages.append(page_id(row[block], slot, blocks_per_layer))
        else:
            pages.append(page_id(row[j + shift], layer, blocks_per_layer))
    return pages, live
