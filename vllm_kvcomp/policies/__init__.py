"""Budget policies: one small module per method, all behind `BudgetPolicy`.

Every module of this package is imported here, so each `@register_method`
class registers itself (policies/registry.py); nothing else lists the methods.
"""

import importlib
import pkgutil

from vllm_kvcomp.policies.base import BudgetPolicy, BudgetRequest, LayerStats, MethodOptions, allocate
from vllm_kvcomp.policies.registry import NO_COMPRESSION, make_policy, method_names, policy_classes, register_method

_INFRASTRUCTURE = {"base", "registry", "shaping"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "NO_COMPRESSION",
    "BudgetPolicy",
    "BudgetRequest",
    "LayerStats",
    "MethodOptions",
    "allocate",
    "make_policy",
    "method_names",
    "policy_classes",
    "register_method",
]
