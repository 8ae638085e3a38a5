"""SimLayerKV's lazy layers (Zhang et al. 2024).

A layer is lazy when its observation window puts more than `threshold` of the
attention on the sinks and the most recent tokens: such a layer keeps only
those (num_sinks + simlayer.recent tokens); the other layers share what is left
of the request's L * B_avg tokens equally.
"""

import numpy as np

from vllm_kvcomp.config import SimLayerOptions
from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest


class SimLayerPolicy(BudgetPolicy):
    name = "simlayer"
    needs_stats = True

    def __init__(self, options: SimLayerOptions = SimLayerOptions(), num_sinks: int = 4):
        self.threshold = options.threshold
        self.lazy_tokens = num_sinks + options.recent

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
