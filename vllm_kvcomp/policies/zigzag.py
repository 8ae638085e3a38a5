"""ZigZagKV's allocation from layer uncertainty (Zhong et al. 2024, Eq. 6).

u_l = LMBA_l / sum_l LMBA_l, and B_l = B_min + (B_avg - B_min) * L * u_l, with
B_min = min_budget_ratio * B_avg: layers whose attention is spread out (a high
minimum budget to hold tau of the mass) get more tokens. The budgets sum to
L * B_avg by construction.
"""

import numpy as np
from pydantic import Field

from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest, MethodOptions
from vllm_kvcomp.policies.registry import register_method


class ZigZagOptions(MethodOptions):
    # MBA = fewest tokens holding `tau` of a head's window attention.
    tau: float = Field(0.9, gt=0.0, lt=1.0)
    # B_min = min_budget_ratio * B_avg (the kvpress port used 0.1-0.2).
    min_budget_ratio: float = Field(0.2, ge=0.0, le=1.0)


@register_method
class ZigZagPolicy(BudgetPolicy):
    name = "zigzag"
    Options = ZigZagOptions
    summary = "B_l = B_min + (B_avg - B_min) L u_l, u_l = LMBA_l / sum LMBA"
    source = "ZigZagKV Eq. 6 (Zhong et al. 2024)"
    needs_stats = True

    def __init__(self, options: ZigZagOptions | None = None):
        self.min_budget_ratio = (options or ZigZagOptions()).min_budget_ratio

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        assert request.stats is not None
        lmba = np.maximum(request.stats.mba.astype(np.float64), 0.0)
        n = request.num_layers
        b_avg = float(request.avg_budget)
        b_min = max(self.min_budget_ratio * b_avg, float(request.floor))
        if lmba.sum() <= 0 or b_min >= b_avg:
            return np.full(n, b_avg)
        uncertainty = lmba / lmba.sum()
        return b_min + (b_avg - b_min) * n * uncertainty
