"""The budget-policy interface and the integer allocation every policy shares.

A policy turns the observation statistics of one request into per-layer token
budgets. Every policy's budgets, for a prompt of P tokens and an average budget
B_avg, satisfy:
  * they sum to exactly L * B_avg (the bytes the request may keep),
  * each lies in [floor, P] (sinks + recent window always fit; never more than the prompt),
  * they are deterministic (no randomness, ties broken by layer index).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from vllm_kvcomp.config import CompressionConfig


class MethodOptions(BaseModel):
    """A method's own options: the YAML section named after the method (e.g. `zigzag:`).

    `server_only`: the options that change the statistics the engine computes once
    per batch with the server's config (`scoring.stats_for_policy`) or its GPU
    buffers, each with why; a preset (vllm_kvcomp/presets.py) may not set them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    server_only: ClassVar[dict[str, str]] = {}


@dataclass(frozen=True)
class LayerStats:
    """Per-layer observation statistics of one request (length L each).

    mba: ZigZagKV's LMBA_l, the mean over KV heads of the fewest tokens that
        hold `tau` of the head's observation-window attention.
    local_mass: mean over KV heads of the fraction of window attention on the
        sinks + recent tokens (SimLayerKV's laziness statistic).
    """

    mba: np.ndarray
    local_mass: np.ndarray

    def __post_init__(self) -> None:
        if self.mba.shape != self.local_mass.shape or self.mba.ndim != 1:
            raise ValueError("LayerStats: mba and local_mass must be 1-D arrays of equal length")


@dataclass(frozen=True)
class BudgetRequest:
    """What a policy needs to size the layers of one request."""

    num_layers: int
    seq_len: int  # prompt tokens P
    avg_budget: int  # B_avg, tokens per layer on average
    floor: int  # the fewest tokens any layer keeps (sinks + recent)
    stats: LayerStats | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if not (0 <= self.floor <= self.avg_budget <= self.seq_len):
            raise ValueError(
                f"need 0 <= floor ({self.floor}) <= avg_budget ({self.avg_budget}) <= seq_len ({self.seq_len})"
            )

    @property
    def total(self) -> int:
        return self.num_layers * self.avg_budget


class BudgetPolicy(ABC):
    """One way of splitting L * B_avg tokens over the layers.

    A method is one module in `vllm_kvcomp/policies/` with one subclass decorated
    by `@register_method` (policies/registry.py). The class declares:
      * `name`: the value of `--kv-compression` and of a request's `kv_compression`;
      * `Options`: its option section (a `MethodOptions` model, YAML key `name`), or None;
      * `summary` and `source`: the README's methods table (a test compares them);
      * `from_config`: how to build it from a validated config (default: `cls(options)`).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions] | None] = None
    summary: ClassVar[str] = ""
    source: ClassVar[str] = ""
    #: Whether the policy reads `BudgetRequest.stats` (the engine then computes them).
    needs_stats: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: CompressionConfig) -> BudgetPolicy:
        if cls.Options is None:
            return cls()
        return cls(config.section(cls.name))  # type: ignore[call-arg]

    @classmethod
    def check_config(cls, config: CompressionConfig) -> None:
        """Refuse a config this method cannot run with (raise ValueError, one line)."""
        return None  # most methods run with any valid config

    def budgets(self, request: BudgetRequest) -> np.ndarray:
        """Integer budgets per layer (int64, length L) honouring the invariants above."""
        if self.needs_stats and request.stats is None:
            raise ValueError(f"{self.name}: needs observation statistics")
        if request.stats is not None and len(request.stats.mba) != request.num_layers:
            raise ValueError(f"{self.name}: stats cover {len(request.stats.mba)} layers, expected {request.num_layers}")
        raw = np.asarray(self.raw_budgets(request), dtype=np.float64)
        return allocate(raw, request.total, request.floor, request.seq_len)

    @abstractmethod
    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        """The policy's real-valued budgets (shape L); `allocate` makes them exact."""


def allocate(raw: np.ndarray, total: int, lo: int, hi: int) -> np.ndarray:
    """Integer budgets close to `raw` with sum == total and lo <= b <= hi.

    First the projection x_i = clip(lo + t * (raw_i - lo), lo, hi) onto
    {lo <= x <= hi, sum x = total}: one scale t for every layer, so the order of
    the layers is kept (a layer with a larger raw budget never gets less) and,
    where nothing is clipped, x is `raw` scaled around `lo`. Then
    largest-remainder rounding.
    """
    n = len(raw)
    if n == 0:
        raise ValueError("allocate: no layers")
    if not (n * lo <= total <= n * hi):
        raise ValueError(f"allocate: total {total} infeasible for {n} layers in [{lo}, {hi}]")
    if not np.all(np.isfinite(raw)):
        raise ValueError("allocate: raw budgets must be finite")
    x = _scaled_projection(np.maximum(raw.astype(np.float64) - lo, 0.0), float(total), lo, hi)
    return _round_to_total(x, raw.astype(np.float64), total, lo, hi)


def _round_to_total(x: np.ndarray, raw: np.ndarray, total: int, lo: int, hi: int) -> np.ndarray:
    """Largest remainder: floor, then hand out the missing units by fractional part.

    Ties (within rounding noise) go to the layer with the larger raw budget, then
    to the lower index, so a layer never gets more than one with a larger raw budget.
    """
    n = len(x)
    base = np.clip(np.floor(x + 1e-9).astype(np.int64), lo, hi)
    missing = int(total - base.sum())
    frac = np.round(x - base, 6)
    step = 1 if missing > 0 else -1
    if step > 0:
        order = sorted(range(n), key=lambda i: (-frac[i], -raw[i], i))
    else:
        order = sorted(range(n), key=lambda i: (frac[i], raw[i], -i))
    while missing != 0:  # one pass hands out at most one unit per layer
        for i in order:
            if missing != 0 and lo <= base[i] + step <= hi:
                base[i] += step
                missing -= step
    return base


def _scaled_projection(weight: np.ndarray, total: float, lo: int, hi: int) -> np.ndarray:
    """x = clip(lo + t * weight, lo, hi) with sum(x) == total, for the one t that gives it.

    sum(x) is piecewise linear and nondecreasing in t, with a breakpoint where each
    layer reaches `hi`: walk the breakpoints (largest weight first) and solve the
    linear piece that crosses `total`. Layers of weight 0 get a tiny weight (so they
    are the last to rise, all together).
    """
    n = len(weight)
    if hi == lo:
        return np.full(n, float(lo))
    weight = weight + 1e-9 * max(1.0, float(weight.max()))
    order = np.argsort(-weight, kind="stable")
    w_sorted = weight[order]
    breakpoints = (hi - lo) / w_sorted  # ascending: t at which each layer reaches hi
    unsaturated = w_sorted.sum() - np.concatenate([[0.0], np.cumsum(w_sorted)[:-1]])  # weight still below hi
    k = np.arange(n)
    t = (total - k * hi - (n - k) * lo) / unsaturated  # the crossing if exactly k layers are at hi
    start = np.concatenate([[0.0], breakpoints[:-1]])
    valid = (t >= start - 1e-12) & (t <= breakpoints + 1e-12)
    if not valid.any():  # total == n * hi
        return np.full(n, float(hi))
    return np.clip(lo + t[np.flatnonzero(valid)[0]] * weight, lo, hi)
