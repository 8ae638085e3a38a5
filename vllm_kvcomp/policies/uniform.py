"""SnapKV's allocation: every layer keeps the same number of tokens."""

import numpy as np

from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest
from vllm_kvcomp.policies.registry import register_method


@register_method
class UniformPolicy(BudgetPolicy):
    name = "uniform"
    summary = "B_l = B_avg"
    source = "SnapKV (Li et al. 2024)"

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        return np.full(request.num_layers, float(request.avg_budget))
