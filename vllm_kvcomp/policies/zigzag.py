"""ZigZagKV's allocation from layer uncertainty (Zhong et al. 2024, arXiv 2412.09036, Eq. 6).

Per head h of layer l, MBA = the fewest tokens holding `tau` of the head's
attention; LMBA_l = the mean over the layer's heads (`scoring.head_statistics`,
then `planner.layer_stats`). The layer uncertainty is u_l = LMBA_l / sum_l LMBA_l
and the budget, with the bounded minimum B_min = min_budget_ratio * B_avg, is

    B_l = B_min + (B_avg - B_min) * L * u_l        (Eq. 6, sums to L * B_avg)

taken literally: B_min is not raised to the engine's always-kept tokens before
the equation (the pre-#13 code did); the engine's bounds [sinks + recent, P]
are applied afterwards by `allocate`, as for every policy.
docs/ZIGZAG-FAITHFULNESS.md maps each step of the paper to the code.

Two robustness options (issue #13; not in the paper, defaults keep pure Eq. 6),
applied to Eq. 6's budgets in this order (`policies/shaping.py`):
  shrink: B_l = (1 - shrink) * B_avg + shrink * B_l   (0: uniform, 1: Eq. 6);
  floor:  no layer below floor * B_avg, the deficit taken from the layers above
          the floor in proportion to their excess over it (the sum is kept).
"""

from typing import Literal

import numpy as np
from pydantic import Field

from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest, MethodOptions
from vllm_kvcomp.policies.registry import register_method
from vllm_kvcomp.policies.shaping import raise_to_floor, shrink_to_average


class ZigZagOptions(MethodOptions):
    server_only = {
        "tau": "the MBA statistics are computed once per batch with the server's tau",
        "mba_scope": "the MBA statistics are computed once per batch with the server's mba_scope",
    }

    # MBA ("minimum budget size to maintain attention"): the fewest tokens holding
    # `tau` of a head's attention. 0.9 is the kvpress port's threshold (PR #238); the
    # paper's own value could not be re-read (only its front matter is stored here).
    tau: float = Field(0.9, gt=0.0, lt=1.0)
    # The bounded minimum of Eq. 6: B_min = min_budget_ratio * B_avg (0: Eq. 6
    # without a bound; 1: uniform). 0.2 is the kvpress port's value (0.1 in its first
    # version); the paper's own value could not be verified: measure 0.1 / 0.2 / 0.5.
    min_budget_ratio: float = Field(0.2, ge=0.0, le=1.0)
    # Which tokens the MBA counts (the paper's text available here does not say):
    #   "prompt": every prompt token, tau of each window query's whole attention
    #             (the literal reading of "maintain tau of the attention"; default);
    #   "prefix": only the tokens before the observation window, tau of their mass:
    #             SnapKV's vote (attn[..., :-window]), which ZigZagKV's token selection
    #             follows; the window itself is always kept.
    mba_scope: Literal["prompt", "prefix"] = "prompt"
    # Issue #13: Eq. 6 gives some middle layers of Qwen2.5 0.15-0.55 of B_avg and
    # loses to uniform at small budgets. `shrink` blends Eq. 6 with uniform:
    # B_l = (1 - shrink) * B_avg + shrink * Eq6_l (1: the paper, 0: uniform).
    shrink: float = Field(1.0, ge=0.0, le=1.0)
    # No layer below floor * B_avg after `shrink` (0: off, 1: uniform). Unlike
    # min_budget_ratio, which lifts every layer, it lifts only the layers below it,
    # paid by those above in proportion to their excess over the floor.
    floor: float = Field(0.0, ge=0.0, le=1.0)


@register_method
class ZigZagPolicy(BudgetPolicy):
    name = "zigzag"
    Options = ZigZagOptions
    summary = "B_l = B_min + (B_avg - B_min) L u_l, u_l = LMBA_l / sum LMBA"
    source = "ZigZagKV Eq. 6 (Zhong et al. 2024)"
    needs_stats = True

    def __init__(self, options: ZigZagOptions | None = None):
        options = options or ZigZagOptions()
        self.min_budget_ratio = options.min_budget_ratio
        self.shrink = options.shrink
        self.floor = options.floor

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        assert request.stats is not None
        lmba = np.maximum(request.stats.mba.astype(np.float64), 0.0)
        n = request.num_layers
        b_avg = float(request.avg_budget)
        if lmba.sum() <= 0:  # no statistics (e.g. nothing to count): no layer is more uncertain
            return np.full(n, b_avg)
        uncertainty = lmba / lmba.sum()
        b_min = self.min_budget_ratio * b_avg
        eq6 = b_min + (b_avg - b_min) * n * uncertainty
        return raise_to_floor(shrink_to_average(eq6, b_avg, self.shrink), b_avg, self.floor)
