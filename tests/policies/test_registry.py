"""The method registry drives every list of methods (CLI, config, requests, README)."""

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
from config_errors import config_error
from pydantic import Field

from vllm_kvcomp.config import CompressionConfigError, build_config, method_names, request_config
from vllm_kvcomp.policies import (
    BudgetPolicy,
    BudgetRequest,
    MethodOptions,
    make_policy,
    policy_classes,
    register_method,
    registry,
)
from vllm_kvcomp.policies.registry import methods_markdown
from vllm_kvcomp.vllm_adapter import add_compression_args

README = Path(__file__).resolve().parents[2] / "README.md"


class _HalfOptions(MethodOptions):
    share: float = Field(0.5, gt=0.0, lt=1.0)


class _FrontLoaded(BudgetPolicy):
    """A method defined only here: first half of the layers gets `share` of the total."""

    name = "frontloaded"
    Options = _HalfOptions
    summary = "first half of the layers keeps `share` of the total"
    source = "a test"

    def __init__(self, options: _HalfOptions):
        self.share = options.share

    def raw_budgets(self, request: BudgetRequest) -> np.ndarray:
        half = request.num_layers // 2
        front = request.total * self.share / half
        back = request.total * (1 - self.share) / (request.num_layers - half)
        return np.array([front] * half + [back] * (request.num_layers - half))


@pytest.fixture
def new_method():
    register_method(_FrontLoaded)
    yield _FrontLoaded
    registry._METHODS.pop(_FrontLoaded.name)


def test_one_class_adds_a_method_everywhere(new_method):
    """Registering one class is all a new method needs: flags, config section, requests, policy."""
    assert "frontloaded" in method_names()
    parser = add_compression_args(argparse.ArgumentParser())
    assert parser.parse_args(["--kv-compression", "frontloaded"]).kv_compression == "frontloaded"
    config = build_config(method="frontloaded", overrides={"frontloaded": {"share": 0.75}})
    assert config.window == 32  # shared options: the config model's defaults (no YAML for this method)
    assert config.section("frontloaded").share == 0.75
    assert "frontloaded.share" in config_error(method="uniform", overrides={"frontloaded": {"share": 2}})
    assert request_config(build_config(method="uniform"), {"kv_compression": "frontloaded"}).method == "frontloaded"
    budgets = make_policy(config).budgets(BudgetRequest(num_layers=4, seq_len=1000, avg_budget=100, floor=10))
    assert budgets.sum() == 400 and budgets[0] == 150 and budgets[3] == 50


def test_unregistered_method_is_refused_everywhere():
    assert "frontloaded" not in method_names()
    with pytest.raises(SystemExit):
        add_compression_args(argparse.ArgumentParser()).parse_args(["--kv-compression", "frontloaded"])
    with pytest.raises(CompressionConfigError, match="unknown method 'frontloaded'"):
        request_config(build_config(method="uniform"), {"kv_compression": "frontloaded"})


def test_a_method_must_document_itself():
    class Undocumented(BudgetPolicy):
        name = "undocumented"

        def raw_budgets(self, request):
            return np.ones(request.num_layers)

    with pytest.raises(ValueError, match="summary"):
        register_method(Undocumented)
    assert "undocumented" not in method_names()


def test_readme_methods_table_is_the_registry():
    """README's `--kv-compression` table is generated from the registry (registry.methods_markdown)."""
    text = README.read_text()
    table = text[text.index("| `--kv-compression` |") :].split("\n\n")[0].strip()
    assert table == methods_markdown()
    assert all(f"| `{name}` |" in table for name in method_names())


def test_builtin_policies_declare_their_option_sections():
    for name, policy in policy_classes().items():
        assert policy.name == name and re.fullmatch(r"[a-z]+", name)
        if policy.Options is not None:
            assert isinstance(build_config(method="uniform").section(name), policy.Options)
