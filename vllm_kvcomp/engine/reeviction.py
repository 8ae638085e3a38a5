"""Evicting again from an already compressed request (decode time; docs/LIFETIME-BUDGETS.md, section 3).

Host arithmetic only. After an eviction a request has "one hole" (`RequestLayout`):
it holds rows `0..K-1` of its block-table row and rows `B..` (B, `tail_block`: the
boundary block of that eviction, the first row of the tail); rows `K..B-1` keep
stale ids that are never read. Layer l reads
  * logical page j <  c_l: its compacted page, at (row position, layer slot)
    `homes[C_l + j]` with the position `< K` (published as the entry table);
  * logical page j >= c_l: the stock page `l * N + row[j + d_l]`, `d_l = B - c_l`.
An uncompressed request is the layout with c = 0 and K = B = 0.

`plan_reeviction` is `plan_eviction` again at context S with `t = S // bs` in the
role of `full`: layer l's evictable domain is its `m_l = c_l + t - B` logical
pages before row t; it keeps `c'_l` of them. Steps (the note's 3-6), in order:
  1. compact each layer in place into its first c'_l logical pages (executor);
  2. re-home: if K' > K, the ids of rows `B..B+K'-K-1` are written to positions
     `K..K'-1` (the rows right after B hold the most kept pages, so the fewest
     copies); never needed when K == B (no hole);
  3. relocate: kept pages whose row is not among the new rows `0..K'-1` are
     copied into slots of those rows that hold no kept page;
  4. publish `after` (rows `0..K'-1` plus `t..`, `d'_l = t - c'_l`);
  5. free the old rows `K'..K-1` and `B+max(K'-K, 0)..t-1` (the held rows
     K'..t-1 minus the re-homed ids).
Sources of the copies are only in freed rows, destinations only in dead slots
of retained rows, so one batched copy has no race.

Where the note is open, decided here: B is where the hole ends (the note's
`full` of the last eviction), the hole is `K..B-1`. Re-homing never fails for
any budgets, not only because `t - B >= evict_every / bs`: `c'_l <= c_l + t - B`
gives `K' - K <= t - B`. Budgets that shrink (K' < K) free rows `K'..K-1` too and
relocate their kept pages. Freed positions are of the row before the rewrite;
after it, rows `B..B+K'-K-1` still show the re-homed ids: duplicates, never read,
never freed. No block to free: None, as `plan_eviction`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from vllm_kvcomp.engine.layout import EvictionPlan, cdiv, page_id


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _frozen(array: np.ndarray) -> np.ndarray:
    """A cached array, read-only: layouts and plans are shared, never changed."""
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class RequestLayout:
    """Where one request's layers live after its last eviction, in positions of its block-table row."""

    block_size: int
    compact_pages: np.ndarray  # c_l, int64 [L]
    kept_blocks: int  # K: rows 0..K-1 hold the compacted pages
    tail_block: int  # B: rows B.. are the tail (stock pages); K..B-1 are stale
    homes: np.ndarray  # int64 [sum c_l, 2]: (row position < K, layer slot) of page j of layer l, at C_l + j

    def __post_init__(self) -> None:
        c, homes = self.compact_pages, self.homes
        if not 0 <= self.kept_blocks <= self.tail_block or np.any(c > self.tail_block) or np.any(c < 0):
            raise ValueError(f"need 0 <= K ({self.kept_blocks}) <= B ({self.tail_block}) and 0 <= c <= B")
        if homes.shape != (int(c.sum()), 2):
            raise ValueError(f"homes has shape {homes.shape}, expected ({int(c.sum())}, 2)")
        if c.sum() > len(c) * self.kept_blocks:  # entries and pages both need a slot of rows 0..K-1
            raise ValueError(f"{int(c.sum())} compacted pages do not fit in {self.kept_blocks} rows")
        if len(homes) and (homes[:, 0].max() >= self.kept_blocks or homes[:, 1].max() >= len(c) or homes.min() < 0):
            raise ValueError("compacted pages must live in rows 0..K-1, slots 0..L-1")
        # a count per page, not a set of tuples: this runs at every decode eviction (about 1 ms per request as a set)
        if len(homes) and np.bincount(homes[:, 0] * len(c) + homes[:, 1]).max() > 1:
            raise ValueError("two compacted pages share one page")

    @classmethod
    def uncompressed(cls, num_layers: int, block_size: int) -> RequestLayout:
        zeros = np.zeros(num_layers, dtype=np.int64)
        return cls(block_size, zeros, 0, 0, np.zeros((0, 2), dtype=np.int64))

    @classmethod
    def from_plan(cls, plan: EvictionPlan) -> RequestLayout:
        """The layout a prefill `EvictionPlan` leaves (its full blocks are B)."""
        homes = plan.entry_array[:, 2:4].copy()
        return cls(plan.block_size, plan.compact_pages.copy(), plan.kept_blocks, plan.full_blocks, homes)

    @property
    def num_layers(self) -> int:
        return len(self.compact_pages)

    # Derived arrays are cached (the layout never changes): a decode eviction reads them at its
    # due step, and `ReevictionPlan.precompute` fills them in an earlier step.
    @cached_property
    def shift_pages(self) -> np.ndarray:
        """d_l: logical page j >= c_l of layer l is row j + d_l."""
        return _frozen(self.tail_block - self.compact_pages)

    @cached_property
    def entry_offsets(self) -> np.ndarray:
        """C_l: first entry of layer l in the entry table."""
        return _frozen(_offsets(self.compact_pages))

    @cached_property
    def entry_layers(self) -> np.ndarray:  # int64 [sum c_l]: l of entry C_l + j
        return _frozen(np.repeat(np.arange(self.num_layers, dtype=np.int64), self.compact_pages))

    @cached_property
    def entry_pages(self) -> np.ndarray:  # int64 [sum c_l]: j of entry C_l + j (layer l's logical page)
        return _frozen(np.arange(len(self.homes), dtype=np.int64) - np.repeat(self.entry_offsets, self.compact_pages))

    @cached_property
    def entry_array(self) -> np.ndarray:
        """int64 [sum c_l, 4]: (entry position, entry slot, page position, page slot), as `EvictionPlan`'s."""
        q = np.arange(len(self.homes), dtype=np.int64)
        L = self.num_layers
        return _frozen(np.stack([q // L, q % L, self.homes[:, 0], self.homes[:, 1]], axis=1))

    def live_tokens(self, seq_len: int) -> np.ndarray:
        """Tokens each layer reads at context `seq_len` (its logical length)."""
        return seq_len - self.shift_pages * self.block_size

    def held_positions(self, seq_len: int) -> np.ndarray:
        """Row positions whose ids the request holds at context `seq_len`."""
        tail = np.arange(self.tail_block, cdiv(seq_len, self.block_size), dtype=np.int64)
        return np.concatenate([np.arange(self.kept_blocks, dtype=np.int64), tail])


@dataclass(frozen=True)
class ReevictionPlan:
    """One decode-time eviction of one request: `before` -> `after` at context `seq_len`.

    Positions in `rehome_sources`, `freed_positions` and the sources of
    `relocation_array` are of the row before the eviction; the destinations and
    `after.homes` are of the row after re-homing (`new_row`).
    """

    seq_len: int
    before: RequestLayout
    after: RequestLayout  # c'_l, K', B' = t, where every kept compacted page ends up
    rehome_sources: np.ndarray  # int64 [n]: positions whose ids move to positions K..K+n-1
    # int64 [m, 4]: (source position, source slot, destination position, destination slot)
    relocation_array: np.ndarray
    freed_positions: np.ndarray  # int64: positions whose ids are handed back

    @property
    def compact_pages(self) -> np.ndarray:
        return self.after.compact_pages

    @property
    def kept_blocks(self) -> int:
        return self.after.kept_blocks

    @property
    def tail_block(self) -> int:
        """t = S // bs: the boundary block, kept whole by every layer."""
        return self.after.tail_block

    @property
    def shift_pages(self) -> np.ndarray:
        return self.after.shift_pages

    @property
    def entry_offsets(self) -> np.ndarray:
        return self.after.entry_offsets

    @property
    def entry_array(self) -> np.ndarray:
        return self.after.entry_array

    @property
    def boundary_tokens(self) -> int:
        return self.seq_len % self.before.block_size

    @property
    def kept_tokens(self) -> np.ndarray:
        """k'_l: tokens each layer reads right after the eviction."""
        return self.after.live_tokens(self.seq_len)

    @cached_property
    def domain_pages(self) -> np.ndarray:
        """m_l = c_l + t - B: the logical pages layer l selects from (its compaction domain)."""
        return _frozen(self.before.compact_pages + (self.tail_block - self.before.tail_block))

    @cached_property
    def evicted_layers(self) -> np.ndarray:
        """Layers that lose tokens (the others only move pages, if at all)."""
        return _frozen(self.compact_pages < self.domain_pages)

    def precompute(self) -> ReevictionPlan:
        """Fill the cached arrays that the due step reads (scoring, compaction, publish), so that a
        plan made ahead (`DecodePlanner.plan_ahead`) leaves the due step less host work."""
        for layout in (self.before, self.after):
            _ = layout.entry_offsets, layout.shift_pages, layout.entry_layers, layout.entry_pages
        _ = self.after.entry_array, self.evicted_layers
        return self

    def rehomed_ids(self, row) -> list[int]:
        return [int(row[p]) for p in self.rehome_sources]

    def rewritten_row(self, row: np.ndarray) -> np.ndarray:
        """int64: the block-table row after re-homing (positions K..K+n-1 rewritten, nothing else).
        Arrays in and out: a row of a 16k context has about 1,000 ids, and each list <-> array
        conversion of it costs tens of µs at every decode eviction."""
        out = np.array(row, dtype=np.int64)  # a copy; the right side below is gathered before the write
        start = self.before.kept_blocks
        out[start : start + len(self.rehome_sources)] = out[self.rehome_sources]
        return out

    def new_row(self, row) -> list[int]:
        """`rewritten_row` as a list of ints (the form of vLLM's block ids)."""
        return self.rewritten_row(np.asarray(row, dtype=np.int64)).tolist()

    def freed_ids(self, row) -> list[int]:
        return [int(row[p]) for p in self.freed_positions]

    def page_copies(self, row, blocks_per_layer: int, new_row=None) -> tuple[np.ndarray, np.ndarray]:
        """(source page ids, destination page ids) of the relocations, for `copy_pages_` (`new_row`:
        `self.rewritten_row(row)`, when the caller has it already)."""
        old = np.asarray(row, dtype=np.int64)
        new = self.rewritten_row(old) if new_row is None else np.asarray(new_row, dtype=np.int64)
        rel = self.relocation_array
        src = rel[:, 1] * blocks_per_layer + old[rel[:, 0]]
        dst = rel[:, 3] * blocks_per_layer + new[rel[:, 2]]
        return src, dst


def compact_pages_for(
    layout: RequestLayout, budgets, seq_len: int, num_sinks: int = 0, num_recent: int = 0
) -> np.ndarray:
    """c'_l (int64 [L]): whole pages so that `c'_l * bs + S % bs` covers the budget, within the domain.

    As `plan_eviction` at `full := t`, and the protected tokens always fit: the
    compacted pages hold at least the sinks and the recent tokens not in the
    boundary block, `num_sinks + max(num_recent - S % bs, 0)`. With the engine's
    `num_recent >= block_size` (engine/requirements.py) that is exactly budgets
    raised to `num_sinks + num_recent`, as `planner.budget_request` floors them.
    The domain cap keeps all of a layer whose budget exceeds it.
    """
    budgets = np.asarray(budgets, dtype=np.int64)
    if budgets.shape != (layout.num_layers,):
        raise ValueError(f"{budgets.shape[0] if budgets.ndim else 0} budgets for {layout.num_layers} layers")
    bs, rem = layout.block_size, seq_len % layout.block_size
    tail = seq_len // bs
    if tail < layout.tail_block:
        raise ValueError(f"context {seq_len} ends before the tail block {layout.tail_block} of the layout")
    need = np.maximum(budgets - rem, num_sinks + max(num_recent - rem, 0))
    return np.minimum(-(-need // bs), layout.compact_pages + (tail - layout.tail_block)).astype(np.int64)


def plan_reeviction(
    layout: RequestLayout, budgets, seq_len: int, num_sinks: int = 0, num_recent: int = 0
) -> ReevictionPlan | None:
    """Plan an eviction of a request in `layout` at context `seq_len`; None when no block can be freed.

    With None nothing changes (the old layout stays valid at any longer context),
    as `plan_eviction` returns None for a prompt it cannot shrink. From
    `RequestLayout.uncompressed` and without protected tokens the plan equals
    `plan_eviction`'s.
    """
    if layout.num_layers == 0:
        return None
    compact = compact_pages_for(layout, budgets, seq_len, num_sinks, num_recent)
    before, tail = layout, seq_len // layout.block_size
    K, B = before.kept_blocks, before.tail_block
    kept = cdiv(int(compact.sum()), layout.num_layers)
    # c'_l <= c_l + t - B, so K' <= K + t - B: rows B..t-1 always have enough ids to re-home.
    moved_rows = max(kept - K, 0)
    assert B + moved_rows <= tail, "not enough rows to re-home"
    freed = np.concatenate([np.arange(kept, K), np.arange(B + moved_rows, tail)]).astype(np.int64)
    if len(freed) == 0:
        return None
    old_pos, slot = _pages_after_compaction(before, compact)
    new_pos = _new_positions(old_pos, before, kept, moved_rows)
    relocations, homes = _relocate(old_pos, slot, new_pos, kept, layout.num_layers)
    after = RequestLayout(layout.block_size, compact, kept, tail, homes)
    sources = np.arange(B, B + moved_rows, dtype=np.int64) if B > K else np.zeros(0, dtype=np.int64)
    return ReevictionPlan(seq_len, before, after, sources, relocations, freed)


def _pages_after_compaction(before: RequestLayout, compact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(old row position, slot) of every kept page, layer-major and page-ascending.

    Compaction writes layer l's kept tokens in place into its first c'_l logical
    pages, so new page j sits where old logical page j was: its home if j < c_l,
    else the stock page of row j + d_l (a row of B..t-1).
    """
    L = before.num_layers
    layer = np.repeat(np.arange(L, dtype=np.int64), compact)
    page = np.arange(len(layer), dtype=np.int64) - np.repeat(_offsets(compact), compact)
    in_home = page < before.compact_pages[layer]
    home = before.homes[(before.entry_offsets[layer] + page)[in_home]]
    old_pos = page + before.shift_pages[layer]
    slot = layer.copy()
    old_pos[in_home], slot[in_home] = home[:, 0], home[:, 1]
    return old_pos, slot


def _new_positions(old_pos: np.ndarray, before: RequestLayout, kept: int, moved_rows: int) -> np.ndarray:
    """Position in the new row of each old position, -1 where its id is not among the rows 0..K'-1."""
    K, B = before.kept_blocks, before.tail_block
    new = np.full_like(old_pos, -1)
    stays = old_pos < min(K, kept)
    rehomed = (old_pos >= B) & (old_pos < B + moved_rows)
    new[stays] = old_pos[stays]
    new[rehomed] = K + old_pos[rehomed] - B
    return new


def _relocate(
    old_pos: np.ndarray, slot: np.ndarray, new_pos: np.ndarray, kept: int, num_layers: int
) -> tuple[np.ndarray, np.ndarray]:
    """(relocation_array, new homes): pages whose row is not retained go to free slots.

    Pairing as `plan_eviction`: moving pages layer-major, page-ascending; free
    slots slot-major, position-ascending (so from an uncompressed layout the
    relocations are `plan_eviction`'s).
    """
    stays = new_pos >= 0
    occupied = np.zeros((num_layers, kept), dtype=bool)
    occupied[slot[stays], new_pos[stays]] = True
    free_slot, free_pos = np.nonzero(~occupied)
    moving = np.flatnonzero(~stays)
    assert len(moving) <= len(free_slot), "retained rows cannot hold the kept pages"
    dst_pos, dst_slot = free_pos[: len(moving)], free_slot[: len(moving)]
    relocations = np.stack([old_pos[moving], slot[moving], dst_pos, dst_slot], axis=1).astype(np.int64)
    homes = np.stack([new_pos, slot], axis=1).astype(np.int64)
    homes[moving, 0], homes[moving, 1] = dst_pos, dst_slot
    return relocations, homes


def layout_page_table_reference(
    row, seq_len: int, layer: int, layout: RequestLayout, blocks_per_layer: int
) -> tuple[list[int], int]:
    """(pages, live tokens) of one layer in any `RequestLayout`: what attention reads (the kernel's oracle)."""
    bs = layout.block_size
    shift = int(layout.shift_pages[layer])
    compact, first = int(layout.compact_pages[layer]), int(layout.entry_offsets[layer])
    live = seq_len - shift * bs
    pages = []
    for j in range(cdiv(live, bs)):
        if j < compact:
            pos, slot = layout.homes[first + j]
            pages.append(page_id(int(row[pos]), int(slot), blocks_per_layer))
        else:
            pages.append(page_id(int(row[j + shift]), layer, blocks_per_layer))
    return pages, live
