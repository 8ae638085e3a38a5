"""Decode-time eviction (issue #12 steps 4-5; docs/LIFETIME-BUDGETS.md, section 3).

With `evict_every` set, a request is evicted again each time its context has
grown by `evict_every` tokens since its last eviction, scored by its last
`decode_window` decode queries (the ring, engine/decode_ring.py). The requests
due in a step form one batch (`DecodeEvictor.step`, from `end_step`; a step checks
only the requests whose context reaches a lower bound kept per runner index,
`_next_check`, so most steps do no Python work per request). Requests of the step
that have grown by 3/4 of their interval (and a decode window) join the batch
(`_join_check`): a round has a fixed host cost of about 2 ms (launches, copies),
and requests admitted at different steps would otherwise come due one at a time.
Joined requests are evicted early, never late (the memory bound holds), and then
come due together: a cohort. Each batch:
  1. plan, host only (`DecodePlanner`, engine/decode_planning.py): the prefill
     plan's per-layer budget ratios scaled to the average budget at context S
     (`decode_budgets`), then `plan_reeviction` on the request's `RequestLayout`
     (no statistics read back, no collective); usually made in an earlier step;
  2. score every layer's logical pages (`logical_page_table`) with its own queries;
  3. compact each layer in place into its first c'_l logical pages, copy the
     kept pages of rows about to be freed into dead slots of retained rows,
     re-home ids into the block-table row (`take_row_writes`: the runner stages
     them before its next step), publish the layout, report the freed ids
     (`EvictionRecord`, phase "decode"); the scheduler frees them.

Failures stay with the batch, as for the prefill (engine/eviction.py). Before
anything is rewritten (plan, score) the requests keep their layout and are
retried `evict_every` tokens later ("deferred"); after MAX_DEFERRED failures in a
row a request is no longer evicted (its KV grows as stock vLLM's). Once compaction
began on any rank, the batch is finished with an error. Tensor-parallel ranks
agree through `any_rank` before rewriting and after.

Followed: requests whose prefill eviction completed (freeing blocks or not) and
those whose prompt was within budget (method not `none`, prompt >=
`min_prompt_len`; ratios of one: they have no prefill statistics). A request
served uncompressed after a prefill failure stays so. `layer_share` applies to
the prefill only: once evicted, a layer's logical positions hold its own tokens,
so every layer is scored by its own queries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from vllm_kvcomp.engine.decode_planning import DecodePlanner, decode_state, logical_page_table
from vllm_kvcomp.engine.eviction import guarded, workspace_chunks
from vllm_kvcomp.engine.records import CompressionReport, EvictionRecord, SkipRecord
from vllm_kvcomp.engine.reeviction import ReevictionPlan
from vllm_kvcomp.engine.requests import DecodeState, TrackedRequest
from vllm_kvcomp.engine.staging import to_device
from vllm_kvcomp.engine.timing import profiled

if TYPE_CHECKING:
    from vllm_kvcomp.engine.runtime import CompressionRuntime

logger = logging.getLogger("vllm.kvcomp")

MAX_DEFERRED = 3  # decode evictions failed in a row before a request is given up
NEVER = np.iinfo(np.int64).max  # `_next_check` of a request that is not followed
# Of its evict_every: how far a request must have grown to join another's round. At 3/4, a round takes
# those due within the next quarter interval (about 4 rounds per interval however staggered the
# requests), and a request never evicts more than a quarter early (a slower kv_evict_every keeps its pace).
JOIN_FRACTION = 0.75
_NO_STEP: tuple[list[str], np.ndarray] = ([], np.zeros(0, dtype=np.int64))  # no request stepped


@dataclass
class _Batch:
    """The requests of a chunk that free blocks, their plans and what scoring reads."""

    reqs: list[TrackedRequest]
    plans: list[ReevictionPlan]
    groups: list[range]  # layer groups that fit in the workspace
    queries: torch.Tensor | None = None  # [L, R, W, H, D] decode queries
    lse: torch.Tensor | None = None  # [L, R, W, H], None: recomputed by the scorer
    window_lens: torch.Tensor | None = None  # int32 [R]
    live: torch.Tensor | None = None  # int32 [L, R]: logical lengths before the eviction
    pages: torch.Tensor | None = None  # int32 [L, R, P]: logical pages before the eviction
    max_len: int = 0
    first: tuple[torch.Tensor, torch.Tensor] | None = None  # scores and pages of the last group
    row_ids: list[np.ndarray] = field(default_factory=list)  # int64 block-table rows before the eviction
    rows: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (new row, freed ids)
    compaction_started: bool = False
    verify: dict | None = None  # the self-check of reqs[0] (engine/verify.py), when on


class DecodeEvictor:
    def __init__(self, runtime: CompressionRuntime, max_reqs: int) -> None:
        self.rt = runtime
        self.workspace_bytes = runtime.config.eviction_workspace_mb << 20
        # Per runner index: the first context at which `_due` can hold, so that a step checks only
        # the requests that reach it (one numpy comparison, not a Python call per running request).
        # Set when a request is added (`follow`) and again after every check of it (`_next_context`).
        self._next_check = np.full(max_reqs + 1, NEVER, dtype=np.int64)
        # Per runner index: the first context at which it may join a round that others are due in.
        self._join_check = np.full(max_reqs + 1, NEVER, dtype=np.int64)
        self._candidates: list[TrackedRequest] = []
        self._stepped = _NO_STEP  # this step's (request ids, contexts), for plan_ahead
        self._stepped_indices = np.zeros(0, dtype=np.int64)  # and their runner indices, for joining
        self._row_writes: list[tuple[TrackedRequest, int, list[int]]] = []
        self.planner = DecodePlanner(runtime, max_reqs)
        config = runtime.config
        if config.evict_every is not None and config.decode_window != config.window:
            runtime.executor.warm_up(config.decode_window)  # the scorer's tiles for W_dec: no compile mid-serving

    # ------------------------------------------------------------ per step
    def follow(self, req: TrackedRequest) -> None:
        """A new request at its runner index: checked from its next step on, if it can be evicted."""
        self._next_check[req.index] = 0 if req.evicts_while_decoding else NEVER
        self._join_check[req.index] = NEVER  # from its first check on (it has no decode state yet)

    def note_step(self, input_batch) -> None:
        """Host: each scheduled request's context after this step; those that may be due (evict_every only)."""
        self._candidates, self._stepped, self._stepped_indices = [], _NO_STEP, _NO_STEP[1]
        if self.rt.config.evict_every is None or self.rt.decode_ring is None or not self.rt.decode_ring.in_use:
            return  # nothing followed (e.g. only budget-1.0 requests): no per-step work at all
        n = input_batch.num_reqs
        contexts = np.asarray(input_batch.num_computed_tokens_np[:n]) + np.asarray(input_batch.num_scheduled_tokens[:n])
        self._stepped = (input_batch.req_ids, contexts)
        self._stepped_indices = indices = np.asarray(input_batch.idx_mapping_np[:n])
        reached = contexts >= self._next_check[indices]
        for k in np.flatnonzero(reached).tolist():
            req = self.rt.requests.get(input_batch.req_ids[k])
            if req is not None and req.evicts_while_decoding:
                req.seq_len = int(contexts[k])
                self._candidates.append(req)

    def step(self) -> CompressionReport:
        """Evict every request due after this step, in one batch; then plan a few next evictions."""
        candidates, self._candidates = self._candidates, []
        stepped, self._stepped = self._stepped, _NO_STEP
        due = [req for req in candidates if self._due(req)]
        joining = self._joining(due, *stepped) if due else []  # only in a step that has a round
        report = self.evict(due + joining) if due else CompressionReport()
        for req in candidates + joining:  # after the evictions: from their new state
            if self.rt.requests.get(req.req_id) is req:
                self._next_check[req.index] = self._next_context(req)
                self._join_check[req.index] = self._join_context(req)
        self.planner.plan_ahead(*stepped)
        return report

    def _joining(self, due: list[TrackedRequest], req_ids: list[str], contexts: np.ndarray) -> list[TrackedRequest]:
        """Requests of this step, not due, that join the round of `due` (see the module docstring)."""
        taken, ring, joining = {id(req) for req in due}, self.rt.decode_ring, []
        assert ring is not None  # a request is due: note_step found the ring in use
        for k in np.flatnonzero(contexts >= self._join_check[self._stepped_indices]).tolist():
            req, context = self.rt.requests.get(req_ids[k]), int(contexts[k])
            # `_join_context` is NEVER for a request without decode state or stopped
            if req is None or id(req) in taken or context < self._join_context(req):
                continue
            if ring.rows_ready(req.req_id, context):
                req.seq_len = context
                joining.append(req)
        return joining

    def _join_context(self, req: TrackedRequest) -> int:
        """The first context at which the request may join a round (NEVER: it is not followed)."""
        state, every = req.decode, (req.config or self.rt.config).evict_every
        if state is None or state.stopped or every is None or self.rt.decode_ring is None:
            return NEVER
        return state.evicted_at + max(int(every * JOIN_FRACTION), self.rt.decode_ring.window)

    def _next_context(self, req: TrackedRequest) -> int:
        """The first context at which `_due(req)` can hold again, given its state now."""
        config = req.config or self.rt.config
        state, every = req.decode, config.evict_every
        if state is None:  # prefill eviction not done yet (or failed: it stays unfollowed)
            return NEVER if not req.compress and req.prompt_len < config.min_prompt_len else req.seq_len + 1
        if state.stopped or every is None:
            return NEVER
        if req.seq_len - state.evicted_at >= every:  # due, but its ring rows were not all recorded yet
            return req.seq_len + 1
        return state.evicted_at + every

    def take_row_writes(self) -> list[tuple[TrackedRequest, int, list[int]]]:
        """(request, first position, block ids) to write into its block-table row before the
        next step (the runner does; a write for a request removed since must be dropped)."""
        writes, self._row_writes = self._row_writes, []
        return writes

    def _due(self, req: TrackedRequest) -> bool:
        ring, config = self.rt.decode_ring, req.config or self.rt.config
        every = config.evict_every
        if self.rt.requests.get(req.req_id) is not req or not req.evicts_while_decoding or ring is None:
            return False  # (its config has a method: evicts_while_decoding says so)
        if req.decode is None and not req.compress and req.prompt_len >= config.min_prompt_len:
            # Its prompt was within budget (no prefill eviction): followed from its prompt on.
            g = self.rt.geometry
            req.decode = DecodeState.after_prefill(None, None, 0, req.prompt_len, g.num_layers, g.block_size)
        state = req.decode
        if state is None or every is None or state.stopped or req.seq_len - state.evicted_at < every:
            return False
        return ring.rows_ready(req.req_id, req.seq_len)

    # --------------------------------------------------------------- batch
    def evict(self, reqs: list[TrackedRequest]) -> CompressionReport:
        report = CompressionReport()
        lengths = [int(decode_state(req).layout.live_tokens(req.seq_len).max()) for req in reqs]
        with profiled("kvcomp::decode_evictions"):
            for start, end, groups in workspace_chunks(lengths, self.rt.geometry, self.workspace_bytes):
                report.extend(self._evict_chunk(reqs[start:end], groups))
        return report

    def _evict_chunk(self, reqs: list[TrackedRequest], groups: list[range]) -> CompressionReport:
        """Plan and score (the pool is only read), agree, rewrite, agree (see the module docstring)."""
        executor = self.rt.executor
        timer = self.rt.timer.start(len(reqs))  # CUDA events: read at a later step, no sync
        stage, batch = "plan", None
        plans, error = guarded(self.rt, "decode_plan", self.planner.plans, reqs)
        if plans is not None:
            stage = "score"
            batch, error = guarded(self.rt, "decode_score", self._gather, reqs, plans, groups)
        if executor.any_rank([batch is None])[0] or plans is None or batch is None:
            return self._deferred(reqs, stage, error)
        for req, plan in zip(reqs, plans):
            if plan is None:  # nothing to free: its layout stays valid; again in evict_every tokens
                decode_state(req).evicted_at = req.seq_len
        if not batch.reqs:
            return CompressionReport()
        _, error = guarded(self.rt, "decode_compact", self._rewrite, batch)
        failed, compacted = executor.any_rank([error is not None, batch.compaction_started])
        if failed and compacted:
            return self._failed(batch.reqs, error)
        if failed:
            return self._deferred(reqs, "compact", error)
        self.rt.timer.stop(timer)  # into vllm_kvcomp_eviction_seconds, with the prefill batches
        return self._records(reqs, batch)

    def _gather(self, reqs: list[TrackedRequest], plans: list[ReevictionPlan | None], groups: list[range]) -> _Batch:
        """The decode queries and logical pages of the requests that free blocks; scores the last group."""
        chosen = [(req, plan) for req, plan in zip(reqs, plans) if plan is not None]
        batch = _Batch([req for req, _ in chosen], [plan for _, plan in chosen], groups)
        if not chosen:
            return batch
        ring, g, dev = self.rt.decode_ring, self.rt.geometry, self.rt.device
        assert ring is not None
        batch.queries, batch.lse = ring.gather(batch.reqs, [req.seq_len for req in batch.reqs])
        live = np.stack([plan.before.live_tokens(req.seq_len) for req, plan in chosen], axis=1)  # [L, R]
        batch.row_ids = [np.asarray(req.block_ids, dtype=np.int64) for req in batch.reqs]  # once per request
        layouts, seq_lens = [plan.before for plan in batch.plans], [req.seq_len for req in batch.reqs]
        pages = logical_page_table(layouts, batch.row_ids, seq_lens, g.blocks_per_layer).astype(np.int32)
        batch.live, batch.pages = to_device(live.astype(np.int32), dev), to_device(pages, dev)
        batch.window_lens = torch.full((len(chosen),), batch.queries.shape[2], dtype=torch.int32, device=dev)
        batch.max_len = int(live.max())
        batch.first = self._score(batch, groups[-1])
        return batch

    def _score(self, batch: _Batch, layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the rows of `layers` (layer-major) and their page table."""
        assert batch.queries is not None and batch.live is not None and batch.pages is not None
        sl = slice(layers.start, layers.stop)
        pages = batch.pages[sl].reshape(-1, batch.pages.shape[2])
        lse = None if batch.lse is None else batch.lse[sl]
        out = self.rt.executor.score(batch.queries[sl], lse, batch.window_lens, batch.live[sl], pages, batch.max_len)
        return out.scores, pages

    def _rewrite(self, batch: _Batch) -> None:
        """Select and compact (last layers first, as the prefill), copy, re-home, publish."""
        from vllm_kvcomp.kernels import copy_pages_

        observer = self.rt.observer
        # The self-check reads the first request's layers before anything is rewritten.
        snapshot = observer.snapshot_decode(self.rt, batch.reqs[0]) if observer and observer.wants_decode() else None
        batch.compaction_started = True
        first, batch.first = batch.first, None
        keep_of_first: dict[int, torch.Tensor] = {}
        for layers in reversed(batch.groups):
            scores, pages = first if first is not None else self._score(batch, layers)
            first = None
            assert batch.live is not None
            keep_of_first.update(self.rt.executor.compact(batch.plans, scores, batch.live, pages, layers=layers))
            del scores
        if observer is not None:
            observer.before("relocate", (batch.reqs,))
        N, published = self.rt.geometry.blocks_per_layer, []
        new_rows = [plan.rewritten_row(old) for plan, old in zip(batch.plans, batch.row_ids)]
        copies = [plan.page_copies(old, N, new) for plan, old, new in zip(batch.plans, batch.row_ids, new_rows)]
        src = np.concatenate([s for s, _ in copies])
        if len(src):
            dst = np.concatenate([d for _, d in copies])
            copy_pages_(self.rt.pool, to_device(src, self.rt.device), to_device(dst, self.rt.device))
        for req, plan, old, new in zip(batch.reqs, batch.plans, batch.row_ids, new_rows):
            moved = plan.rehomed_ids(old)
            if moved:
                self._row_writes.append((req, plan.before.kept_blocks, moved))
            batch.rows.append((new.tolist(), plan.freed_ids(old)))  # vLLM's block ids are a list
            published.append((req.index, new, plan))
        self.rt.pages.publish(published)
        if snapshot is not None and observer is not None:
            req, plan, row = batch.reqs[0], batch.plans[0], batch.rows[0][0]
            batch.verify = observer.check_decode(self.rt, req, row, plan, keep_of_first, snapshot)

    # ------------------------------------------------------------- outcome
    def _records(self, reqs: list[TrackedRequest], batch: _Batch) -> CompressionReport:
        """Every request of the chunk was evicted (or had nothing to free) at its context."""
        for req in reqs:
            decode_state(req).deferred = 0
        records = []
        ring = self.rt.decode_ring
        for req, plan, (row, freed) in zip(batch.reqs, batch.plans, batch.rows):
            state = decode_state(req)
            req.block_ids, state.layout, state.evicted_at = row, plan.after, req.seq_len
            if ring is not None:  # queries before this context lose their exact LSE
                ring.note_eviction(req.req_id, req.seq_len)
            kept = plan.kept_tokens
            evicted = plan.before.live_tokens(req.seq_len) - kept
            records.append(
                EvictionRecord(
                    req.req_id, freed, req.seq_len, kept.tolist(), phase="decode", evicted_tokens=evicted.tolist()
                )
            )
        if records:  # the self-check of batch.reqs[0] rides on its record, as for the prefill
            records[0].verify = batch.verify
        return CompressionReport(evictions=records)

    def _deferred(self, reqs: list[TrackedRequest], stage: str, error) -> CompressionReport:
        """Nothing was rewritten: each request keeps its layout and is retried later."""
        reason = f"decode_eviction_error_{stage}" if error is not None else f"decode_eviction_error_other_rank_{stage}"
        for req in reqs:
            state = decode_state(req)
            state.evicted_at, state.deferred = req.seq_len, state.deferred + 1
            if state.deferred >= MAX_DEFERRED:
                state.stopped = True
                logger.error(
                    "vllm-kvcomp: %s: decode eviction failed %d times; not retried", req.req_id, state.deferred
                )
        logger.warning("vllm-kvcomp: %d decode eviction(s) deferred (%s): KV intact", len(reqs), reason)
        return CompressionReport(deferred=[SkipRecord(req.req_id, reason) for req in reqs])

    def _failed(self, reqs: list[TrackedRequest], error) -> CompressionReport:
        """Compaction began on some rank: their KV is no longer consistent; the scheduler finishes them."""
        reason = "decode_eviction_error_compact" if error is not None else "decode_eviction_error_other_rank_compact"
        for req in reqs:
            if req.decode is not None:
                req.decode.stopped = True
        logger.error("vllm-kvcomp: %d request(s) finished with an error (%s): KV rewritten", len(reqs), reason)
        return CompressionReport(failures=[SkipRecord(req.req_id, reason) for req in reqs])
