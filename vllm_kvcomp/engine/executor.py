"""The eviction executor: runs the kernels of one eviction batch on the KV pool.

Rows of every batched kernel are (layer, request) pairs, layer-major
(row = layer * R + r): one score-gather launch, one statistics pass and one
select + compact launch for the whole batch, whatever the number of layers.
The decisions in between (budgets, block plans) are the planner's
(vllm_kvcomp/planner.py); this class only moves data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.engine.layout import EvictionPlan
from vllm_kvcomp.engine.reeviction import ReevictionPlan
from vllm_kvcomp.engine.staging import to_device
from vllm_kvcomp.scoring import head_statistics, selection_scores, stats_for_policy

# Optional rewrite of the selection scores [rows, H, S] before top-k (a test oracle hook).
ScoreHook = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PoolGeometry:
    """The KV pool: L regions of N pages, [L * N, 2, block_size, Hkv, D]."""

    num_layers: int
    blocks_per_layer: int
    block_size: int
    num_kv_heads: int
    head_size: int
    num_heads: int  # query heads of this rank
    scale: float


def _domain_pages(plan: EvictionPlan | ReevictionPlan) -> np.ndarray:
    """int64 [L]: pages each layer selects from: the prompt's whole blocks, or its logical pages
    before the tail block."""
    if isinstance(plan, ReevictionPlan):
        return np.asarray(plan.domain_pages, dtype=np.int64)
    return np.full(len(plan.compact_pages), plan.full_blocks, dtype=np.int64)


def compaction_rows(
    plans: Sequence[EvictionPlan | ReevictionPlan | None],
    layers: range,
    block_size: int,
    per_layer: bool,
    score_of: list[int] | None = None,
) -> np.ndarray:
    """int64 [5, rows], one column per evicted (layer, request) of `layers`, layer-major: its row of
    the layer-major page table, domain tokens, kept tokens, row of the lengths ([L, R] when
    `per_layer`, else [R]) and row of the scores (layer `layers[g]` scored by block `score_of[g]`).
    Vectorised over the requests: this runs at every decode eviction, for a round of up to
    hundreds of due requests."""
    R = len(plans)
    layer_ids = np.fromiter(layers, dtype=np.int64)
    score_group = np.asarray(score_of if score_of is not None else range(len(layer_ids)), dtype=np.int64)
    pairs = [(r, plan) for r, plan in enumerate(plans) if plan is not None]
    index, chosen = [r for r, _ in pairs], [plan for _, plan in pairs]
    if not chosen:
        return np.zeros((5, 0), dtype=np.int64)
    evicted = np.stack([plan.evicted_layers for plan in chosen], axis=1)[layer_ids]  # [G, R']
    g, k = np.nonzero(evicted)  # by layer group, then request: layer-major row order
    r = np.asarray(index, dtype=np.int64)[k]
    domain = np.stack([_domain_pages(plan) for plan in chosen], axis=1)[layer_ids[g], k] * block_size
    keep = np.stack([plan.compact_pages for plan in chosen], axis=1)[layer_ids[g], k].astype(np.int64) * block_size
    length_row = layer_ids[g] * R + r if per_layer else r
    return np.ascontiguousarray(np.stack([g * R + r, domain, keep, length_row, score_group[g] * R + r]))


class EvictionExecutor:
    def __init__(self, pool: torch.Tensor, geometry: PoolGeometry, config: CompressionConfig, tp_size: int = 1):
        self.pool = pool
        self.geo = geometry
        self.config = config
        self.tp_size = tp_size
        self.device = pool.device

    def layer_pages(self, block_rows: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """[R, P] block ids -> [len(layers) * R, P] page ids (page of layer l: l * N + block)."""
        N = self.geo.blocks_per_layer
        offsets = torch.tensor(list(layers), dtype=torch.int32, device=self.device).view(-1, 1, 1) * N
        return (block_rows.unsqueeze(0) + offsets).reshape(len(layers) * block_rows.shape[0], block_rows.shape[1])

    def shared_layers(self, layers: range) -> tuple[list[int], list[int]]:
        """The layers whose windows score `layers` (`layer_share`), and for each layer of
        `layers` the position of its scoring layer in that list.

        Layer l is scored by l - l % layer_share (the first of its group), also when that
        layer lies before `layers` (a workspace group that starts inside a share group):
        the result never depends on how the workspace splits the layers, and there are
        never more scoring layers than `layers`.
        """
        share = self.config.layer_share
        scoring = sorted({layer - layer % share for layer in layers})
        return scoring, [scoring.index(layer - layer % share) for layer in layers]

    def score(self, queries, lse, window_lens, scored_lens, pages, max_len):
        """Observation-window scores of every (layer, request) row: ScoreOutput (scores, mass).

        queries [Lg, R, W, H, D] and lse [Lg, R, W, H] (None: recomputed, one more pass over
        the keys) of the layers scored; rows are layer-major. `scored_lens` is [R] (every
        layer the same length, the prefill) or [Lg, R] (each layer its own, decode time).
        """
        from vllm_kvcomp.kernels import score_gather

        cfg, L = self.config, queries.shape[0]
        return score_gather(
            queries.reshape(-1, *queries.shape[2:]),
            window_lens.repeat(L),
            self.pool,
            pages,
            scored_lens.reshape(-1) if scored_lens.dim() == 2 else scored_lens.repeat(L),
            scale=self.geo.scale,
            window_lse=None if lse is None else lse.reshape(-1, *lse.shape[2:]),
            pool_kernel=cfg.pool_kernel,
            pool_type=cfg.pool_type,
            square=cfg.square,
            max_seq_len=max_len,
        )

    def local_statistics(self, mass: torch.Tensor, scored_lens: torch.Tensor, num_reqs: int) -> torch.Tensor:
        """[2, R, Lg] sums over this rank's KV heads of MBA and local mass (rows of Lg layers)."""
        L = mass.shape[0] // num_reqs
        mba, local = head_statistics(mass, scored_lens.repeat(L), **stats_for_policy(self.config))
        return torch.stack([mba.sum(-1).view(L, num_reqs).t(), local.sum(-1).view(L, num_reqs).t()])

    def agree(self, local: torch.Tensor | None, num_reqs: int, failed: bool) -> np.ndarray | None:
        """[2, R, L] host array: the mean over all KV heads of every TP rank; None if any rank failed.

        The statistics are the one data-dependent input of the budgets, so they
        are summed over the tensor-parallel group, with this rank's failure flag
        in the same collective: every rank then plans and frees the same blocks,
        or every rank serves the batch uncompressed (no rank is left waiting).
        """
        shape = (2, num_reqs, self.geo.num_layers)
        if local is None:
            local = torch.zeros(shape, dtype=torch.float32, device=self.device)
        flat = torch.cat([local.float().reshape(-1), torch.tensor([float(failed)], device=local.device)])
        heads = self.geo.num_kv_heads
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            flat = tensor_model_parallel_all_reduce(flat)
            heads *= self.tp_size
        host = flat.cpu().numpy()
        if host[-1] > 0:
            return None
        return host[:-1].reshape(shape) / heads

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of boolean flags over the tensor-parallel group."""
        if self.tp_size == 1:
            return flags
        from vllm.distributed import tensor_model_parallel_all_reduce

        reduced = tensor_model_parallel_all_reduce(torch.tensor(flags, dtype=torch.float32, device=self.device))
        return [bool(x > 0) for x in reduced.cpu().tolist()]

    def compact(
        self,
        plans: Sequence[EvictionPlan | ReevictionPlan | None],
        scores: torch.Tensor,
        prompt_lens: torch.Tensor,
        pages: torch.Tensor,
        score_hook: ScoreHook | None = None,
        layers: range | None = None,
        score_of: list[int] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Select and compact every evicted (layer, request) row of `layers`, one launch each.

        `pages` holds the rows of those layers, layer-major; `scores` the rows of their
        scoring layers, layer `layers[g]` reading block `score_of[g]` (default g: each layer
        its own). `prompt_lens` [R] is the length whose last `num_recent` tokens are kept
        (the prompt); [L, R] gives each (layer, request) its own (its logical length at
        decode time). The domain is the prompt's whole blocks, or a `ReevictionPlan`'s
        `domain_pages` of the layer. Returns the first request's keep indices per layer
        (for the self-check).
        """
        from vllm_kvcomp.kernels import compact_kv_, select_keep_indices

        cfg, bs = self.config, self.geo.block_size
        layers = layers if layers is not None else range(self.geo.num_layers)
        R, per_layer = len(plans), prompt_lens.dim() == 2
        host = compaction_rows(plans, layers, bs, per_layer, score_of)
        if not host.shape[1]:
            return {}
        flat, keep_host = host[0].tolist(), host[2].tolist()
        dev = to_device(host, self.device)
        rows_t, domain, keep = dev[0], dev[1].to(torch.int32), dev[2].to(torch.int32)
        row_scores = selection_scores(
            scores.index_select(0, dev[4]),
            prompt_lens.reshape(-1).index_select(0, dev[3]),
            domain,
            num_sinks=cfg.num_sinks,
            num_recent=cfg.num_recent,
        )
        if score_hook is not None:
            row_scores = score_hook(row_scores)
        # No host-side validation (it syncs): the plans guarantee keep <= domain
        # and budgets >= sinks + recent, so the forced tokens always fit.
        keep_idx = select_keep_indices(row_scores, domain, keep, 0, 0, max_keep=max(keep_host), validate=False)
        del row_scores
        compact_kv_(self.pool, pages.index_select(0, rows_t), keep_idx, keep)
        return {layers[flat[k] // R]: keep_idx[k, :, : keep_host[k]] for k in range(len(flat)) if flat[k] % R == 0}

    def relocate(self, compressed: list[tuple[list[int], EvictionPlan]]) -> None:
        """Copy overflow pages into free pages of the retained blocks (engine/layout.py)."""
        from vllm_kvcomp.kernels import copy_pages_

        N = self.geo.blocks_per_layer
        src, dst = [], []
        for block_ids, plan in compressed:
            row = np.asarray(block_ids, dtype=np.int64)
            rel = plan.relocation_array  # (layer, page j, block i, slot s)
            src.append(rel[:, 0] * N + row[rel[:, 1]])
            dst.append(rel[:, 3] * N + row[rel[:, 2]])
        src_all = np.concatenate(src or [np.zeros(0, np.int64)])
        if len(src_all):
            dst_all = np.concatenate(dst)
            copy_pages_(self.pool, torch.from_numpy(src_all).to(self.device), torch.from_numpy(dst_all).to(self.device))

    def warm_up(self, window: int) -> None:
        """Compile the eviction kernels now, not during the first compressed request.

        Runs them once on a scratch pool of two pages with the model's head shapes
        and dtype (the KV pool itself is never touched).
        """
        from vllm_kvcomp.kernels import compact_kv_, copy_pages_, score_gather, select_keep_indices

        g, dev, bs = self.geo, self.device, self.geo.block_size
        pool = torch.randn(3, 2, bs, g.num_kv_heads, g.head_size, device=dev).to(self.pool.dtype)
        pages = torch.tensor([[1, 2]], dtype=torch.int32, device=dev)
        lens = torch.tensor([2 * bs], dtype=torch.int32, device=dev)
        rows = window  # the serving shape: the window sets the kernels' tile constants
        queries = torch.randn(1, rows, g.num_heads, g.head_size, device=dev).to(self.pool.dtype)
        out = score_gather(
            queries,
            torch.tensor([rows], dtype=torch.int32, device=dev),
            pool,
            pages,
            lens,
            scale=g.scale,
            window_lse=torch.zeros(1, rows, g.num_heads, device=dev),
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
