"""Eviction of a batch of requests whose prompt is complete, with failures contained.

Phase A (score, and the statistics when a method reads them or TP ranks must
agree) only reads the KV pool; phase B (plan, select,
compact, relocate, publish) rewrites it. `Evictor` runs both over the
runtime's parts (capture buffers, executor, page state) and turns any failure
into a decision every tensor-parallel rank shares: serve uncompressed while the
KV is intact, finish with an error once it was rewritten.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm_kvcomp import planner
from vllm_kvcomp.engine.layout import EvictionPlan, cdiv, plan_eviction
from vllm_kvcomp.engine.memory import layer_groups, workspace_bytes_per_row
from vllm_kvcomp.engine.records import CompressionReport, EvictionRecord, SkipRecord
from vllm_kvcomp.engine.requests import DecodeState, TrackedRequest
from vllm_kvcomp.policies import LayerStats

if TYPE_CHECKING:
    from vllm_kvcomp.engine.runtime import CompressionRuntime

logger = logging.getLogger("vllm.kvcomp")


@dataclass
class _Scored:
    """Phase A's inputs and output: what phase B needs to select."""

    queries: torch.Tensor  # [L, R, W, H, D] window queries
    lse: torch.Tensor  # [L, R, W, H]
    lens: torch.Tensor  # int32 [3, R]: window rows, scored length, prompt length
    block_rows: torch.Tensor  # [R, P] block ids of the prompts
    max_len: int
    groups: list[range]  # layer groups that fit in the workspace
    local_stats: torch.Tensor | None = None  # [2, R, L] this rank's sums over KV heads
    # (scores, pages, score_of) when one group holds every layer
    kept: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None

    def score(self, executor, layers: range):
        """ScoreOutput of the scoring layers of `layers` (all of them unless `layer_share` > 1),
        the page ids of the rows of `layers` (layer-major), and each layer's scoring layer."""
        scoring, score_of = executor.shared_layers(layers)
        pages = executor.layer_pages(self.block_rows, layers)
        if scoring == list(layers):  # every layer scores itself: views, no copies
            sl = slice(layers.start, layers.stop)
            queries, lse, scoring_pages = self.queries[sl], self.lse[sl], pages
        else:
            index = torch.tensor(scoring, device=self.queries.device)
            queries, lse = self.queries.index_select(0, index), self.lse.index_select(0, index)
            scoring_pages = executor.layer_pages(self.block_rows, scoring)
        out = executor.score(queries, lse, self.lens[0], self.lens[1], scoring_pages, self.max_len)
        return out, pages, score_of


@dataclass
class _Progress:
    compaction_started: bool = False


class Evictor:
    def __init__(self, runtime: CompressionRuntime) -> None:
        self.rt = runtime
        self.workspace_bytes = runtime.config.eviction_workspace_mb << 20

    def evict(self, batch: list[TrackedRequest]) -> CompressionReport:
        """Requests in chunks whose rows fit in the workspace; a request that does not fit
        alone is scored in groups of layers (engine/memory.py)."""
        report = CompressionReport()
        lengths = [req.prompt_len for req in batch]
        for start, end, groups in workspace_chunks(lengths, self.rt.geometry, self.workspace_bytes):
            if len(groups) > 1:
                logger.info(
                    "vllm-kvcomp: %s scored in %d groups of layers (workspace)", batch[start].req_id, len(groups)
                )
            report.extend(self._evict_chunk(batch[start:end], groups))
        return report

    def _evict_chunk(self, reqs: list[TrackedRequest], groups: list[range]) -> CompressionReport:
        """Compress a batch of requests; a failure stays in the batch.

        Phase A (score, statistics) only reads the KV pool: if it fails on any
        rank, every rank serves the batch uncompressed. So does a failed plan on
        any rank (the ranks agree before rewriting). Phase B (select, compact,
        relocate, publish) rewrites it: if it fails on any rank after compaction
        began on some rank, the requests are finished with an error (their KV is
        no longer what they prefilled); before that, they are served uncompressed.
        """
        timer = self.rt.timer.start(len(reqs))
        # Statistics only when a request's method reads them (zigzag, simlayer), or to agree across
        # tensor-parallel ranks: else no read-back, so the host never waits for the step's forward.
        agree = self.rt.executor.tp_size > 1 or any(self._needs_stats(req) for req in reqs)
        scored, error = self._guarded("score", self._score, reqs, groups, agree)
        stats, failed = None, error is not None
        if agree:
            with self.rt.timer.waiting(timer):  # the read-back waits for the step's forward: not host work
                local = scored.local_stats if scored else None
                stats = self.rt.executor.agree(local, len(reqs), failed=failed)
            failed = stats is None  # this rank's failure or another's
        if failed or scored is None:
            return self._contained(reqs, "score", error, intact=True)
        plans, error = self._guarded("plan", self._plans, reqs, stats)
        # Planning runs on the host from the shared statistics; a rank that failed there must
        # stop the others before any of them rewrites its KV (found by the TP=2 chaos run).
        if self.rt.executor.any_rank([plans is None])[0]:
            return self._contained(reqs, "plan", error, intact=True)
        progress = _Progress()
        verify, error = self._guarded("compact", self._rewrite, reqs, plans, scored, progress)
        failed, compacted = self.rt.executor.any_rank([error is not None, progress.compaction_started])
        if failed or plans is None:
            return self._contained(reqs, "compact", error, intact=not compacted)
        self.rt.timer.stop(timer)
        return CompressionReport(evictions=self._records(reqs, plans, verify))

    def _needs_stats(self, req: TrackedRequest) -> bool:
        try:
            return self.rt.policies.policy_for(req.config or self.rt.config).needs_stats
        except Exception:  # the plan will fail on it too, inside `guarded`: contained there
            return True

    def _score(self, reqs: list[TrackedRequest], groups: list[range], with_stats: bool = True) -> _Scored:
        if any(req.rows is not None and req.rows.failed for req in reqs):
            raise RuntimeError("window capture failed in the forward pass")
        queries, lse, extents = self.rt.capture_buffers.gather(reqs)
        lens = torch.tensor(
            [[rows for rows, _ in extents], [scored for _, scored in extents], [req.prompt_len for req in reqs]],
            dtype=torch.int32,
        ).to(self.rt.device)
        max_len = max(req.prompt_len for req in reqs)
        block_rows = self._block_rows(reqs, cdiv(max_len, self.rt.geometry.block_size))
        scored = _Scored(queries, lse, lens, block_rows, max_len, groups)
        local = []
        for layers in groups:
            out, pages, score_of = scored.score(self.rt.executor, layers)
            if with_stats:
                stats = self.rt.executor.local_statistics(out.mass, lens[1], len(reqs))
                local.append(stats[:, :, score_of])  # a shared layer's statistics are its scoring layer's
            if len(groups) == 1:  # everything fits: phase B reuses this pass
                scored.kept = (out.scores, pages, score_of)
        scored.local_stats = torch.cat(local, dim=2) if local else None
        return scored

    def _rewrite(self, reqs, plans, scored: _Scored, progress: _Progress) -> dict[str, Any] | None:
        """Select, compact, relocate and publish; returns the self-check's result (if on)."""
        observer = self.rt.observer
        checked = observer is not None and observer.wants() and plans[0] is not None
        snapshot = observer.snapshot(self.rt, reqs[0]) if checked and observer is not None else None
        score_hook = observer.score_hook if observer is not None else None
        progress.compaction_started = any(plan is not None for plan in plans)
        keep_of_first: dict[int, torch.Tensor] = {}
        for layers in reversed(scored.groups):
            # Compaction stays inside each layer's own pages, so later groups still read
            # their original keys; relocation (across layers' slots) waits for all groups.
            # Last layers first: a layer is scored by its share group's first layer
            # (`layer_share`), which may sit in an earlier group and must not be compacted yet.
            scores, pages, score_of = scored.kept if scored.kept is not None else self._rescore(scored, layers)
            keep_of_first.update(
                self.rt.executor.compact(
                    plans, scores, scored.lens[2], pages, score_hook, layers=layers, score_of=score_of
                )
            )
            del scores
        if observer is not None:
            observer.before("relocate", (reqs,))
        compressed = [(req, plan) for req, plan in zip(reqs, plans) if plan is not None]
        self.rt.executor.relocate([(req.block_ids, plan) for req, plan in compressed])
        self.rt.pages.publish([(req.index, req.block_ids, plan) for req, plan in compressed])
        if snapshot is not None and observer is not None:
            return observer.check(self.rt, reqs[0], plans[0], keep_of_first, snapshot)
        return None

    def _rescore(self, scored: _Scored, layers: range) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        out, pages, score_of = scored.score(self.rt.executor, layers)
        return out.scores, pages, score_of

    def _guarded(self, stage: str, fn, *args):
        return guarded(self.rt, stage, fn, *args)

    def _contained(self, reqs, stage: str, error, intact: bool) -> CompressionReport:
        """What the scheduler hears about a failed batch (the same on every rank)."""
        for req in reqs:
            self.rt.capture_buffers.release(req)
        reason = f"eviction_error_{stage}" if error is not None else f"eviction_error_other_rank_{stage}"
        records = [SkipRecord(req.req_id, reason) for req in reqs]
        if intact:
            logger.warning("vllm-kvcomp: %d request(s) served uncompressed (%s)", len(reqs), reason)
            return CompressionReport(skips=records)
        logger.error(
            "vllm-kvcomp: %d request(s) finished with an error (%s): their KV was rewritten", len(reqs), reason
        )
        return CompressionReport(failures=records)

    def _plans(self, reqs: list[TrackedRequest], stats: np.ndarray | None) -> list[EvictionPlan | None]:
        return [self._plan(req, None if stats is None else stats[:, r]) for r, req in enumerate(reqs)]

    def _plan(self, req: TrackedRequest, stats: np.ndarray | None) -> EvictionPlan | None:
        """`planner.plan`, keeping the budgets (decode-time eviction scales them later). `stats`
        [2, L], or None when no request of the batch needed them (not computed)."""
        config = req.config or self.rt.config
        layer_stats = LayerStats(mba=stats[0], local_mass=stats[1]) if stats is not None else None
        policy = self.rt.policies.policy_for(config)
        request = planner.budget_request(config, layer_stats, req.prompt_len, self.rt.num_layers)
        req.budgets = policy.budgets(request)
        return plan_eviction(req.budgets, req.prompt_len, self.rt.geometry.block_size)

    def _block_rows(self, reqs: list[TrackedRequest], num_pages: int) -> torch.Tensor:
        """[R, num_pages] int32 block ids of the prompts."""
        rows = np.zeros((len(reqs), num_pages), dtype=np.int32)
        for r, req in enumerate(reqs):
            ids = req.block_ids[:num_pages]
            rows[r, : len(ids)] = ids
        return torch.from_numpy(rows).to(self.rt.device)

    def _records(self, reqs, plans, verify) -> list[EvictionRecord]:
        records = []
        for req, plan in zip(reqs, plans):
            self.rt.capture_buffers.release(req)
            if plan is None:
                kept, freed = [req.prompt_len] * self.rt.num_layers, []
            else:
                kept = plan.kept_tokens.tolist()
                freed = [req.block_ids[i] for i in plan.freed_block_indices]
            records.append(EvictionRecord(req.req_id, freed, req.prompt_len, kept))
            self._follow_decode(req, plan)
        records[0].verify = verify
        return records

    def _follow_decode(self, req: TrackedRequest, plan: EvictionPlan | None) -> None:
        """With `evict_every`, decode-time eviction takes the request from here (engine/decode_eviction.py)."""
        config = req.config or self.rt.config
        if config.evict_every is not None:
            average = config.average_budget(req.prompt_len)
            g = self.rt.geometry
            req.decode = DecodeState.after_prefill(
                plan, req.budgets, average, req.prompt_len, g.num_layers, g.block_size
            )


def workspace_chunks(lengths: list[int], geometry, budget: int) -> list[tuple[int, int, list[range]]]:
    """(start, end, layer groups) of consecutive items whose rows fit in `budget` bytes.

    The kernels pad every row of a chunk to its longest item; an item that does not
    fit alone is one chunk scored in groups of layers (engine/memory.py).
    """
    g, chunks, start = geometry, [], 0
    while start < len(lengths):
        per_layer, longest, end = 0, 0, start
        while end < len(lengths):
            candidate = max(longest, lengths[end])
            needed = (end - start + 1) * workspace_bytes_per_row(g.num_heads, g.num_kv_heads, candidate)
            if end > start and needed * g.num_layers > budget:
                break
            per_layer, longest, end = needed, candidate, end + 1
        chunks.append((start, end, layer_groups(g.num_layers, per_layer, budget)))
        start = end
    return chunks


def guarded(runtime: CompressionRuntime, stage: str, fn, *args):
    """(fn(*args), None), or (None, the exception) with one log line."""
    try:
        if runtime.observer is not None:
            runtime.observer.before(stage, args)
        return fn(*args), None
    except Exception as exc:  # contained: one request batch must never take the engine down
        logger.error("vllm-kvcomp: eviction failed at %s: %s: %s", stage, type(exc).__name__, str(exc)[:200])
        logger.debug("vllm-kvcomp: eviction failure", exc_info=True)
        return None, exc
