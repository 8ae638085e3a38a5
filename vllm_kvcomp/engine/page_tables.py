"""Per-layer page tables, rebuilt every step in one Triton launch.

Input: vLLM's block table in batch order (one group, so one table), the batch's
sequence lengths, and three small per-request arrays kept by the runtime
(indexed by vLLM's stable request slot): c (compacted pages), C (first entry in
the request's entry table) and d (pages removed before the boundary block); all
zero for requests that were not compressed. Output: for every layer, a page table
and live lengths in batch order that FlashAttention reads directly (see
engine/layout.py for the mapping; `layer_page_table_reference` is the oracle).

It runs before every forward, outside CUDA graphs, writing into persistent
buffers whose addresses the captured graphs hold. Cost: one int32 read and write
per live page per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_reqs"])  # varies every step: never recompile while serving
def _layer_page_tables_kernel(
    block_table_ptr,  # [R_pad, W] int32, batch order
    block_table_stride,
    seq_lens_ptr,  # [R_pad] int32
    idx_mapping_ptr,  # [num_reqs] int32: batch row -> request slot
    num_reqs,
    compact_ptr,  # [max_reqs + 1, L] int32 (c)
    offset_ptr,  # [max_reqs + 1, L] int32 (C)
    shift_ptr,  # [max_reqs + 1, L] int32 (d)
    state_stride,
    entry_ptr,  # [L * N] int32
    out_tables_ptr,  # [L, R_cap, W] int32
    out_layer_stride,
    out_row_stride,
    out_lens_ptr,  # [L, R_cap] int32
    out_lens_stride,
    blocks_per_layer,
    num_layers,
    width,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
):
    layer = tl.program_id(0)
    row = tl.program_id(1)
    if row >= num_reqs:
        tl.store(out_lens_ptr + layer * out_lens_stride + row, 0)
        return
    req = tl.load(idx_mapping_ptr + row)
    compact = tl.load(compact_ptr + req * state_stride + layer)
    offset = tl.load(offset_ptr + req * state_stride + layer)
    shift = tl.load(shift_ptr + req * state_stride + layer)
    live = tl.load(seq_lens_ptr + row) - shift * BLOCK_SIZE
    live = tl.maximum(live, 0)
    tl.store(out_lens_ptr + layer * out_lens_stride + row, live)
    num_pages = tl.minimum((live + BLOCK_SIZE - 1) // BLOCK_SIZE, width - shift)
    bt_row = block_table_ptr + row * block_table_stride
    out_row = out_tables_ptr + layer * out_layer_stride + row * out_row_stride
    for start in range(0, num_pages, TILE):
        j = start + tl.arange(0, TILE)
        valid = j < num_pages
        is_compact = j < compact
        stock_block = tl.load(bt_row + j + shift, mask=valid & (j >= compact), other=0)
        entry = offset + j
        entry_block = tl.load(bt_row + entry // num_layers, mask=valid & is_compact, other=0)
        entry_index = (entry % num_layers) * blocks_per_layer + entry_block
        compact_page = tl.load(entry_ptr + entry_index, mask=valid & is_compact, other=0)
        page = tl.where(is_compact, compact_page, layer * blocks_per_layer + stock_block)
        tl.store(out_row + j, page, mask=valid)


@dataclass
class RequestLayouts:
    """Where every compressed request's layers live (engine/layout.py), on the device.

    One row per vLLM request slot (+ one all-zero row for dummy batches), one
    column per layer; all zero for a request that was not compressed.
    """

    compact_pages: torch.Tensor  # int32 [max_reqs + 1, L]: c_l, compacted pages
    entry_offsets: torch.Tensor  # int32 [max_reqs + 1, L]: C_l, first entry in the request's entry table
    shift_pages: torch.Tensor  # int32 [max_reqs + 1, L]: d_l, pages removed before the boundary block
    entries: torch.Tensor  # int32 [L * N]: entry tables (page id of each compacted page)

    @classmethod
    def zeros(cls, max_reqs: int, num_layers: int, num_pages: int, device) -> RequestLayouts:
        state = torch.zeros(3, max_reqs + 1, num_layers, dtype=torch.int32, device=device)
        entries = torch.zeros(num_pages, dtype=torch.int32, device=device)
        return cls(state[0], state[1], state[2], entries)


def build_layer_page_tables(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    idx_mapping: torch.Tensor,
    num_reqs: int,
    layouts: RequestLayouts,
    out_tables: torch.Tensor,
    out_lens: torch.Tensor,
    blocks_per_layer: int,
    block_size: int,
) -> None:
    """Fill out_tables[:, :R_pad] and out_lens[:, :R_pad] (R_pad = block_table rows)."""
    num_rows, width = block_table.shape
    num_layers = out_tables.shape[0]
    if num_rows == 0:
        return
    assert out_tables.shape[2] >= width and out_tables.shape[1] >= num_rows
    compact, offset, shift = layouts.compact_pages, layouts.entry_offsets, layouts.shift_pages
    assert compact.stride(0) == offset.stride(0) == shift.stride(0)
    _layer_page_tables_kernel[(num_layers, num_rows)](
        block_table,
        block_table.stride(0),
        seq_lens,
        idx_mapping,
        num_reqs,
        compact,
        offset,
        shift,
        compact.stride(0),
        layouts.entries,
        out_tables,
        out_tables.stride(0),
        out_tables.stride(1),
        out_lens,
        out_lens.stride(0),
        blocks_per_layer,
        num_layers,
        width,
        BLOCK_SIZE=block_size,
        TILE=256,
    )
