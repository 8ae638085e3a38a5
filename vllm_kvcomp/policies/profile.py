"""Static per-layer budgets from a calibration profile (`vllm-kvcomp calibrate`).

ZigZagKV's Eq. 6 with the layer uncertainty measured offline instead of per
request: w = layer_weights / sum(layer_weights) and
B_l = B_min + (B_avg - B_min) * L * w_l, with B_min = min_budget_ratio * B_avg
(raised to the floor). The budgets sum to L * B_avg by construction; `allocate`
makes them integers in [floor, P]. No observation statistics are read.
"""

import numpy as np

from vllm_kvcomp.config import CompressionConfigError, ProfileOptions
from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest


class ProfilePolicy(BudgetPolicy):
    name = "profile"

    def __init__(self, options: ProfileOptions):
        self.weights = np.asarray(options.normalized_weights(), dtype=np.float64)
        self.min_budget_ratio = options.min_budget_ratio
        self.model = options.model

    def check_layers(self, num_layers: int) -> None:
        """Refuse a profile measured on a model with another number of layers."""
        if len(self.weights) != num_layers:
            calibrated = f" ({self.model})" if self.model else ""
            raise CompressionConfigError(
                f"kv-compression config: profile.layer_weights: the profile was calibrated for "
                f"{len(self.weights)} layers{calibrated} and the model has {num_layers}; run "
                "`vllm-kvcomp calibrate MODEL_DIR` for this model"
            )

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        self.check_layers(request.num_layers)
        n = request.num_layers
        b_avg = float(request.avg_budget)
        b_min = max(self.min_budget_ratio * b_avg, float(request.floor))
        if b_min >= b_avg:
            return np.full(n, b_avg)
        return b_min + (b_avg - b_min) * n * self.weights
