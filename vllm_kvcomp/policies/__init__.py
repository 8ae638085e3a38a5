"""Budget policies: one small class per method, all behind `BudgetPolicy`."""

from vllm_kvcomp.config import CompressionConfig
from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest, LayerStats, allocate
from vllm_kvcomp.policies.profile import ProfilePolicy
from vllm_kvcomp.policies.pyramid import PyramidPolicy
from vllm_kvcomp.policies.simlayer import SimLayerPolicy
from vllm_kvcomp.policies.uniform import UniformPolicy
from vllm_kvcomp.policies.zigzag import ZigZagPolicy

__all__ = [
    "BudgetPolicy",
    "BudgetRequest",
    "LayerStats",
    "allocate",
    "make_policy",
    "ProfilePolicy",
    "PyramidPolicy",
    "SimLayerPolicy",
    "UniformPolicy",
    "ZigZagPolicy",
]


def make_policy(config: CompressionConfig) -> BudgetPolicy:
    """The policy of `config.method` with its options."""
    if config.method == "uniform":
        return UniformPolicy()
    if config.method == "pyramid":
        return PyramidPolicy(config.pyramid)
    if config.method == "zigzag":
        return ZigZagPolicy(config.zigzag)
    if config.method == "simlayer":
        return SimLayerPolicy(config.simlayer, num_sinks=config.num_sinks)
    if config.method == "profile":
        return ProfilePolicy(config.profile)
    raise ValueError(f"no budget policy for method {config.method!r}")
