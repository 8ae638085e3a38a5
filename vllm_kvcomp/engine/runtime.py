"""The worker-side compression runtime (one per worker process).

It coordinates four parts, each with one job:
  * `WindowCapture` (engine/capture.py): the observation-window queries;
  * `LayerPageState` (engine/layer_state.py): per-layer page tables of every request;
  * the planner (vllm_kvcomp/planner.py): statistics -> budgets -> block plan;
  * `EvictionExecutor` (engine/executor.py): the kernels on the KV pool.

Per step, driven by the model runner (engine/worker.py):
  1. `begin_step`: plan which prompt positions of this step are window queries.
  2. `layer_tables` (attention metadata builder): every layer's page table, one launch.
  3. `capture` (attention forward, per layer): copy the window queries and LSE.
  4. `end_step` (after sampling): compress every request whose prefill completed
     and report the freed blocks, which the scheduler returns to vLLM's BlockPool.

Every rank of a tensor-parallel group runs the same steps with the same
scheduler outputs; the only data-dependent decision, the budgets, is made from
statistics summed over all ranks' heads, so every rank frees the same blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_kvcomp import planner
from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.engine.capture import CapturePlan, WindowCapture
from vllm_kvcomp.engine.executor import EvictionExecutor, PoolGeometry
from vllm_kvcomp.engine.layer_state import LayerPageState
from vllm_kvcomp.engine.layout import EvictionPlan, cdiv
from vllm_kvcomp.engine.records import CompressionReport, EvictionRecord, SkipRecord
from vllm_kvcomp.engine.requests import TrackedRequest
from vllm_kvcomp.engine.verify import EvictionObserver, load_observer
from vllm_kvcomp.policies import LayerStats

logger = logging.getLogger("vllm.kvcomp")

# Transient GPU bytes the eviction of one batch may use (larger batches are split).
EVICTION_WORKSPACE_BYTES = 256 << 20

_RUNTIME: CompressionRuntime | None = None


@dataclass
class _Scored:
    """Phase A's output: what phase B needs of the score pass."""

    scores: torch.Tensor  # [L * R, Hkv, S] pooled scores
    prompt_lens: torch.Tensor  # [R] int32
    pages: torch.Tensor  # [L * R, P] page ids
    local_stats: torch.Tensor  # [2, R, L] this rank's sums over KV heads


@dataclass
class _Progress:
    compaction_started: bool = False


def get_runtime() -> CompressionRuntime:
    if _RUNTIME is None:
        raise RuntimeError("vllm-kvcomp: the compression runtime is not initialised in this process")
    return _RUNTIME


def set_runtime(runtime: CompressionRuntime | None) -> None:
    global _RUNTIME
    _RUNTIME = runtime


class CompressionRuntime:
    capture_buffers: WindowCapture
    pages: LayerPageState
    executor: EvictionExecutor
    geometry: PoolGeometry

    def __init__(self, config: CompressionConfig, vllm_config=None, observer: EvictionObserver | None = None):
        self.config = config
        self.vllm_config = vllm_config
        self.policies = planner.PolicyCache()
        self.requests: dict[str, TrackedRequest] = {}
        self.step_capture: CapturePlan | None = None
        self.layer_index: dict[str, int] = {}
        self.observer = observer if observer is not None else load_observer()
        self._idx_mapping: torch.Tensor | None = None
        self._num_reqs = 0
        self._ready: list[TrackedRequest] = []
        self._skips: list[SkipRecord] = []
        self._region_cache: dict[tuple[str, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ setup
    def bind(self, runner, kv_cache_config) -> None:
        """Read the layout from vLLM's objects once the KV pool is allocated."""
        from vllm.distributed import get_tensor_model_parallel_world_size

        (group,) = kv_cache_config.kv_cache_groups
        forward_context = self.vllm_config.compilation_config.static_forward_context
        first_layer = forward_context[group.layer_names[0]]
        self.setup(
            layer_names=list(group.layer_names),
            pool=runner.kv_caches[0],
            blocks_per_layer=kv_cache_config.num_blocks,
            block_size=group.kv_cache_spec.block_size,
            num_heads=first_layer.impl.num_heads,
            scale=first_layer.impl.scale,
            max_reqs=runner.max_num_reqs,
            width=runner.block_tables.input_block_tables[0].shape[1],
            tp_size=get_tensor_model_parallel_world_size(),
        )

    def setup(
        self,
        *,
        layer_names: list[str],
        pool: torch.Tensor,
        blocks_per_layer: int,
        block_size: int,
        num_heads: int,
        scale: float,
        max_reqs: int,
        width: int,
        tp_size: int = 1,
    ) -> None:
        """Allocate the runtime's buffers (pool: [L * N, 2, block_size, Hkv, D])."""
        L = len(layer_names)
        if pool.shape[0] != L * blocks_per_layer or pool.shape[2] != block_size:
            raise RuntimeError(
                f"vllm-kvcomp: expected one KV pool of {L} x {blocks_per_layer} pages of "
                f"{block_size} tokens, got {tuple(pool.shape)}"
            )
        self.layer_names = layer_names
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.pool = pool
        self.device = pool.device
        self.width = width
        self.geometry = PoolGeometry(L, blocks_per_layer, block_size, pool.shape[3], pool.shape[4], num_heads, scale)
        self.capture_buffers = WindowCapture(
            num_layers=L,
            slots=self.config.max_pending_requests,
            window=self.config.window,
            num_heads=num_heads,
            head_size=pool.shape[4],
            dtype=pool.dtype,
            device=self.device,
        )
        self.pages = LayerPageState(
            num_layers=L,
            blocks_per_layer=blocks_per_layer,
            block_size=block_size,
            max_reqs=max_reqs,
            width=width,
            device=self.device,
        )
        self.executor = EvictionExecutor(pool, self.geometry, self.config, tp_size)
        self.executor.warm_up(self.config.window)
        logger.info(
            "vllm-kvcomp: %s, %d layers x %d blocks of %d tokens in one pool; "
            "%.1f MiB of page tables, %.1f MiB of window buffers",
            self.config.method,
            L,
            blocks_per_layer,
            block_size,
            self.pages.nbytes / 2**20,
            self.capture_buffers.nbytes / 2**20,
        )

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    def layer_region(self, layer_name: str, kv_cache: torch.Tensor) -> torch.Tensor:
        """The layer's own N pages of the pool: vLLM's slot mapping addresses these."""
        key = (layer_name, kv_cache.data_ptr())
        region = self._region_cache.get(key)
        if region is None:
            i = self.layer_index[layer_name]
            n = kv_cache.shape[0] // self.num_layers
            region = self._region_cache[key] = kv_cache[i * n : (i + 1) * n]
        return region

    # ------------------------------------------------------ request lifecycle
    def add_request(
        self,
        req_id: str,
        index: int,
        block_ids: list[int],
        prompt_len: int,
        config: CompressionConfig | None = None,
    ) -> None:
        """Track a new request; `config` overrides the server's method/budget for it."""
        self.remove_request(req_id)
        self.pages.reset(index)
        compress = (config or self.config).should_compress(prompt_len)
        self.requests[req_id] = TrackedRequest(req_id, index, list(block_ids), prompt_len, compress, config)

    def append_blocks(self, req_id: str, block_ids: list[int]) -> None:
        req = self.requests.get(req_id)
        if req is not None:
            req.block_ids.extend(block_ids)

    def remove_request(self, req_id: str) -> None:
        req = self.requests.pop(req_id, None)
        if req is not None:
            self.capture_buffers.release(req)
            self.pages.reset(req.index)

    # ------------------------------------------------------------------- step
    def begin_dummy_step(self) -> None:
        self._idx_mapping = None
        self.step_capture = None
        self._ready = []

    def begin_step(self, input_batch) -> None:
        """Plan this step's window capture (host side, prefill rows only)."""
        self._idx_mapping = input_batch.idx_mapping
        self._num_reqs = input_batch.num_reqs
        step = self.capture_buffers.plan_step(input_batch, self.requests)
        for req in step.no_slot:
            req.finished = True
            self._skip(req, "capture_slots")
        self.step_capture = step.plan
        self._ready = step.ready

    def layer_tables(self, block_table: torch.Tensor, seq_lens: torch.Tensor):
        """Per-layer page tables and lengths for this batch (views of persistent buffers)."""
        return self.pages.build(block_table, seq_lens, self._idx_mapping, self._num_reqs)

    def capture(self, layer: int, query: torch.Tensor, lse: torch.Tensor, plan: CapturePlan) -> None:
        self.capture_buffers.capture(layer, query, lse, plan)

    def end_step(self) -> CompressionReport | None:
        self.capture_buffers.mark_executed(self.step_capture)
        self.step_capture = None
        ready, self._ready = self._ready, []
        batch = []
        for req in ready:
            if req.finished or req.req_id not in self.requests:
                continue
            req.finished = True
            if not req.window_captured():
                # All window rows ran inside a FULL CUDA graph (1-token final chunk, window 1).
                self._skip(req, "no_window_queries")
                self.capture_buffers.release(req)
                continue
            batch.append(req)
        report = CompressionReport(skips=self._skips)
        self._skips = []
        if batch:
            report.extend(self._evict(batch))
        return report if report else None

    def _skip(self, req: TrackedRequest, reason: str) -> None:
        logger.warning("vllm-kvcomp: request %s served uncompressed (%s)", req.req_id, reason)
        self._skips.append(SkipRecord(req.req_id, reason))

    # --------------------------------------------------------------- eviction
    def _evict(self, batch: list[TrackedRequest]) -> CompressionReport:
        g = self.geometry
        max_len = max(req.prompt_len for req in batch)
        # fp32 temporaries per request: the window sums per query head, then
        # scores, mass and the sorts of the statistics and the selection per KV head.
        per_request = g.num_layers * max_len * 4 * (g.num_heads + 6 * g.num_kv_heads)
        chunk = max(1, EVICTION_WORKSPACE_BYTES // max(per_request, 1))
        report = CompressionReport()
        for i in range(0, len(batch), chunk):
            report.extend(self._evict_chunk(batch[i : i + chunk]))
        return report

    def _evict_chunk(self, reqs: list[TrackedRequest]) -> CompressionReport:
        """Compress a batch of requests, every layer at once; a failure stays in the batch.

        Phase A (score, statistics) only reads the KV pool: if it fails on any
        rank, every rank serves the batch uncompressed. Phase B (plan, select,
        compact, relocate, publish) rewrites it: if it fails on any rank after
        compaction began, the requests are finished with an error (their KV is no
        longer what they prefilled); before that, they are served uncompressed.
        """
        if self.device.type == "cuda":
            # The step's forward is still queued on the GPU: wait for it first, so
            # that the eviction time (metric) is the eviction's own. The host sync
            # for the budgets would wait for it anyway.
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        scored, error = self._guarded("score", self._score, reqs)
        stats = self.executor.agree(scored.local_stats if scored else None, len(reqs), failed=error is not None)
        if stats is None or scored is None:
            return self._contained(reqs, "score", error, intact=True)
        plans, error = self._guarded("plan", lambda: [self._plan(req, stats[:, r]) for r, req in enumerate(reqs)])
        progress = _Progress()
        verify = None
        if plans is not None:
            verify, error = self._guarded("compact", self._rewrite, reqs, plans, scored, progress)
        failed, compacted = self.executor.any_rank([error is not None, progress.compaction_started])
        if failed or plans is None:
            return self._contained(reqs, "plan" if plans is None else "compact", error, intact=not compacted)
        return CompressionReport(evictions=self._records(reqs, plans, time.perf_counter() - start, verify))

    def _score(self, reqs: list[TrackedRequest]) -> _Scored:
        if any(req.rows is not None and req.rows.failed for req in reqs):
            raise RuntimeError("window capture failed in the forward pass")
        queries, lse, extents = self.capture_buffers.gather(reqs)
        lens = torch.tensor(
            [[rows for rows, _ in extents], [scored for _, scored in extents], [req.prompt_len for req in reqs]],
            dtype=torch.int32,
        ).to(self.device)
        max_len = max(req.prompt_len for req in reqs)
        pages = self.executor.layer_pages(self._block_rows(reqs, cdiv(max_len, self.geometry.block_size)))
        out = self.executor.score(queries, lse, lens[0], lens[1], pages, max_len)
        local_stats = self.executor.local_statistics(out.mass, lens[1], len(reqs))
        return _Scored(out.scores, lens[2], pages, local_stats)

    def _rewrite(self, reqs, plans, scored: _Scored, progress: _Progress) -> dict[str, Any] | None:
        """Select, compact, relocate and publish; returns the self-check's result (if on)."""
        observer = self.observer
        checked = observer is not None and observer.wants() and plans[0] is not None
        snapshot = observer.snapshot(self, reqs[0]) if checked and observer is not None else None
        score_hook = observer.score_hook if observer is not None else None
        progress.compaction_started = any(plan is not None for plan in plans)
        keep_of_first = self.executor.compact(plans, scored.scores, scored.prompt_lens, scored.pages, score_hook)
        compressed = [(req, plan) for req, plan in zip(reqs, plans) if plan is not None]
        self.executor.relocate([(req.block_ids, plan) for req, plan in compressed])
        self.pages.publish([(req.index, req.block_ids, plan) for req, plan in compressed])
        if snapshot is not None and observer is not None:
            return observer.check(self, reqs[0], plans[0], keep_of_first, snapshot)
        return None

    def _guarded(self, stage: str, fn, *args):
        """(fn(*args), None), or (None, the exception) with one log line."""
        try:
            if self.observer is not None:
                self.observer.before(stage, args)
            return fn(*args), None
        except Exception as exc:  # contained: one request batch must never take the engine down
            logger.error("vllm-kvcomp: eviction failed at %s: %s: %s", stage, type(exc).__name__, str(exc)[:200])
            logger.debug("vllm-kvcomp: eviction failure", exc_info=True)
            return None, exc

    def _contained(self, reqs, stage: str, error, intact: bool) -> CompressionReport:
        """What the scheduler hears about a failed batch (the same on every rank)."""
        for req in reqs:
            self.capture_buffers.release(req)
        reason = f"eviction_error_{stage}" if error is not None else f"eviction_error_other_rank_{stage}"
        records = [SkipRecord(req.req_id, reason) for req in reqs]
        if intact:
            logger.warning("vllm-kvcomp: %d request(s) served uncompressed (%s)", len(reqs), reason)
            return CompressionReport(skips=records)
        logger.error("vllm-kvcomp: %d request(s) finished with an error (%s): their KV was rewritten", len(reqs), reason)
        return CompressionReport(failures=records)

    def _plan(self, req: TrackedRequest, stats: np.ndarray) -> EvictionPlan | None:
        config = req.config or self.config
        layer_stats = LayerStats(mba=stats[0], local_mass=stats[1])
        policy = self.policies.policy_for(config)
        return planner.plan(config, layer_stats, req.prompt_len, self.num_layers, self.geometry.block_size, policy)

    def _block_rows(self, reqs: list[TrackedRequest], num_pages: int) -> torch.Tensor:
        """[R, num_pages] int32 block ids of the prompts."""
        rows = np.zeros((len(reqs), num_pages), dtype=np.int32)
        for r, req in enumerate(reqs):
            ids = req.block_ids[:num_pages]
            rows[r, : len(ids)] = ids
        return torch.from_numpy(rows).to(self.device)

    def _records(self, reqs, plans, seconds: float, verify) -> list[EvictionRecord]:
        records = []
        for req, plan in zip(reqs, plans):
            self.capture_buffers.release(req)
            if plan is None:
                kept, freed = [req.prompt_len] * self.num_layers, []
            else:
                kept = plan.kept_tokens.tolist()
                freed = [req.block_ids[i] for i in plan.freed_block_indices]
            records.append(EvictionRecord(req.req_id, freed, req.prompt_len, kept, seconds / len(reqs)))
        records[0].verify = verify
        return records
