"""SnapKV's allocation: every layer keeps the same number of tokens."""

import numpy as np

from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest


class UniformPolicy(BudgetPolicy):
    name = "uniform"

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        return np.full(request.num_layers, float(request.avg_budget))
