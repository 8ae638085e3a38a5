"""SimLayerKV's lazy layers (Zhang et al. 2024).

A layer is lazy when its observation window puts more than `threshold` of the
attention on the sinks and the most recent tokens: such a layer keeps only
those (num_sinks + simlayer.recent tokens); the other layers share what is left
of the request's L * B_avg tokens equally.

Where it applies (it equals `uniform` otherwise):
  * B_avg > num_sinks + recent (1,028 tokens by default): a lazy layer never keeps
    more than B_avg, so below that every layer keeps B_avg. With the defaults
    that means prompts over 5,140 tokens at budget 0.2, over 10,280 at 0.1.
  * The threshold finds lazy layers on the model: 0.9 is the paper's value for
    Llama-3; on Qwen2.5-Coder-0.5B it marks no layer. `vllm-kvcomp calibrate`
    measures each layer's local mass and suggests a per-model threshold
    (vllm_kvcomp/lazy_layers.py: only when some layers stand clearly apart).
`threshold` is the policy's own (a preset may change it per request); `recent`
also defines the statistic the engine computes, so it is the server's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest, MethodOptions
from vllm_kvcomp.policies.registry import register_method

if TYPE_CHECKING:
    from vllm_kvcomp.config import CompressionConfig


class SimLayerOptions(MethodOptions):
    server_only = {"recent": "the local mass is computed once per batch with the server's simlayer.recent"}

    # Lazy: the window's attention mass on the sinks + the last `recent` tokens
    # exceeds `threshold` (0.9 reported for Llama-3).
    threshold: float = Field(0.9, gt=0.0, le=1.0)
    recent: int = Field(1024, ge=1)


@register_method
class SimLayerPolicy(BudgetPolicy):
    name = "simlayer"
    Options = SimLayerOptions
    summary = "lazy layers keep sinks + recent, the rest share the remainder"
    source = "SimLayerKV (Zhang et al. 2024)"
    needs_stats = True

    def __init__(self, options: SimLayerOptions | None = None, num_sinks: int = 4):
        options = options or SimLayerOptions()
        self.threshold = options.threshold
        self.lazy_tokens = num_sinks + options.recent

    @classmethod
    def from_config(cls, config: CompressionConfig) -> SimLayerPolicy:
        return cls(config.section(cls.name), num_sinks=config.num_sinks)

    def lazy_layers(self, request: BudgetRequest) -> np.ndarray:
        assert request.stats is not None
        return request.stats.local_mass > self.threshold

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        lazy = self.lazy_layers(request)
        n = request.num_layers
        lazy_budget = float(min(max(self.lazy_tokens, request.floor), request.avg_budget))
        num_lazy = int(lazy.sum())
        if num_lazy in (0, n):
            return np.full(n, float(request.avg_budget))
        rest = (request.total - num_lazy * lazy_budget) / (n - num_lazy)
        return np.where(lazy, lazy_budget, rest)
