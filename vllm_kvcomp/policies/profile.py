"""Static per-layer budgets from a calibration profile (`vllm-kvcomp calibrate`).

ZigZagKV's Eq. 6 with the layer uncertainty measured offline instead of per
request: w = layer_weights / sum(layer_weights) and
B_l = B_min + (B_avg - B_min) * L * w_l, with B_min = min_budget_ratio * B_avg
(raised to the floor). The budgets sum to L * B_avg by construction; `allocate`
makes them integers in [floor, P]. No observation statistics are read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field, field_validator

from vllm_kvcomp.errors import CompressionConfigError
from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest, MethodOptions
from vllm_kvcomp.policies.registry import register_method

if TYPE_CHECKING:
    from vllm_kvcomp.config import CompressionConfig

PROFILE_MISSING = (
    "method profile needs profile.layer_weights (one weight per model layer): run "
    "`vllm-kvcomp calibrate MODEL_DIR` and pass the YAML it writes with --kv-compression-config"
)


class ProfileOptions(MethodOptions):
    # Only the ratios matter; calibrate writes them with mean 1.0 (1.0 = an
    # average layer, 1.5 = half again as much of the flexible share).
    layer_weights: list[float] | None = None
    # B_min = min_budget_ratio * B_avg, as for zigzag.
    min_budget_ratio: float = Field(0.2, ge=0.0, le=1.0)
    # Informational: the model the profile was calibrated on, and the command.
    model: str | None = None
    source: str | None = None

    @field_validator("layer_weights")
    @classmethod
    def _weights(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must hold one weight per model layer, got an empty list")
        for layer, weight in enumerate(value):
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weights must be finite and >= 0, got {weight} for layer {layer}")
        if sum(value) <= 0:
            raise ValueError("at least one weight must be > 0")
        return value

    def normalized_weights(self) -> list[float]:
        """The weights scaled to sum 1 (the u_l of ZigZagKV's Eq. 6)."""
        if self.layer_weights is None:
            raise CompressionConfigError(PROFILE_MISSING)
        total = float(sum(self.layer_weights))
        return [w / total for w in self.layer_weights]

    def check_num_layers(self, num_layers: int) -> None:
        """Refuse weights measured on a model with another number of layers."""
        if self.layer_weights is not None and len(self.layer_weights) != num_layers:
            calibrated = f" ({self.model})" if self.model else ""
            raise CompressionConfigError(
                f"kv-compression config: profile.layer_weights: the profile was calibrated for "
                f"{len(self.layer_weights)} layers{calibrated} and the model has {num_layers}; "
                "run `vllm-kvcomp calibrate MODEL_DIR` for this model"
            )


@register_method
class ProfilePolicy(BudgetPolicy):
    name = "profile"
    Options = ProfileOptions
    summary = "B_l = B_min + (B_avg - B_min) L w_l, w from `vllm-kvcomp calibrate` (static)"
    source = "ZigZagKV Eq. 6, uncertainty measured offline"

    @classmethod
    def check_config(cls, config: CompressionConfig) -> None:
        if config.section(cls.name).layer_weights is None:
            raise ValueError(PROFILE_MISSING)

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
