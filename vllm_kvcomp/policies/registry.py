"""The one registry of compression methods.

Every list of methods (the `--kv-compression` choices, config validation, the
per-request `kv_compression` check, the README table's test) is read from here.
Adding a method is one new module in this package with one `@register_method`
class; `vllm_kvcomp/policies/__init__.py` imports every module of the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from vllm_kvcomp.policies.base import BudgetPolicy

if TYPE_CHECKING:
    from vllm_kvcomp.config import CompressionConfig

#: Stock vLLM: the only method without a policy (nothing is evicted).
NO_COMPRESSION = "none"

_METHODS: dict[str, type[BudgetPolicy]] = {}

P = TypeVar("P", bound=type[BudgetPolicy])


def register_method(cls: P) -> P:
    """Class decorator: make `cls.name` a method of `--kv-compression`."""
    if not cls.name or cls.name == NO_COMPRESSION:
        raise ValueError(f"{cls.__name__}: a method needs a name other than {NO_COMPRESSION!r}")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice ({_METHODS[cls.name].__name__}, {cls.__name__})")
    if not cls.summary or not cls.source:
        raise ValueError(f"{cls.__name__}: set `summary` and `source` (they are the README's methods table)")
    _METHODS[cls.name] = cls
    return cls


def policy_classes() -> dict[str, type[BudgetPolicy]]:
    """name -> policy class, in registration order."""
    _load_all()
    return dict(_METHODS)


def method_names() -> tuple[str, ...]:
    """Every value `--kv-compression` accepts, "none" first."""
    return (NO_COMPRESSION, *policy_classes())


def make_policy(config: CompressionConfig) -> BudgetPolicy:
    """The policy of `config.method`, built from the config's options."""
    cls = policy_classes().get(config.method)
    if cls is None:
        raise ValueError(f"no budget policy for method {config.method!r}")
    return cls.from_config(config)


def _load_all() -> None:
    # Importing the package imports every method module (and so registers it).
    import vllm_kvcomp.policies  # noqa: F401


def methods_markdown() -> str:
    """README's methods table, from the registry (tests/policies/test_registry.py compares them)."""
    lines = [
        "| `--kv-compression` | per-layer budgets B_l (sum = L * B_avg) | source |",
        "| --- | --- | --- |",
        f"| `{NO_COMPRESSION}` | stock vLLM (the plugin only adds its flags) | |",
    ]
    lines += [f"| `{name}` | {cls.summary} | {cls.source} |" for name, cls in policy_classes().items()]
    return "\n".join(lines)
