"""The eviction planner: observation statistics -> per-layer budgets -> block plan.

Pure host logic, shared by the GPU engine (engine/runtime.py) and the CPU
quality path, so both decide exactly the same way:

  stats (LayerStats, per layer)
    -> the method's budget policy (policies/): B_l per layer, sum L * B_avg
    -> engine/layout.py: whole pages per layer, blocks kept, overflow relocations
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.engine.layout import EvictionPlan, plan_eviction
from vllm_kvcomp.policies import BudgetPolicy, BudgetRequest, LayerStats, make_policy


def budget_request(
    config: CompressionConfig, stats: LayerStats | None, prompt_len: int, num_layers: int
) -> BudgetRequest:
    """What the policy sizes: L layers, B_avg tokens each on average, never below the protected tokens."""
    return BudgetRequest(
        num_layers=num_layers,
        seq_len=prompt_len,
        avg_budget=config.average_budget(prompt_len),
        floor=min(config.protected_tokens, prompt_len),
        stats=stats,
    )


def plan(
    config: CompressionConfig,
    stats: LayerStats | None,
    prompt_len: int,
    num_layers: int,
    block_size: int,
    policy: BudgetPolicy | None = None,
) -> EvictionPlan | None:
    """The block plan of one request; None when nothing can be freed.

    `policy` defaults to the config's method (pass a cached one in hot loops).
    """
    policy = policy or make_policy(config)
    budgets = policy.budgets(budget_request(config, stats, prompt_len, num_layers))
    return plan_eviction(budgets, prompt_len, block_size)


def layer_stats(mba: torch.Tensor | np.ndarray, local_mass: torch.Tensor | np.ndarray) -> LayerStats:
    """LayerStats from per-(layer, KV head) statistics [L, H]: the mean over heads."""
    mba_np = np.asarray(mba.float().cpu() if isinstance(mba, torch.Tensor) else mba, dtype=np.float64)
    local_np = np.asarray(
        local_mass.float().cpu() if isinstance(local_mass, torch.Tensor) else local_mass, dtype=np.float64
    )
    return LayerStats(mba=mba_np.mean(-1), local_mass=local_np.mean(-1))


class PolicyCache:
    """One policy object per method (per-request overrides switch methods)."""

    def __init__(self) -> None:
        self._policies: dict[str, BudgetPolicy] = {}

    def policy_for(self, config: CompressionConfig) -> BudgetPolicy:
        policy = self._policies.get(config.method)
        if policy is None:
            policy = self._policies[config.method] = make_policy(config)
        return policy
