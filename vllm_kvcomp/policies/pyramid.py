"""PyramidKV's schedule: budgets fall linearly from the first layer to the last.

PyramidKV (Cai et al. 2024) sets min = B_avg / beta and max = 2 * B_avg - min,
so the arithmetic sequence max, ..., min sums to L * B_avg.
"""

import numpy as np
from pydantic import Field

from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest, MethodOptions
from vllm_kvcomp.policies.registry import register_method


class PyramidOptions(MethodOptions):
    # The paper and its code use beta = 20.
    beta: float = Field(20.0, gt=1.0, le=1000.0)


@register_method
class PyramidPolicy(BudgetPolicy):
    name = "pyramid"
    Options = PyramidOptions
    summary = "linear from 2 B_avg - B_avg/beta down to B_avg/beta"
    source = "PyramidKV (Cai et al. 2024)"

    def __init__(self, options: PyramidOptions | None = None):
        self.beta = (options or PyramidOptions()).beta

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        n = request.num_layers
        if n == 1:
            return np.array([float(request.avg_budget)])
        lowest = request.avg_budget / self.beta
        highest = 2.0 * request.avg_budget - lowest
        return np.linspace(highest, lowest, n)
