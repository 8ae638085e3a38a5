"""Per-layer page-table state of every request slot, on the device.

Holds the per-request layouts (c, C, d and the entry tables; see
engine/layout.py), rebuilds every layer's page table for a batch in one launch
(`build`), publishes the layouts of freshly compressed requests (`publish`) and
zeroes the slots of removed or reassigned requests (`reset`, applied lazily
before the next build or publish).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vllm_kvcomp.engine.layout import EvictionPlan
from vllm_kvcomp.engine.page_tables import RequestLayouts, build_layer_page_tables
from vllm_kvcomp.engine.reeviction import ReevictionPlan
from vllm_kvcomp.engine.staging import to_device


class LayerPageState:
    def __init__(
        self, *, num_layers: int, blocks_per_layer: int, block_size: int, max_reqs: int, width: int, device
    ) -> None:
        self.num_layers = num_layers
        self.blocks_per_layer = blocks_per_layer
        self.block_size = block_size
        self.device = device
        self.layouts = RequestLayouts.zeros(max_reqs, num_layers, num_layers * blocks_per_layer, device)
        # Persistent outputs: captured CUDA graphs hold their addresses.
        self.tables = torch.zeros(num_layers, max_reqs, width, dtype=torch.int32, device=device)
        self.lens = torch.zeros(num_layers, max_reqs, dtype=torch.int32, device=device)
        # Dummy batches (profiling, graph capture) read the all-zero last row.
        self.dummy_idx = torch.full((max_reqs,), max_reqs, dtype=torch.int32, device=device)
        self._pending_resets: set[int] = set()
        self._views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def nbytes(self) -> int:
        return self.tables.numel() * 4

    def reset(self, index: int) -> None:
        """Forget the layout of request slot `index` (before its next use)."""
        self._pending_resets.add(index)

    def apply_resets(self) -> None:
        if self._pending_resets:
            index = to_device(np.array(sorted(self._pending_resets), dtype=np.int64), self.device)
            for tensor in (self.layouts.compact_pages, self.layouts.entry_offsets, self.layouts.shift_pages):
                # index_fill_ takes the 0 as a kernel argument; `tensor[index] = 0` made it a CPU tensor
                # copied to the GPU from pageable memory, a copy that waits for the queued step
                # (bench/results/lifetime/h200_stack_profile/)
                tensor.index_fill_(0, index, 0)
            self._pending_resets.clear()

    def build(
        self, block_table: torch.Tensor, seq_lens: torch.Tensor, idx_mapping: torch.Tensor | None, num_reqs: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer page tables and lengths for this batch (views of the persistent buffers)."""
        self.apply_resets()
        num_rows = block_table.shape[0]
        if idx_mapping is None:
            idx_mapping, num_reqs = self.dummy_idx, num_rows
        build_layer_page_tables(
            block_table,
            seq_lens,
            idx_mapping,
            num_reqs,
            self.layouts,
            self.tables,
            self.lens,
            self.blocks_per_layer,
            self.block_size,
        )
        views = self._views.get(num_rows)
        if views is None:
            views = (
                [self.tables[i, :num_rows, : block_table.shape[1]] for i in range(self.num_layers)],
                [self.lens[i, :num_rows] for i in range(self.num_layers)],
            )
            self._views[num_rows] = views
        return views

    def warm_up(self) -> None:
        """Compile the page-table kernel now (its one variant serves every batch)."""
        table = torch.zeros(1, self.tables.shape[2], dtype=torch.int32, device=self.device)
        self.build(table, torch.ones(1, dtype=torch.int32, device=self.device), None, 1)

    def publish(self, compressed: Sequence[tuple[int, list[int] | np.ndarray, EvictionPlan | ReevictionPlan]]) -> None:
        """Write the entry tables and (c, C, d) of compressed requests.

        `compressed`: (request slot, block ids (list or int64 array), plan) per request: a prefill plan, or a
        decode-time one with the block-table row after re-homing (engine/reeviction.py:
        its entry array is in the same (entry position, slot, page position, slot) form).
        Runs after the overflow pages were copied (their sources are about to be freed).
        """
        if not compressed:
            return
        N = self.blocks_per_layer
        entry_at, entry_page = [], []
        state = np.zeros((3, len(compressed), self.num_layers), dtype=np.int32)
        for r, (_, block_ids, plan) in enumerate(compressed):
            row = np.asarray(block_ids, dtype=np.int64)
            ent = plan.entry_array  # (entry block, entry slot, page block, page slot)
            entry_at.append(ent[:, 1] * N + row[ent[:, 0]])
            entry_page.append(ent[:, 3] * N + row[ent[:, 2]])
            state[:, r] = plan.compact_pages, plan.entry_offsets, plan.shift_pages
        at = np.concatenate(entry_at)
        if len(at):
            self.layouts.entries.index_copy_(
                0,
                to_device(at, self.device),
                to_device(np.concatenate(entry_page).astype(np.int32), self.device),
            )
        self.apply_resets()
        slots = to_device(np.array([index for index, _, _ in compressed], dtype=np.int64), self.device)
        values = to_device(state, self.device)
        self.layouts.compact_pages[slots] = values[0]
        self.layouts.entry_offsets[slots] = values[1]
        self.layouts.shift_pages[slots] = values[2]
