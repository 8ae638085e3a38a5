"""Observation statistics and token selection shared by the GPU engine and the CPU eval.

`mass` is the unpooled observation-window attention per KV head and token (the
`mass` output of the score-gather kernel, or of the plain-torch reference),
`scores` the pooled ranking scores. Both are [R, H, S] with R requests.
"""

from __future__ import annotations

import torch

from vllm_kvcomp.config import CompressionConfig


def head_statistics(
    mass: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    tau: float,
    num_sinks: int,
    local_recent: int,
    exclude_recent: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (request, head): ZigZagKV's MBA and SimLayerKV's local mass fraction.

    `mass` [R, H, S]: each window query's softmax (over its causal keys) summed over
    the window's queries; the head axis is whatever the caller gives: the engine's
    kernel sums the query heads of each KV head, per-query-head rows give the
    paper's per-head MBA (docs/ZIGZAG-FAITHFULNESS.md).

    MBA = fewest tokens whose mass reaches `tau` of the head's total over the
    counted tokens. Every window query's attention sums to 1, so a threshold
    relative to the total is tau of the window-averaged distribution: summing or
    averaging over the queries gives the same MBA. Counted tokens: the whole prompt
    (`exclude_recent` 0, the default and the literal reading), or only those before
    the last min(exclude_recent, len) tokens (ZigZagKV `mba_scope: prefix`: SnapKV's
    vote over the tokens before the observation window); no token counted: MBA 0.
    local mass = share of the window attention on the first `num_sinks` and the
    last `local_recent` tokens (always over the whole prompt). Returns two float32
    tensors [R, H].
    """
    mass = mass.float()
    positions = torch.arange(mass.shape[-1], device=mass.device).view(1, -1)
    lens = seq_lens.to(mass.device).view(-1, 1).long()
    valid = positions < lens
    mass = mass * valid.unsqueeze(1)  # a new tensor: the in-place masking below leaves the caller's intact
    total = mass.sum(-1)
    local = forced_keep_mask(lens.view(-1), mass.shape[-1], num_sinks, local_recent)
    local_mass = (mass * local.unsqueeze(1)).sum(-1) / total.clamp_min(1e-30)
    counted = lens
    if exclude_recent > 0:
        counted = lens - lens.clamp(max=exclude_recent)
        mass.masked_fill_((positions >= counted).unsqueeze(1), 0.0)
        total = mass.sum(-1)
    ordered = mass.sort(dim=-1, descending=True).values
    reached = ordered.cumsum(-1) >= tau * total.unsqueeze(-1) * (1 - 1e-6)
    mba = (~reached).sum(-1).float() + 1
    mba = torch.minimum(mba, counted.float())
    return mba, local_mass


def forced_keep_mask(seq_lens: torch.Tensor, length: int, num_sinks: int, num_recent: int) -> torch.Tensor:
    """[R, length] bool: the sinks and the last `num_recent` tokens of each request (before its length).

    The one implementation is the kernels' (`vllm_kvcomp.kernels.common.forced_keep_mask`),
    shared with `select_keep_indices` and the references.
    """
    from vllm_kvcomp.kernels.common import forced_keep_mask as shared

    return shared(seq_lens, length, num_sinks, num_recent)


def selection_scores(
    scores: torch.Tensor,
    prompt_lens: torch.Tensor,
    domains: torch.Tensor,
    *,
    num_sinks: int,
    num_recent: int,
    force_keep: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Scores [R, H, S] ready for top-k: forced tokens +inf, positions >= domain -inf.

    Forced: the sinks, the last `num_recent` prompt tokens and, for tests, an
    oracle range `force_keep`. The domain is the whole prompt blocks before the
    boundary block (engine/layout.py), the only tokens that can be evicted.
    """
    length = scores.shape[-1]
    positions = torch.arange(length, device=scores.device).view(1, -1)
    forced = forced_keep_mask(prompt_lens.to(scores.device), length, num_sinks, num_recent)
    if force_keep is not None:
        forced = forced | ((positions >= force_keep[0]) & (positions < force_keep[1]))
    outside = positions >= domains.to(scores.device).view(-1, 1)
    return scores.masked_fill(forced.unsqueeze(1), float("inf")).masked_fill(outside.unsqueeze(1), float("-inf"))


def stats_for_policy(config: CompressionConfig) -> dict:
    """The keyword arguments of `head_statistics` for a config.

    The same statistics serve every method of the server (a request may switch
    methods): zigzag's options only change the MBA, never SimLayerKV's local mass.
    """
    zigzag = config.section("zigzag")
    return {
        "tau": zigzag.tau,
        "num_sinks": config.num_sinks,
        "local_recent": config.section("simlayer").recent,
        # mba_scope "prefix": SnapKV's vote leaves out the observation window (always kept).
        "exclude_recent": config.window if zigzag.mba_scope == "prefix" else 0,
    }
