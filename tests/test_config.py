"""The compression config: defaults, precedence and one-line errors."""

import textwrap

import pytest
from config_errors import config_error

from vllm_kvcomp.config import (
    CompressionConfig,
    CompressionConfigError,
    build_config,
    from_additional_config,
    method_names,
    packaged_defaults,
)
from vllm_kvcomp.policies import policy_classes


# every registered method but profile (it needs calibrated weights) runs from its packaged YAML alone
@pytest.mark.parametrize("method", [m for m in method_names()[1:] if m != "profile"])
def test_packaged_yaml_is_the_documented_default(method):
    config = build_config(method=method)
    assert config.method == method
    assert config.budget == 0.2
    assert (config.window, config.pool_kernel, config.num_sinks, config.num_recent) == (32, 7, 4, 64)
    # every key of the YAML is a shared option or a registered method's section
    assert set(packaged_defaults(method)) <= set(CompressionConfig.model_fields) | set(policy_classes())


@pytest.mark.parametrize("method", method_names())
def test_every_method_has_a_packaged_yaml(method):
    assert packaged_defaults(method)["method"] == method


def test_method_specific_defaults_cite_the_papers():
    assert build_config(method="zigzag").zigzag.tau == 0.9
    assert build_config(method="pyramid").pyramid.beta == 20
    assert build_config(method="simlayer").simlayer.threshold == 0.9


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent("""
        method: pyramid
        budget: 0.5
        window: 16
        zigzag: {tau: 0.8}
    """)
    )
    from_yaml = build_config(config_path=path)
    assert (from_yaml.method, from_yaml.budget, from_yaml.window) == ("pyramid", 0.5, 16)
    flags = build_config(method="zigzag", budget="2048", config_path=path)
    assert (flags.method, flags.budget, flags.window, flags.zigzag.tau) == ("zigzag", 2048, 16, 0.8)
    assert flags.is_absolute_budget


def test_unknown_method_is_one_line():
    msg = config_error(method="h2o")
    assert "unknown method 'h2o'" in msg and "zigzag" in msg


@pytest.mark.parametrize("budget", ["0", "-0.1", "1.5", "nan", "abc"])
def test_bad_budget_names_the_field_and_range(budget):
    msg = config_error(method="zigzag", budget=budget)
    assert "budget" in msg
    assert "(0, 1]" in msg


def test_budget_without_method_is_refused():
    msg = config_error(budget="0.2")
    assert "--kv-budget" in msg and "--kv-compression" in msg


def test_window_larger_than_recent_is_refused():
    msg = config_error(method="uniform", overrides={"window": 128, "num_recent": 64})
    assert "window" in msg and "num_recent" in msg


def test_absolute_budget_below_protected_tokens_is_refused():
    msg = config_error(method="uniform", budget="32")
    assert "budget" in msg and "num_sinks + num_recent" in msg


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"pool_kernel": 4}, "pool_kernel"),
        ({"pool_type": "median"}, "pool_type"),
        ({"zigzag": {"tau": 1.5}}, "zigzag.tau"),
        ({"typo_option": 1}, "typo_option"),
        ({"granularity": "block"}, "granularity"),
    ],
)
def test_bad_options_name_the_field(overrides, field):
    msg = config_error(method="zigzag", overrides=overrides)
    assert field in msg


def test_missing_and_invalid_yaml(tmp_path):
    assert "no such file" in config_error(config_path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    assert "mapping" in config_error(config_path=bad)


def test_additional_config_forms():
    assert not from_additional_config(None).enabled
    assert not from_additional_config({"other": 1}).enabled
    flat = from_additional_config({"kv_compression": "zigzag", "kv_budget": 0.3})
    nested = from_additional_config({"kv_compression": {"method": "zigzag", "budget": 0.3}})
    assert flat == nested
    assert flat.method == "zigzag" and flat.budget == 0.3
    # the stored form round-trips
    assert from_additional_config({"kv_compression": nested.model_dump()}) == nested


def test_average_budget_fraction_and_tokens():
    frac = build_config(method="uniform", budget="0.25")
    assert frac.average_budget(1000) == 250
    assert frac.average_budget(100) == 68  # never below sinks + recent
    assert not frac.should_compress(60)  # budget would keep everything
    tokens = build_config(method="uniform", budget="512")
    assert tokens.average_budget(10_000) == 512
    assert tokens.average_budget(300) == 300
    assert tokens.should_compress(10_000) and not tokens.should_compress(512)


def test_additional_config_accepts_a_config_object():
    config = build_config(method="pyramid", budget="0.3")
    assert from_additional_config({"kv_compression": config}) is config


# --- per-request overrides (SamplingParams.extra_args / OpenAI vllm_xargs) --------------


def test_request_config_overrides_method_and_budget_only():
    from vllm_kvcomp.config import request_config

    server = build_config(method="zigzag", budget="0.2", overrides={"window": 16})
    assert request_config(server, None) is server
    assert request_config(server, {"unrelated": 1}) is server
    cfg = request_config(server, {"kv_compression": "uniform", "kv_budget": "0.5"})
    assert (cfg.method, cfg.budget, cfg.window) == ("uniform", 0.5, 16)
    assert request_config(server, {"kv_budget": 2048}).budget == 2048
    assert not request_config(server, {"kv_compression": "none"}).enabled


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"kv_compression": "snapkv"}, "unknown method 'snapkv'"),
        ({"kv_budget": "lots"}, "kv_budget (request)"),
        ({"kv_budget": 1.5}, "budget"),
        ({"kv_budget": 0}, "budget"),
        ({"kv_budget": 10}, "at least 68 tokens per layer"),
    ],
)
def test_request_config_rejects_bad_values(extra, message):
    from vllm_kvcomp.config import request_config

    server = build_config(method="zigzag", budget="0.2")
    with pytest.raises(CompressionConfigError) as err:
        request_config(server, extra)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_request_cannot_turn_compression_on():
    from vllm_kvcomp.config import CompressionConfig, request_config

    stock = CompressionConfig()
    assert not request_config(stock, {"kv_compression": "none"}).enabled
    for extra in ({"kv_compression": "uniform"}, {"kv_budget": 0.2}):
        with pytest.raises(CompressionConfigError, match="started without --kv-compression"):
            request_config(stock, extra)


def test_request_evict_every_overrides_the_cadence_or_turns_it_off():
    from vllm_kvcomp.config import request_config

    server = build_config(method="uniform", overrides={"evict_every": 128, "decode_window": 16})
    assert request_config(server, {"kv_evict_every": 256}, block_size=16).evict_every == 256
    assert request_config(server, {"kv_evict_every": " 64 "}, block_size=32).evict_every == 64  # form fields
    assert request_config(server, {"kv_evict_every": 48}).evict_every == 48  # block size unknown: not checked
    for off in ("off", "OFF", None):
        assert request_config(server, {"kv_evict_every": off}).evict_every is None
    cfg = request_config(server, {"kv_budget": 512, "kv_evict_every": 32})
    assert (cfg.budget, cfg.evict_every, cfg.decode_window) == (512, 32, 16)
    plain = build_config(method="uniform")  # no evict_every: "off" is what it does anyway
    assert request_config(plain, {"kv_evict_every": "off"}).evict_every is None


@pytest.mark.parametrize(
    "extra, server_overrides, message",
    [
        ({"kv_evict_every": 40}, {}, "multiple of the KV block size (16), got 40"),
        ({"kv_evict_every": 8}, {}, "from decode_window (16) to 1048576, got 8"),
        ({"kv_evict_every": 1 << 21}, {}, "to 1048576, got 2097152"),
        ({"kv_evict_every": True}, {}, 'expected an integer token count or "off", got True'),
        ({"kv_evict_every": 64.0}, {}, "expected an integer token count"),
        ({"kv_evict_every": "sometimes"}, {}, "got 'sometimes'"),
        ({"kv_evict_every": [64]}, {}, "expected an integer"),
        ({"kv_evict_every": 64}, {"evict_every": None}, "decode-time eviction needs evict_every set"),
        ({"kv_evict_every": "off"}, {"request_overrides": "budget"}, "does not let requests turn decode-time"),
        ({"kv_evict_every": 64}, {"request_overrides": "deny"}, "does not accept per-request"),
        ({"kv_evict_evry": 64}, {}, "kv_evict_evry (request): unknown key; per-request keys are kv_compression"),
    ],
)
def test_request_evict_every_refusals(extra, server_overrides, message):
    from vllm_kvcomp.config import request_config

    server = build_config(method="uniform", overrides={"evict_every": 128, **server_overrides})
    with pytest.raises(CompressionConfigError) as err:
        request_config(server, extra, block_size=16)
    assert message in str(err.value) and str(err.value).startswith(next(iter(extra)) + " (request): ")
    assert "\n" not in str(err.value)


def test_request_evict_every_under_the_budget_policy_may_change_the_cadence():
    from vllm_kvcomp.config import request_config

    server = build_config(method="uniform", overrides={"evict_every": 128, "request_overrides": "budget"})
    assert request_config(server, {"kv_evict_every": 512}, block_size=16).evict_every == 512


def test_request_evict_every_needs_a_compressing_server():
    from vllm_kvcomp.config import CompressionConfig, request_config

    stock = CompressionConfig(evict_every=128)
    with pytest.raises(CompressionConfigError, match="kv_evict_every .* needs a compressing server"):
        request_config(stock, {"kv_evict_every": 64})
    assert request_config(stock, {"kv_evict_every": "off"}).evict_every is None


def test_front_end_rejects_bad_override_as_valueconfig_error():
    """The wrapped InputProcessor validation: a ValueError is vLLM's HTTP 400."""
    from types import SimpleNamespace

    from vllm.sampling_params import SamplingParams

    from vllm_kvcomp import vllm_adapter

    vllm_adapter.install()
    from vllm.v1.engine.input_processor import InputProcessor

    assert getattr(InputProcessor, "_vllm_kvcomp_wrapped", False)
    vllm_config = SimpleNamespace(additional_config={"kv_compression": {"method": "uniform", "budget": 0.2}})
    vllm_adapter.validate_request(vllm_config, SamplingParams(extra_args={"kv_budget": 0.5}))
    with pytest.raises(ValueError, match=r"kv_budget \(request\): a token count must be an integer"):
        vllm_adapter.validate_request(vllm_config, SamplingParams(extra_args={"kv_budget": 3.5}))
    stock = SimpleNamespace(additional_config={})
    with pytest.raises(ValueError, match="started without"):
        vllm_adapter.validate_request(stock, SamplingParams(extra_args={"kv_compression": "zigzag"}))
