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
from vllm_kvcomp.policies import BudgetPolicy, BudgetRequest, LayerStats, make_policy, policy_classes


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


def options_key(config: CompressionConfig) -> str:
    """The option section of the config's method, as text ("" for a method without options).

    With the method, it is what a policy is built from: a request's preset changes the
    section; every other field a policy reads (e.g. num_sinks) is the server's.
    """
    cls = policy_classes().get(config.method)
    return config.section(config.method).model_dump_json() if cls is not None and cls.Options else ""


class PolicyCache:
    """One policy object per method and option section (per-request overrides and presets switch them)."""

    def __init__(self) -> None:
        # method -> options_key -> policy
        self._policies: dict[str, dict[str, BudgetPolicy]] = {}

    def policy_for(self, config: CompressionConfig) -> BudgetPolicy:
        by_options = self._policies.setdefault(config.method, {})
        key = options_key(config)
        policy = by_options.get(key)
        if policy is None:
            policy = by_options[key] = make_policy(config)
        return policy
