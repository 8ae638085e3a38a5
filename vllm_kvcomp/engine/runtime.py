"""The worker-side eviction engine (one per worker process).

Per step, driven by the model runner (engine/worker.py):
  1. `begin_step`: note which prompt positions of this step are observation-window
     queries of a compressible request, and where to copy them.
  2. `layer_tables` (from the attention metadata builder): rebuild every layer's
     page table and live lengths in one launch.
  3. `capture` (from attention forward, per layer): copy the window queries and
     their softmax LSE out of FlashAttention's prefill call.
  4. `end_step` (after sampling): for every request whose prefill completed,
     score all layers (score-gather kernel), size the layers (budget policy),
     select survivors per KV head, compact them in place, relocate overflow
     pages, update the per-request layout and report the freed blocks, which the
     scheduler returns to vLLM's BlockPool.

Every rank of a tensor-parallel group runs the same steps with the same
scheduler outputs; the only data-dependent decision, the budgets, is made from
statistics summed over all ranks' heads, so every rank frees the same blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.engine.layout import EvictionPlan, cdiv, plan_eviction
from vllm_kvcomp.engine.page_tables import build_layer_page_tables
from vllm_kvcomp.engine.verify import Verifier
from vllm_kvcomp.policies import BudgetRequest, LayerStats, make_policy
from vllm_kvcomp.scoring import head_statistics, selection_scores, stats_for_policy

logger = logging.getLogger("vllm.kvcomp")

# Transient GPU bytes the eviction of one batch may use (larger batches are split).
EVICTION_WORKSPACE_BYTES = 256 << 20


@dataclass
class EvictionRecord:
    """What one request's compression did (sent to the scheduler)."""

    req_id: str
    freed_block_ids: list[int]
    prompt_len: int
    kept_tokens: list[int]  # per layer
    seconds: float
    verify: dict | None = None  # engine/verify.py result when self-checking


@dataclass
class SkipRecord:
    req_id: str
    reason: str


@dataclass
class CompressionReport:
    """Attached to ModelRunnerOutput as `kvcomp_report` (plain data, pickles)."""

    evictions: list[EvictionRecord] = field(default_factory=list)
    skips: list[SkipRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.evictions or self.skips)


@dataclass
class CapturePlan:
    """Where this step's window queries go: flat token index -> capture row."""

    src: torch.Tensor  # int64 [n] token index in the batch
    dst: torch.Tensor  # int64 [n] slot * window + row
    rows: list[tuple["_Request", np.ndarray]]  # host copy, to mark rows captured
    executed: bool = False


@dataclass
class _Request:
    req_id: str
    index: int  # vLLM V2 runner's request slot
    block_ids: list[int]
    prompt_len: int
    compress: bool
    config: CompressionConfig | None = None  # per-request method/budget (None: the server's)
    window: int = 0
    slot: int | None = None
    captured: np.ndarray | None = None
    finished: bool = False  # compressed, skipped, or nothing to do


_RUNTIME: "CompressionRuntime | None" = None


def get_runtime() -> "CompressionRuntime":
    if _RUNTIME is None:
        raise RuntimeError("vllm-kvcomp: the compression runtime is not initialised in this process")
    return _RUNTIME


def set_runtime(runtime: "CompressionRuntime | None") -> None:
    global _RUNTIME
    _RUNTIME = runtime


class CompressionRuntime:
    def __init__(self, config: CompressionConfig, vllm_config):
        self.config = config
        self.vllm_config = vllm_config
        self._policies: dict = {}
        self.requests: dict[str, _Request] = {}
        self.step_capture: CapturePlan | None = None
        self._idx_mapping: torch.Tensor | None = None
        self._num_reqs = 0
        self._ready: list[_Request] = []
        self._pending_resets: list[int] = []
        self._skips: list[SkipRecord] = []
        self._views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._region_cache: dict[tuple[str, int], torch.Tensor] = {}
        self.layer_index: dict[str, int] = {}
        self.verifier = Verifier()

    # ------------------------------------------------------------------ setup
    def bind(self, runner, kv_cache_config) -> None:
        """Read the layout from vLLM's objects once the KV pool is allocated."""
        from vllm.distributed import get_tensor_model_parallel_world_size

        (group,) = kv_cache_config.kv_cache_groups
        spec = group.kv_cache_spec
        forward_context = self.vllm_config.compilation_config.static_forward_context
        first_layer = forward_context[group.layer_names[0]]
        self.setup(
            layer_names=list(group.layer_names),
            pool=runner.kv_caches[0],
            blocks_per_layer=kv_cache_config.num_blocks,
            block_size=spec.block_size,
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
        self.layer_names = layer_names
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.num_layers = L = len(layer_names)
        self.pool = pool
        self.blocks_per_layer = blocks_per_layer
        if pool.shape[0] != L * blocks_per_layer or pool.shape[2] != block_size:
            raise RuntimeError(
                f"vllm-kvcomp: expected one KV pool of {L} x {blocks_per_layer} pages of "
                f"{block_size} tokens, got {tuple(pool.shape)}"
            )
        self.block_size = block_size
        self.num_kv_heads = pool.shape[3]
        self.head_size = pool.shape[4]
        self.num_heads = num_heads
        self.scale = scale
        self.max_reqs = max_reqs
        self.width = width
        self.tp_size = tp_size
        self.window = self.config.window
        self.device = dev = pool.device
        # c, C, d per request slot (+ one all-zero row for dummy batches).
        self.state = torch.zeros(3, max_reqs + 1, L, dtype=torch.int32, device=dev)
        self.entries = torch.zeros(L * blocks_per_layer, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(L, max_reqs, width, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(L, max_reqs, dtype=torch.int32, device=dev)
        self.dummy_idx = torch.full((max_reqs,), max_reqs, dtype=torch.int32, device=dev)
        slots = self.config.max_pending_requests
        self.q_buf = torch.zeros(L, slots, self.window, num_heads, self.head_size, dtype=pool.dtype, device=dev)
        self.lse_buf = torch.zeros(L, slots, self.window, num_heads, dtype=torch.float32, device=dev)
        self.free_slots = list(range(slots))
        self.warm_up()
        logger.info(
            "vllm-kvcomp: %s, %d layers x %d blocks of %d tokens in one pool; "
            "%.1f MiB of page tables, %.1f MiB of window buffers",
            self.config.method,
            L,
            blocks_per_layer,
            block_size,
            self.tables.numel() * 4 / 2**20,
            (self.q_buf.numel() * self.q_buf.element_size() + self.lse_buf.numel() * 4) / 2**20,
        )

    def warm_up(self) -> None:
        """Compile the eviction kernels now, not during the first compressed request.

        Runs them once on a scratch pool of two pages with the model's head shapes
        and dtype (the KV pool itself is never touched).
        """
        from vllm_kvcomp.kernels import compact_kv_, copy_pages_, score_gather, select_keep_indices

        dev, bs = self.device, self.block_size
        pool = torch.randn(3, 2, bs, self.num_kv_heads, self.head_size, device=dev).to(self.pool.dtype)
        pages = torch.tensor([[1, 2]], dtype=torch.int32, device=dev)
        lens = torch.tensor([2 * bs], dtype=torch.int32, device=dev)
        rows = min(self.window, bs)
        queries = torch.randn(1, rows, self.num_heads, self.head_size, device=dev).to(self.pool.dtype)
        out = score_gather(
            queries,
            torch.tensor([rows], dtype=torch.int32, device=dev),
            pool,
            pages,
            lens,
            scale=self.scale,
            window_lse=torch.zeros(1, rows, self.num_heads, device=dev),
            pool_kernel=self.config.pool_kernel,
            pool_type=self.config.pool_type,
            square=self.config.square,
            max_seq_len=2 * bs,
        )
        keep = torch.tensor([bs], dtype=torch.int32, device=dev)
        keep_idx = select_keep_indices(out.scores, lens, keep, 0, 0, max_keep=bs, validate=False)
        compact_kv_(pool, pages, keep_idx, keep)
        copy_pages_(pool, torch.tensor([2], device=dev), torch.tensor([0], device=dev))
        head_statistics(out.mass, lens, **stats_for_policy(self.config))

    def layer_region(self, layer_name: str, kv_cache: torch.Tensor) -> torch.Tensor:
        """The layer's own N pages of the pool: vLLM's slot mapping addresses these."""
        key = (layer_name, kv_cache.data_ptr())
        region = self._region_cache.get(key)
        if region is None:
            i = self.layer_index[layer_name]
            n = kv_cache.shape[0] // self.num_layers
            region = kv_cache[i * n : (i + 1) * n]
            self._region_cache[key] = region
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
        self._pending_resets.append(index)
        compress = (config or self.config).should_compress(prompt_len)
        self.requests[req_id] = _Request(req_id, index, list(block_ids), prompt_len, compress, config)

    def append_blocks(self, req_id: str, block_ids: list[int]) -> None:
        req = self.requests.get(req_id)
        if req is not None:
            req.block_ids.extend(block_ids)

    def remove_request(self, req_id: str) -> None:
        req = self.requests.pop(req_id, None)
        if req is None:
            return
        if req.slot is not None:
            self.free_slots.append(req.slot)
        self._pending_resets.append(req.index)

    # ------------------------------------------------------------------- step
    def begin_dummy_step(self) -> None:
        self._idx_mapping = None
        self.step_capture = None
        self._ready = []

    def begin_step(self, input_batch) -> None:
        """Plan this step's window capture (host side, prefill rows only)."""
        self._idx_mapping = input_batch.idx_mapping
        self._num_reqs = input_batch.num_reqs
        self.step_capture = None
        self._ready = []
        prefilling = np.flatnonzero(input_batch.is_prefilling_np)
        if prefilling.size == 0:
            return
        qsl = input_batch.query_start_loc_np
        src, dst, rows = [], [], []
        for r in prefilling:
            req = self.requests.get(input_batch.req_ids[r])
            if req is None or not req.compress or req.finished:
                continue
            computed = int(input_batch.num_computed_tokens_np[r])
            scheduled = int(input_batch.num_scheduled_tokens[r])
            prompt_len = req.prompt_len
            req.window = min(self.window, prompt_len)
            start = max(computed, prompt_len - req.window)
            end = min(computed + scheduled, prompt_len)
            if start < end:
                if req.slot is None:
                    if not self.free_slots:
                        req.finished = True
                        self._skip(req, "capture_slots")
                        continue
                    req.slot = self.free_slots.pop()
                    req.captured = np.zeros(req.window, dtype=bool)
                positions = np.arange(start, end)
                window_rows = positions - (prompt_len - req.window)
                src.append(qsl[r] + positions - computed)
                dst.append(req.slot * self.window + window_rows)
                rows.append((req, window_rows))
            if computed + scheduled >= prompt_len:
                self._ready.append(req)
        if src:
            self.step_capture = CapturePlan(
                src=torch.from_numpy(np.concatenate(src).astype(np.int64)).to(self.device, non_blocking=True),
                dst=torch.from_numpy(np.concatenate(dst).astype(np.int64)).to(self.device, non_blocking=True),
                rows=rows,
            )

    def layer_tables(self, block_table: torch.Tensor, seq_lens: torch.Tensor):
        """Per-layer page tables and lengths for this batch (views of persistent buffers)."""
        self._apply_resets()
        num_rows = block_table.shape[0]
        if self._idx_mapping is None:
            idx, num_reqs = self.dummy_idx, num_rows
        else:
            idx, num_reqs = self._idx_mapping, self._num_reqs
        build_layer_page_tables(
            block_table,
            seq_lens,
            idx,
            num_reqs,
            self.state,
            self.entries,
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

    def _apply_resets(self) -> None:
        """Zero the layout of request slots that were freed or reassigned."""
        if self._pending_resets:
            index = torch.tensor(sorted(set(self._pending_resets)), dtype=torch.long, device=self.device)
            self.state[:, index] = 0
            self._pending_resets.clear()

    def capture(self, layer: int, query: torch.Tensor, lse: torch.Tensor, plan: CapturePlan) -> None:
        q_rows = self.q_buf[layer].view(-1, self.num_heads, self.head_size)
        q_rows.index_copy_(0, plan.dst, query.index_select(0, plan.src))
        lse_rows = self.lse_buf[layer].view(-1, self.num_heads)
        lse_rows.index_copy_(0, plan.dst, lse.index_select(1, plan.src).t().float())
        plan.executed = True

    def end_step(self) -> CompressionReport | None:
        report = CompressionReport()
        plan = self.step_capture
        if plan is not None and plan.executed:
            for req, window_rows in plan.rows:
                req.captured[window_rows] = True
        self.step_capture = None
        ready, self._ready = self._ready, []
        batch = []
        for req in ready:
            if req.finished or req.req_id not in self.requests:
                continue
            req.finished = True
            if req.slot is None or req.captured is None or not req.captured.any():
                # All window rows ran inside a FULL CUDA graph (1-token final chunk, window 1).
                self._skip(req, "no_window_queries")
                self._release_slot(req)
                continue
            batch.append(req)
        report.skips.extend(self._skips)
        self._skips = []
        if batch:
            report.evictions.extend(self._evict(batch))
        return report if report else None

    def _skip(self, req: _Request, reason: str) -> None:
        logger.warning("vllm-kvcomp: request %s served uncompressed (%s)", req.req_id, reason)
        self._skips.append(SkipRecord(req.req_id, reason))

    def _release_slot(self, req: _Request) -> None:
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None

    # --------------------------------------------------------------- eviction
    def _window_extent(self, req: _Request) -> tuple[int, int]:
        """(rows, scored length): the last contiguous run of captured window rows."""
        captured = req.captured
        last = int(np.flatnonzero(captured)[-1])
        first = last
        while first > 0 and captured[first - 1]:
            first -= 1
        scored_len = req.prompt_len - req.window + last + 1
        return last - first + 1, scored_len

    def _block_rows(self, reqs: list[_Request], num_pages: int) -> torch.Tensor:
        """[R, num_pages] int32 block ids of the prompts (pages of layer l: + l * N)."""
        rows = np.zeros((len(reqs), num_pages), dtype=np.int32)
        for r, req in enumerate(reqs):
            ids = req.block_ids[:num_pages]
            rows[r, : len(ids)] = ids
        return torch.from_numpy(rows).to(self.device)

    def _evict(self, batch: list[_Request]) -> list[EvictionRecord]:
        max_len = max(req.prompt_len for req in batch)
        # fp32 temporaries per request: the window sums per query head, then
        # scores, mass and the sorts of the statistics and the selection per KV head.
        per_request = self.num_layers * max_len * 4 * (self.num_heads + 6 * self.num_kv_heads)
        chunk = max(1, EVICTION_WORKSPACE_BYTES // max(per_request, 1))
        records = []
        for i in range(0, len(batch), chunk):
            records.extend(self._evict_chunk(batch[i : i + chunk]))
        return records

    def _evict_chunk(self, reqs: list[_Request]) -> list[EvictionRecord]:
        """Compress a batch of requests, every layer at once.

        Rows of the batched kernels are (layer, request) pairs, layer-major
        (row = layer * R + r): one score-gather launch, one statistics pass and
        one selection + compaction launch for the whole batch, whatever L is.
        """
        from vllm_kvcomp.kernels import compact_kv_, copy_pages_, score_gather, select_keep_indices

        if self.device.type == "cuda":
            # The step's forward is still queued on the GPU: wait for it first, so
            # that the eviction time (metric) is the eviction's own. The host sync
            # below for the budgets would wait for it anyway.
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        cfg, dev, L, bs, N = self.config, self.device, self.num_layers, self.block_size, self.blocks_per_layer
        R = len(reqs)
        extents = [self._window_extent(req) for req in reqs]
        max_len = max(req.prompt_len for req in reqs)
        num_pages = cdiv(max_len, bs)
        # Window rows are stored right-aligned at the end of the observation window;
        # with a shortened window (rows missing at the end) shift them to start at 0.
        first_rows = [req.window - e[0] - (req.prompt_len - e[1]) for req, e in zip(reqs, extents)]
        host = np.array(
            [[e[0] for e in extents], [e[1] for e in extents], [req.prompt_len for req in reqs], [req.slot for req in reqs]],
            dtype=np.int64,
        )
        host_t = torch.from_numpy(host).to(dev, non_blocking=False)
        window_lens, scored_lens, prompt_lens = (host_t[i].to(torch.int32) for i in range(3))
        slots = host_t[3]

        queries = self.q_buf[:, slots]  # [L, R, W, H, D]
        lse = self.lse_buf[:, slots]  # [L, R, W, H]
        if any(first_rows):
            shift = torch.tensor(first_rows, dtype=torch.long, device=dev).view(R, 1)
            rows_idx = (torch.arange(self.window, device=dev).view(1, -1) + shift) % self.window
            req_idx = torch.arange(R, device=dev).view(R, 1)
            queries = queries[:, req_idx, rows_idx]
            lse = lse[:, req_idx, rows_idx]
        block_rows = self._block_rows(reqs, num_pages)  # [R, P]
        layer_offsets = torch.arange(L, dtype=torch.int32, device=dev).view(L, 1, 1) * N
        pages = (block_rows.unsqueeze(0) + layer_offsets).reshape(L * R, num_pages)
        out = score_gather(
            queries.reshape(L * R, *queries.shape[2:]),
            window_lens.repeat(L),
            self.pool,
            pages,
            scored_lens.repeat(L),
            scale=self.scale,
            window_lse=lse.reshape(L * R, *lse.shape[2:]),
            pool_kernel=cfg.pool_kernel,
            pool_type=cfg.pool_type,
            square=cfg.square,
            max_seq_len=max_len,
        )
        mba, local = head_statistics(out.mass, scored_lens.repeat(L), **stats_for_policy(cfg))
        stats = torch.stack([mba.sum(-1).view(L, R).t(), local.sum(-1).view(L, R).t()])  # [2, R, L]
        del mba, local
        num_heads_total = self.num_kv_heads
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            stats = tensor_model_parallel_all_reduce(stats)
            num_heads_total *= self.tp_size
        stats = (stats / num_heads_total).cpu().numpy()

        plans: list[EvictionPlan | None] = []
        for r, req in enumerate(reqs):
            req_cfg = req.config or cfg
            budget_request = BudgetRequest(
                num_layers=L,
                seq_len=req.prompt_len,
                avg_budget=req_cfg.average_budget(req.prompt_len),
                floor=min(req_cfg.protected_tokens, req.prompt_len),
                stats=LayerStats(mba=stats[0, r], local_mass=stats[1, r]),
            )
            plans.append(plan_eviction(self.policy_for(req_cfg).budgets(budget_request), req.prompt_len, bs))

        checked = self.verifier.wants() and plans[0] is not None
        snapshot = self.verifier.snapshot(self, reqs[0]) if checked else None
        keep_of_first = self._compact(plans, out.scores, prompt_lens, pages, select_keep_indices, compact_kv_)
        del out
        self._relocate_and_publish(reqs, plans, copy_pages_)
        verify = self.verifier.check(self, reqs[0], plans[0], keep_of_first, snapshot) if checked else None

        seconds = time.perf_counter() - start
        records = []
        for req, plan in zip(reqs, plans):
            self._release_slot(req)
            if plan is None:
                kept = [req.prompt_len] * L
                freed: list[int] = []
            else:
                kept = plan.kept_tokens.tolist()
                freed = [req.block_ids[i] for i in plan.freed_block_indices]
            records.append(EvictionRecord(req.req_id, freed, req.prompt_len, kept, seconds / len(reqs)))
        records[0].verify = verify
        return records

    def policy_for(self, config: CompressionConfig):
        """The budget policy of a (possibly per-request) config, one object per method."""
        policy = self._policies.get(config.method)
        if policy is None:
            policy = self._policies[config.method] = make_policy(config)
        return policy

    def _compact(self, plans, scores, prompt_lens, pages, select_keep_indices, compact_kv_) -> dict:
        """Select and compact every evicted (layer, request) row in one launch each.

        `scores` and `pages` are layer-major [L * R, ...]; returns the first
        request's keep indices per layer (for the self-check).
        """
        cfg, bs, dev = self.config, self.block_size, self.device
        R = len(plans)
        flat, domain_host, keep_host, req_of_row = [], [], [], []
        for layer in range(self.num_layers):
            for r, plan in enumerate(plans):
                if plan is not None and plan.evicted_layers[layer]:
                    flat.append(layer * R + r)
                    domain_host.append(plan.full_blocks * bs)
                    keep_host.append(int(plan.compact_pages[layer]) * bs)
                    req_of_row.append(r)
        if not flat:
            return {}
        host = torch.from_numpy(np.array([flat, domain_host, keep_host, req_of_row], dtype=np.int64)).to(dev)
        rows_t, domain, keep = host[0], host[1].to(torch.int32), host[2].to(torch.int32)
        row_scores = selection_scores(
            scores.index_select(0, rows_t),
            prompt_lens.index_select(0, host[3]),
            domain,
            num_sinks=cfg.num_sinks,
            num_recent=cfg.num_recent,
            force_keep=self.verifier.force_keep,  # oracle scorer (tests): keep the planted needle
        )
        # No host-side validation (it syncs): plan_eviction guarantees keep <= domain
        # and budgets >= sinks + recent, so the forced tokens always fit.
        keep_idx = select_keep_indices(row_scores, domain, keep, 0, 0, max_keep=max(keep_host), validate=False)
        del row_scores
        compact_kv_(self.pool, pages.index_select(0, rows_t), keep_idx, keep)
        return {
            flat[k] // R: keep_idx[k, :, : keep_host[k]] for k in range(len(flat)) if req_of_row[k] == 0
        }

    def _relocate_and_publish(self, reqs, plans, copy_pages_) -> None:
        """Copy overflow pages, write the entry tables, publish (c, C, d) per request slot."""
        N, dev = self.blocks_per_layer, self.device
        src, dst, entry_at, entry_page = [], [], [], []
        state = np.zeros((3, len(reqs), self.num_layers), dtype=np.int32)
        indices = []
        for r, (req, plan) in enumerate(zip(reqs, plans)):
            if plan is None:
                continue
            row = np.asarray(req.block_ids, dtype=np.int64)
            rel = plan.relocation_array  # (layer, page j, block i, slot s)
            src.append(rel[:, 0] * N + row[rel[:, 1]])
            dst.append(rel[:, 3] * N + row[rel[:, 2]])
            ent = plan.entry_array  # (entry block, entry slot, page block, page slot)
            entry_at.append(ent[:, 1] * N + row[ent[:, 0]])
            entry_page.append(ent[:, 3] * N + row[ent[:, 2]])
            state[0, r] = plan.compact_pages
            state[1, r] = plan.entry_offsets
            state[2, r] = plan.shift_pages
            indices.append((r, req.index))
        src_t, dst_t = np.concatenate(src or [np.zeros(0, np.int64)]), np.concatenate(dst or [np.zeros(0, np.int64)])
        if len(src_t):
            copy_pages_(self.pool, torch.from_numpy(src_t).to(dev), torch.from_numpy(dst_t).to(dev))
        entry_at_t = np.concatenate(entry_at or [np.zeros(0, np.int64)])
        if len(entry_at_t):
            self.entries.index_copy_(
                0,
                torch.from_numpy(entry_at_t).to(dev),
                torch.from_numpy(np.concatenate(entry_page).astype(np.int32)).to(dev),
            )
        if indices:
            self._apply_resets()
            rows = [r for r, _ in indices]
            slots = torch.tensor([i for _, i in indices], dtype=torch.long, device=dev)
            self.state[:, slots] = torch.from_numpy(state[:, rows]).to(dev)
