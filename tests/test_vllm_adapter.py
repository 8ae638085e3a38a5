"""vllm_adapter: startup with compression off, an unsupported vLLM, and the front end's per-request check."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

import vllm_kvcomp
from vllm_kvcomp.config import from_additional_config

vllm_kvcomp.register()


@pytest.fixture
def cpu_platform(monkeypatch):
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    monkeypatch.setattr(platforms, "_current_platform", CpuPlatform())


def serve_args(*flags):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *flags]))


@pytest.mark.parametrize(
    "flags, yaml_text",
    [
        (["--kv-compression", "none"], None),
        (["--kv-compression", "none", "--kv-budget", "0.3"], None),
        ([], "method: none\nbudget: 0.5\n"),
    ],
)
def test_compression_none_starts_stock(cpu_platform, tmp_path, flags, yaml_text):
    """`--kv-compression none` (and a YAML saying none) is stock vLLM, through the real EngineArgs."""
    if yaml_text is not None:
        path = tmp_path / "none.yaml"
        path.write_text(yaml_text)
        flags = [*flags, "--kv-compression-config", str(path)]
    engine_args = serve_args(*flags)
    # what the wrapped create_engine_config reads first (it used to raise here)
    assert not from_additional_config(engine_args.additional_config).enabled


def test_budget_without_method_is_still_refused(cpu_platform):
    from vllm_kvcomp.config import CompressionConfigError

    with pytest.raises(CompressionConfigError, match="--kv-budget was given without --kv-compression"):
        serve_args("--kv-budget", "0.3")


UNSUPPORTED = """
import sys, vllm, vllm.platforms as p
from vllm.platforms.cpu import CpuPlatform
p._current_platform = CpuPlatform()
vllm.__version__ = "0.26.0"
import vllm_kvcomp
vllm_kvcomp.register()
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.input_processor import InputProcessor
parse = lambda *a: make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *a])
AsyncEngineArgs.from_cli_args(parse())
print("plain vllm ok; request validation untouched:", not hasattr(InputProcessor, "_vllm_kvcomp_wrapped"))
try:
    AsyncEngineArgs.from_cli_args(parse("--kv-compression", "zigzag"))
except ValueError as err:
    print("refused:", err)
try:
    EngineArgs(model="m", additional_config={"kv_compression": {"method": "zigzag"}}).create_engine_config()
except ValueError as err:
    print("refused offline:", err)
"""


def test_unsupported_vllm_leaves_the_plugin_inert():
    """Another vLLM version: one warning, stock vLLM works, compression is refused with the reason."""
    done = subprocess.run([sys.executable, "-c", UNSUPPORTED], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "plain vllm ok; request validation untouched: True" in out
    assert "refused: vllm-kvcomp supports vLLM 0.25.1 only, found vLLM 0.26.0" in out
    assert "refused offline: vllm-kvcomp supports vLLM 0.25.1 only" in out
    assert "the plugin stays off" in done.stderr + out


def _vllm_config(**compression):
    from vllm_kvcomp.config import build_config

    config = build_config(method="zigzag", overrides=compression or None)
    return SimpleNamespace(
        additional_config={"kv_compression": config.model_dump()}, model_config=SimpleNamespace(max_model_len=32768)
    )


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"kv_budget": 10**30}, "integer <= 32768"),
        ({"kv_budget": 1e12}, "integer <= 32768"),
        ({"kv_budget": True}, "expected a number"),
        ({"kv_budget": 1}, "ambiguous"),  # what JSON `true` becomes in vLLM's vllm_xargs schema
        ({"kv_budget": "x" * 10_000}, "expected a fraction"),
        ({"kv_budget": float("nan")}, "finite"),
        ({"kv_budjet": 0.5}, "kv_budjet (request): unknown key"),
        ({"kv_compression": ["zigzag"]}, "unknown method"),
    ],
)
def test_front_end_refuses_bad_values_with_a_short_400(extra, needle):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from vllm_kvcomp.vllm_adapter import validate_request

    with pytest.raises(VLLMValidationError) as info:
        validate_request(_vllm_config(), SamplingParams(extra_args=extra))
    message = info.value.args[0]
    assert needle in message and "\n" not in message and len(message) < 200


def test_front_end_accepts_good_values_and_ignores_foreign_keys():
    from vllm.sampling_params import SamplingParams

    from vllm_kvcomp.vllm_adapter import validate_request

    for extra in ({"kv_budget": "0.5"}, {"kv_budget": 4096}, {"kv_compression": "none"}, {"other_plugin": 1}):
        validate_request(_vllm_config(), SamplingParams(extra_args=extra))


def test_operator_policy_bounds_what_requests_may_change():
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from vllm_kvcomp.vllm_adapter import validate_request

    def refused(config, extra):
        with pytest.raises(VLLMValidationError) as info:
            validate_request(config, SamplingParams(extra_args=extra))
        return info.value.args[0]

    budget_only = _vllm_config(request_overrides="budget", min_request_fraction=0.1, min_request_tokens=512)
    assert "does not let requests change the method" in refused(budget_only, {"kv_compression": "none"})
    assert "at least 0.1 of each prompt" in refused(budget_only, {"kv_budget": 0.05})
    assert "at least 512 tokens" in refused(budget_only, {"kv_budget": 256})
    validate_request(budget_only, SamplingParams(extra_args={"kv_budget": 0.2, "kv_compression": "zigzag"}))
    deny = _vllm_config(request_overrides="deny")
    assert "does not accept per-request" in refused(deny, {"kv_budget": 0.5})


def test_front_end_checks_a_requests_evict_every_against_the_block_size():
    """kv_evict_every must be a multiple of the KV block size the front end knows (issue #12)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from vllm_kvcomp.vllm_adapter import validate_request

    config = _vllm_config(evict_every=128)
    config.cache_config = SimpleNamespace(block_size=16)
    validate_request(config, SamplingParams(extra_args={"kv_evict_every": 256}))
    with pytest.raises(VLLMValidationError, match="kv_evict_every"):
        validate_request(config, SamplingParams(extra_args={"kv_evict_every": 40}))
