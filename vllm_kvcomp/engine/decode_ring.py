"""Ring buffer of the last `decode_window` decode queries of every tracked request
and their softmax LSE (issue #12 step 2, docs/LIFETIME-BUDGETS.md section 2).

Exists only when `evict_every` is set (`CompressionRuntime.decode_ring`, else
None). Buffers, allocated once (`plugin_memory` reserves them, engine/memory.py):
`queries [L, slots + 1, W, H, D]` (model dtype), `lse [L, slots + 1, W, H]` fp32
(row `slots` is scratch: never read) and `dst int64 [max_num_tokens]`, the ring
row of each token of the batch.

Per step, outside any CUDA graph: `plan_step` (host, from the runner's
InputBatch) writes `dst`: the decode token of a tracked request at position `p`
goes to `slot * W + p % W`; prefill rows, untracked requests and padding up to
the CUDA-graph size go to scratch. One non-blocking host->device copy into the
persistent `dst`; no device read. Inside attention, for every layer and batch
(`record`): `queries[l].view(-1, H, D).index_copy_(0, dst[:T], query[:T])`, the
same for the LSE. Fixed shapes on persistent buffers, so a FULL CUDA graph
records it at capture and replays it with each step's `dst`; under PIECEWISE the
attention op runs eagerly and writes directly. Dummy steps (profiling, capture)
point every token at scratch (`clear_dst`).

Interface for the eviction side:
  * `slot_of(req_id) -> int | None`: the request's slot (None: not tracked).
    Tracked: every request whose method is not `none`, from `assign` (the
    runtime's `add_request`) until `release` (finished or preempted; a resumed
    request is new to the worker and gets a fresh, empty slot).
  * `rows_ready(req_id, position) -> bool`: the queries of positions
    `position - W .. position - 1` were all recorded since the slot was assigned
    (planned into steps that ran, or are enqueued before any later device work).
  * `gather(reqs, positions) -> (queries [L, R, W, H, D], lse [L, R, W, H] | None)`:
    for each request r, the decode queries of positions `positions[r] - W ..
    positions[r] - 1`, oldest first, laid out as `WindowCapture.gather` returns
    them. The LSE is None when it is not exact: some row ran before the last
    eviction reported with `note_eviction` (its LSE is over keys since evicted);
    `score_gather` then recomputes it (`window_lse=None`).
  * `note_eviction(req_id, context)`: the request's KV was evicted at `context`;
    queries of earlier positions keep their values but lose their exact LSE.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_kvcomp.engine.requests import TrackedRequest
from vllm_kvcomp.engine.staging import copy_into, to_device

FREE = -1  # no slot (runner index not tracked, ring row never written)


class DecodeRing:
    def __init__(
        self,
        *,
        num_layers: int,
        slots: int,
        window: int,
        num_heads: int,
        head_size: int,
        dtype: torch.dtype,
        max_num_tokens: int,
        max_reqs: int,
        device,
    ):
        self.window = window
        self.slots = slots
        self.device = device
        self.queries = torch.zeros(num_layers, slots + 1, window, num_heads, head_size, dtype=dtype, device=device)
        self.lse = torch.zeros(num_layers, slots + 1, window, num_heads, dtype=torch.float32, device=device)
        self.scratch = slots * window  # first row of the scratch slot
        # Persistent: captured FULL graphs hold its address; refreshed every step before replay.
        self.dst = torch.full((max_num_tokens,), self.scratch, dtype=torch.int64, device=device)
        self._dirty = 0  # dst[:_dirty] may hold non-scratch rows of the last planned step
        self.free_slots = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._slot_of_req: dict[str, int] = {}
        self._slot_of_index = np.full(max_reqs, FREE, dtype=np.int64)  # runner request index -> slot
        self._index_of_slot = np.full(slots, FREE, dtype=np.int64)
        self._stored_pos = np.full((slots, window), FREE, dtype=np.int64)  # position held by each ring row
        self._exact_from = np.zeros(slots, dtype=np.int64)  # rows before this position have a stale LSE

    @property
    def nbytes(self) -> int:
        return self.queries.numel() * self.queries.element_size() + self.lse.numel() * 4 + self.dst.numel() * 8

    # ------------------------------------------------------------- slots
    def assign(self, req_id: str, index: int) -> int | None:
        """Give a request (runner index `index`) an empty slot; None when none is free."""
        self.release(req_id)
        if not self.free_slots:
            return None
        slot = self.free_slots.pop()
        self._slot_of_req[req_id] = slot
        self._slot_of_index[index] = slot
        self._index_of_slot[slot] = index
        self._stored_pos[slot] = FREE
        self._exact_from[slot] = 0
        return slot

    def release(self, req_id: str) -> None:
        slot = self._slot_of_req.pop(req_id, None)
        if slot is None:
            return
        index = self._index_of_slot[slot]
        if self._slot_of_index[index] == slot:
            self._slot_of_index[index] = FREE
        self._index_of_slot[slot] = FREE
        self.free_slots.append(slot)

    @property
    def in_use(self) -> int:
        """Slots held: the requests followed by decode-time eviction."""
        return len(self._slot_of_req)

    def slot_of(self, req_id: str) -> int | None:
        return self._slot_of_req.get(req_id)

    def note_eviction(self, req_id: str, context: int) -> None:
        slot = self._slot_of_req.get(req_id)
        if slot is not None:
            self._exact_from[slot] = max(int(self._exact_from[slot]), context)

    # ---------------------------------------------------------- per step
    def plan_step(self, input_batch) -> None:
        """Point this step's decode tokens of tracked requests at their ring rows (host plan,
        one non-blocking copy); every other token, padding included, at scratch."""
        n = input_batch.num_reqs
        slots = self._slot_of_index[input_batch.idx_mapping_np[:n]]
        rows = np.flatnonzero(~input_batch.is_prefilling_np[:n] & (slots != FREE))
        if len(rows) == 0 and self._dirty == 0:
            return  # dst is all scratch already: nothing to copy
        counts = np.asarray(input_batch.num_scheduled_tokens[rows], dtype=np.int64)  # 1 per decode row
        if counts.size and counts.min() == counts.max() == 1:  # the usual step (no speculative tokens): no repeats
            tokens = input_batch.query_start_loc_np[rows].astype(np.int64)
            positions = input_batch.num_computed_tokens_np[rows].astype(np.int64)
            token_slots = slots[rows]
        else:
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            tokens = np.repeat(input_batch.query_start_loc_np[rows], counts) + within
            positions = np.repeat(input_batch.num_computed_tokens_np[rows], counts) + within
            token_slots = np.repeat(slots[rows], counts)
        used = int(tokens.max()) + 1 if len(tokens) else 0
        plan = np.full(max(used, self._dirty), self.scratch, dtype=np.int64)
        plan[tokens] = token_slots * self.window + positions % self.window
        self._stored_pos[token_slots, positions % self.window] = positions
        self._copy_dst(plan)
        self._dirty = used

    def clear_dst(self) -> None:
        """Dummy batches (profiling, graph capture) write scratch only."""
        self.dst.fill_(self.scratch)
        self._dirty = 0

    def record(self, layer: int, query: torch.Tensor, lse: torch.Tensor) -> None:
        """Attention's write: one layer's T query rows [T, H, D] and their LSE [H, T] into the ring
        rows `dst[:T]`. Capturable (fixed shapes, persistent buffers, no host data); one Triton
        launch per layer. Untracked tokens all point at the scratch row; duplicate indices leave it
        arbitrary (never read)."""
        from vllm_kvcomp.kernels import record_queries_

        record_queries_(self.queries[layer], self.lse[layer], self.dst, query, lse)

    def _copy_dst(self, plan: np.ndarray) -> None:
        # A fresh pinned copy each step (engine/staging.py): the async copy never reads memory the
        # host rewrites next step, and the stream is not synchronized.
        copy_into(self.dst, plan)

    # ------------------------------------------------------------ readers
    def rows_ready(self, req_id: str, position: int) -> bool:
        slot = np.array([self._slot_of_req.get(req_id, FREE)], dtype=np.int64)
        return bool(self._ready(slot, np.array([position], dtype=np.int64))[0])

    def _ready(self, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """bool [R]: request r (ring slot `slots[r]`, FREE if none) has the queries of positions
        `positions[r] - W .. positions[r] - 1` recorded. One pass for a whole round."""
        wanted = positions.reshape(-1, 1) - self.window + np.arange(self.window)
        ready = (slots != FREE) & (positions >= self.window)
        return ready & (self._stored_pos[slots.reshape(-1, 1), wanted % self.window] == wanted).all(axis=1)

    def gather(self, reqs: list[TrackedRequest], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries [L, R, W, H, D] and LSE [L, R, W, H] (None if not exact) of positions
        `positions[r] - W .. positions[r] - 1` of each request, oldest first."""
        slots = [self._slot_of_req.get(req.req_id, FREE) for req in reqs]
        slot_idx = np.asarray(slots, dtype=np.int64).reshape(-1, 1)
        # The oldest wanted position p - W sits at ring row (p - W) % W == p % W.
        start = np.asarray(positions, dtype=np.int64).reshape(-1, 1)
        ring_rows = (start + np.arange(self.window)) % self.window
        ready = self._ready(slot_idx[:, 0], start[:, 0])  # the whole round at once
        missing = [req.req_id for req, ok in zip(reqs, ready) if not ok]
        assert not missing, f"gather() takes requests whose last {self.window} decode queries are recorded: {missing}"
        slot_t, rows_t = to_device(slot_idx, self.device), to_device(ring_rows, self.device)
        queries = self.queries[:, slot_t, rows_t]
        exact = bool((start[:, 0] - self.window >= self._exact_from[slot_idx[:, 0]]).all())
        return queries, self.lse[:, slot_t, rows_t] if exact else None
