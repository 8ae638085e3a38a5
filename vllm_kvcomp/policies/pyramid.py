"""PyramidKV's schedule: budgets fall linearly from the first layer to the last.

PyramidKV (Cai et al. 2024) sets min = B_avg / beta and max = 2 * B_avg - min,
so the arithmetic sequence max, ..., min sums to L * B_avg.
"""

import numpy as np

from vllm_kvcomp.config import PyramidOptions
from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest


class PyramidPolicy(BudgetPolicy):
    name = "pyramid"

    def __init__(self, options: PyramidOptions = PyramidOptions()):
        self.beta = options.beta

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        n = request.num_layers
        if n == 1:
            return np.array([float(request.avg_budget)])
        lowest = request.avg_budget / self.beta
        highest = 2.0 * request.avg_budget - lowest
        return np.linspace(highest, lowest, n)
