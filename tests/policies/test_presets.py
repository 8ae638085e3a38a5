"""Operator presets: named method + options a request selects with `kv_compression` (vllm_kvcomp/presets.py)."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from config_errors import config_error

from vllm_kvcomp import planner
from vllm_kvcomp.config import CompressionConfig, CompressionConfigError, build_config, request_config
from vllm_kvcomp.policies import LayerStats, method_names, policy_classes
from vllm_kvcomp.scoring import stats_for_policy

REPO = Path(__file__).resolve().parents[2]
CANDIDATES = REPO / "configs" / "eval" / "zigzag-candidates.yaml"
PRESETS = {
    "zz_half": {"method": "zigzag", "zigzag": {"shrink": 0.5}},
    "zz-floor": {"method": "zigzag", "zigzag": {"floor": 0.7, "min_budget_ratio": 0.1}},
    "pyr5": {"method": "pyramid", "pyramid": {"beta": 5}},
    "flat": {"method": "uniform"},
}


def server(method="zigzag", presets=None, **overrides):
    return build_config(method=method, overrides={"presets": PRESETS if presets is None else presets, **overrides})


def refused(extra, config=None) -> str:
    with pytest.raises(CompressionConfigError) as info:
        request_config(config or server(), extra)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_yaml_round_trip_and_what_a_preset_holds(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "zigzag", "presets": PRESETS}))
    config = build_config(config_path=path)
    assert config.presets["zz_half"].method == "zigzag" and config.presets["zz_half"].options == {"shrink": 0.5}
    assert config.presets["flat"].options == {}
    assert config.model_dump()["presets"] == PRESETS  # only the options given: it validates again as is
    assert build_config(overrides=config.model_dump()) == config
    assert CompressionConfig().presets == {}


def test_a_request_runs_the_presets_method_and_options_over_the_servers_section():
    base = server(budget="0.3", zigzag={"tau": 0.95, "min_budget_ratio": 0.3})
    cfg = request_config(base, {"kv_compression": "zz_half", "kv_budget": "0.1"})
    # the preset's shrink; the server's tau and ratio stay; the budget is the request's
    assert (cfg.method, cfg.budget) == ("zigzag", 0.1)
    assert (cfg.zigzag.shrink, cfg.zigzag.tau, cfg.zigzag.min_budget_ratio) == (0.5, 0.95, 0.3)
    assert request_config(base, {"kv_compression": "zz-floor"}).zigzag.min_budget_ratio == 0.1
    assert request_config(base, {"kv_compression": "zz-floor"}).budget == 0.3  # the server's budget
    pyr = request_config(base, {"kv_compression": "pyr5"})
    assert (pyr.method, pyr.pyramid.beta, pyr.zigzag) == ("pyramid", 5, base.zigzag)
    assert request_config(base, {"kv_compression": "flat"}).method == "uniform"
    # the plain method is the server's section, untouched; a request's config holds no presets
    plain = request_config(base, {"kv_compression": "zigzag"})
    assert plain.zigzag == base.zigzag and plain.presets == {} and cfg.presets == {}


def test_policy_cache_keys_on_the_options_not_only_the_method():
    base = server()
    cache = planner.PolicyCache()
    stats = LayerStats(mba=np.array([1.0, 1.0, 2.0, 12.0]), local_mass=np.zeros(4))
    plain, half = base, request_config(base, {"kv_compression": "zz_half"})
    budgets = {}
    for name, config in (("plain", plain), ("half", half)):
        policy = cache.policy_for(config)
        budgets[name] = policy.budgets(planner.budget_request(config, stats, 4000, 4)).tolist()
    # B_avg 800: Eq. 6 [160 + 640 * 4 * u] = [320, 320, 480, 2080]; halfway to uniform: [560, 560, 640, 1440]
    assert budgets == {"plain": [320, 320, 480, 2080], "half": [560, 560, 640, 1440]}
    assert cache.policy_for(half) is cache.policy_for(request_config(base, {"kv_compression": "zz_half"}))
    assert cache.policy_for(plain) is not cache.policy_for(half)
    assert cache.policy_for(request_config(base, {"kv_budget": 0.5})) is cache.policy_for(plain)  # budget: same policy


def test_stats_options_are_the_servers_only():
    """`server_only` lists exactly the options `stats_for_policy` reads: every option of every
    method is either server-only (and moves the statistics) or leaves them as they are."""
    other_value = {
        ("zigzag", "min_budget_ratio"): 0.5,
        ("zigzag", "shrink"): 0.5,
        ("zigzag", "floor"): 0.5,
        ("simlayer", "threshold"): 0.5,
        ("pyramid", "beta"): 5.0,
        ("profile", "layer_weights"): [1.0, 2.0],
        ("profile", "min_budget_ratio"): 0.5,
        ("profile", "model"): "m",
        ("profile", "source"): "s",
    }
    server_value = {("zigzag", "tau"): 0.95, ("zigzag", "mba_scope"): "prefix", ("simlayer", "recent"): 512}
    base = build_config(method="uniform")
    for method, cls in policy_classes().items():
        for field in cls.Options.model_fields if cls.Options else ():
            key = (method, field)
            assert (key in server_value) == (field in cls.Options.server_only), key
            assert key in server_value or key in other_value, f"{key}: new option, decide whether it is server-only"
            value = server_value.get(key, other_value.get(key))
            changed = build_config(method="uniform", overrides={method: {field: value}})
            assert (stats_for_policy(changed) != stats_for_policy(base)) == (key in server_value), key


@pytest.mark.parametrize(
    "section, field",
    [({"zigzag": {"tau": 0.95}}, "zigzag.tau"), ({"zigzag": {"mba_scope": "prefix"}}, "zigzag.mba_scope")],
)
def test_presets_cannot_change_the_statistics(section, field):
    msg = config_error(method="zigzag", overrides={"presets": {"p": {"method": "zigzag", **section}}})
    assert f"presets.p.{field}: cannot be set in a preset" in msg and "server" in msg
    msg = config_error(method="zigzag", overrides={"presets": {"p": {"method": "simlayer", "simlayer": {"recent": 9}}}})
    assert "presets.p.simlayer.recent: cannot be set in a preset" in msg
    # a simlayer threshold is the policy's own: a preset may set it
    assert server(presets={"p": {"method": "simlayer", "simlayer": {"threshold": 0.5}}}).presets["p"].options


@pytest.mark.parametrize(
    "presets, needle",
    [
        ({"Big": {"method": "zigzag"}}, "presets.Big: a preset name is lowercase"),
        ({"a b": {"method": "zigzag"}}, "presets.a b: a preset name"),
        ({"x" * 41: {"method": "zigzag"}}, "1-40 characters"),
        ({"zigzag": {"method": "uniform"}}, "presets.zigzag: a preset cannot be named after a method"),
        ({"none": {"method": "uniform"}}, "presets.none: a preset cannot be named after a method"),
        ({"p": {"method": "none"}}, "presets.p.method: must be one of"),
        ({"p": {"method": "snapkv"}}, "presets.p.method: must be one of"),
        ({"p": {"zigzag": {"shrink": 0.5}}}, "presets.p.method: missing"),
        ({"p": "zigzag"}, "presets.p: must be a mapping"),
        (["p"], "presets: must be a mapping"),
        ({"p": {"method": "zigzag", "budget": 0.5}}, "presets.p.budget: unknown option"),
        ({"p": {"method": "zigzag", "pyramid": {"beta": 5}}}, "presets.p.pyramid: unknown option"),
        ({"p": {"method": "zigzag", "zigzag": {"shrink": 2}}}, "presets.p.zigzag.shrink: Input should be less than"),
        ({"p": {"method": "zigzag", "zigzag": {"shrinkk": 2}}}, "presets.p.zigzag.shrinkk: unknown option"),
        ({"p": {"method": "uniform", "uniform": {"x": 1}}}, "presets.p.uniform: this method has no options"),
        ({"p": {"method": "profile"}}, "presets.p: method profile needs profile.layer_weights"),
    ],
)
def test_bad_presets_are_one_line_naming_the_preset(presets, needle):
    msg = config_error(method="zigzag", overrides={"presets": presets})
    assert needle in msg and len(msg) < 300


def test_preset_names_at_the_limits():
    name = "a" * 40
    assert name in server(presets={name: {"method": "uniform"}, "0-_9": {"method": "uniform"}}).presets
    profile = {"method": "profile", "profile": {"layer_weights": [1.0, 3.0]}}
    assert server(presets={"cal": profile}).presets["cal"].options["layer_weights"] == [1.0, 3.0]


def test_unknown_name_lists_methods_and_presets():
    msg = refused({"kv_compression": "zz_quarter"})
    assert "unknown method 'zz_quarter'" in msg and ", ".join(method_names()) in msg
    assert "presets: zz_half, zz-floor, pyr5, flat" in msg
    assert "presets" not in refused({"kv_compression": "zz_half"}, build_config(method="zigzag"))
    assert "unknown method" in refused({"kv_compression": ["zz_half"]})


def test_operator_rules_apply_to_presets():
    budget_only = server(request_overrides="budget")
    # the preset's method is the server's: allowed (the operator defined it); another method: refused
    assert request_config(budget_only, {"kv_compression": "zz_half"}).zigzag.shrink == 0.5
    assert "does not let requests change the method" in refused({"kv_compression": "pyr5"}, budget_only)
    assert "does not accept per-request" in refused({"kv_compression": "zz_half"}, server(request_overrides="deny"))
    stock = server(method="none")
    assert "started without --kv-compression" in refused({"kv_compression": "zz_half"}, stock)


def test_front_end_accepts_presets():
    from types import SimpleNamespace

    from vllm.sampling_params import SamplingParams

    from vllm_kvcomp import vllm_adapter

    vllm_config = SimpleNamespace(additional_config={"kv_compression": server("uniform").model_dump()})
    vllm_adapter.validate_request(vllm_config, SamplingParams(extra_args={"kv_compression": "zz_half"}))
    with pytest.raises(ValueError, match="unknown method 'zz_third'.*presets: zz_half"):
        vllm_adapter.validate_request(vllm_config, SamplingParams(extra_args={"kv_compression": "zz_third"}))


@pytest.mark.parametrize("method", ["uniform", "zigzag"])
def test_the_gpu_candidates_file_validates(method):
    config = build_config(method=method, config_path=CANDIDATES)
    options = {name: (p.method, p.options) for name, p in config.presets.items()}
    assert options == {
        "zigzag_shrink50": ("zigzag", {"shrink": 0.5}),
        "zigzag_shrink25": ("zigzag", {"shrink": 0.25}),
        "zigzag_floor70": ("zigzag", {"floor": 0.7}),
        "zigzag_min05": ("zigzag", {"min_budget_ratio": 0.5}),
    }
    assert config.method == method and config.zigzag == build_config(method="zigzag").zigzag  # statistics: defaults
    for name in options:
        cfg = request_config(config, {"kv_compression": name, "kv_budget": 0.1})
        assert cfg.method == "zigzag" and cfg.budget == 0.1


def test_check_config_prints_the_presets(capsys):
    from vllm_kvcomp.cli import main

    assert main(["check-config", str(CANDIDATES), "--kv-compression", "uniform"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["presets"]["zigzag_floor70"] == {"method": "zigzag", "zigzag": {"floor": 0.7}}
