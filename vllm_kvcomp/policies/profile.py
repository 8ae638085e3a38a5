"""Static per-layer budgets from a calibration profile (`vllm-kvcomp calibrate`).

ZigZagKV's Eq. 6 with the layer uncertainty measured offline instead of per
request: w = layer_weights / sum(layer_weights) and
B_l = B_min + (B_avg - B_min) * L * w_l, with B_min = min_budget_ratio * B_avg
(raised to the floor). The budgets sum to L * B_avg by construction; `allocate`
makes them integers in [floor, P]. No observation statistics are read.
"""

import numpy as np

from vllm_kvcomp.config import ProfileOptions
from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest


class ProfilePolicy(BudgetPolicy):
    name = "profile"

    def __init__(self, options: ProfileOptions):
        self.options = options
        self.weights = np.asarray(options.normalized_weights(), dtype=np.float64)
        self.min_budget_ratio = options.min_budget_ratio

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        # CompressionConfigError (a ValueError) if the profile is for another model.
        self.options.check_num_layers(request.num_layers)
        n = request.num_layers
        b_avg = float(request.avg_budget)
        b_min = max(self.min_budget_ratio * b_avg, float(request.floor))
        if b_min >= b_avg:
            return np.full(n, b_avg)
        return b_min + (b_avg - b_min) * n * self.weights
