"""The plugin as vLLM loads it: entry point, flags, help text, refusals (CPU, real vLLM classes)."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

import vllm_kvcomp
from vllm_kvcomp.config import CompressionConfigError, build_config, method_names

vllm_kvcomp.register()


@pytest.fixture
def cpu_platform(monkeypatch):
    """vLLM needs a platform to build its parser; this machine has no GPU."""
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    monkeypatch.setattr(platforms, "_current_platform", CpuPlatform())


def serve_parser():
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "kvcomp"]
    assert ep.value == "vllm_kvcomp:register"


def test_register_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs

    wrapped = EngineArgs.create_engine_config
    vllm_kvcomp.register()
    from vllm_kvcomp import vllm_adapter

    vllm_adapter.install()  # a second install (another process re-imports) must not double-wrap
    assert EngineArgs.create_engine_config is wrapped


def test_version_check_names_both_versions(monkeypatch):
    import vllm

    from vllm_kvcomp.vllm_adapter import check_vllm_version

    monkeypatch.setattr(vllm, "__version__", "0.26.0")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.25\.1 only, found vLLM 0\.26\.0"):
        check_vllm_version()


def test_flags_reach_additional_config(cpu_platform, tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    cfg = tmp_path / "c.yaml"
    cfg.write_text("window: 16\nzigzag: {tau: 0.8}\n")
    args = serve_parser().parse_args(
        ["--model", "m", "--kv-compression", "zigzag", "--kv-budget", "0.3", "--kv-compression-config", str(cfg)]
    )
    engine_args = AsyncEngineArgs.from_cli_args(args)
    stored = engine_args.additional_config["kv_compression"]
    assert stored["method"] == "zigzag" and stored["budget"] == 0.3
    assert stored["window"] == 16 and stored["zigzag"]["tau"] == 0.8


def test_no_flags_leave_vllm_untouched(cpu_platform):
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(serve_parser().parse_args(["--model", "m"]))
    assert "kv_compression" not in (engine_args.additional_config or {})


def test_unknown_method_is_an_argparse_error(cpu_platform, capsys):
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--model", "m", "--kv-compression", "h2o"])
    assert "invalid choice: 'h2o'" in capsys.readouterr().err


def test_bad_budget_fails_at_parse_time(cpu_platform):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = serve_parser().parse_args(["--model", "m", "--kv-compression", "uniform", "--kv-budget", "1.7"])
    with pytest.raises(CompressionConfigError, match="budget"):
        AsyncEngineArgs.from_cli_args(args)


def test_serve_help_lists_the_flags():
    # `vllm serve --help` as a user runs it; the platform is forced to CPU here.
    code = (
        "import sys, vllm.platforms as p; from vllm.platforms.cpu import CpuPlatform; "
        "p._current_platform = CpuPlatform(); from vllm.entrypoints.cli.main import main; "
        "sys.argv = ['vllm', 'serve', '--help']; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert "--kv-compression METHOD" in out and "--kv-budget" in out and "--kv-compression-config" in out
    code_group = code.replace("'--help'", "'--help=KVCompression'")
    out = subprocess.run([sys.executable, "-c", code_group], capture_output=True, text=True, timeout=300).stdout
    assert "{" + ",".join(method_names()) + "}" in out  # the registry's methods
    assert "profile: ZigZagKV Eq. 6, uncertainty measured offline" in " ".join(out.split())


def engine_args(**kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model="m", additional_config={"kv_compression": {"method": "zigzag"}}, **kwargs)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"enable_prefix_caching": True}, "--enable-prefix-caching"),
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative decoding"),
        ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype fp8"),
        ({"pipeline_parallel_size": 2}, "--pipeline-parallel-size"),
        ({"data_parallel_size": 2}, "--data-parallel-size"),
        ({"worker_cls": "my.Worker"}, "--worker-cls"),
        ({"scheduler_cls": "my.Scheduler"}, "--scheduler-cls"),
        ({"block_size": 8}, "--block-size 8"),
        ({"attention_backend": "FLASHINFER"}, "--attention-backend FLASHINFER"),
    ],
)
def test_conflicting_options_are_refused_before_startup(kwargs, flag):
    args = engine_args(**kwargs)
    if "attention_backend" in kwargs:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        args.attention_backend = AttentionBackendEnum[kwargs["attention_backend"]]
    with pytest.raises(CompressionConfigError) as info:
        args.create_engine_config()
    message = str(info.value)
    assert flag in message and "\n" not in message and ": " in message


def test_kv_connector_is_refused():
    from vllm.config import KVTransferConfig

    args = engine_args(kv_transfer_config=KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both"))
    with pytest.raises(CompressionConfigError, match="KV connector"):
        args.create_engine_config()


def test_prefix_caching_is_switched_off_with_a_log_line(caplog):
    from vllm_kvcomp.engine.requirements import prepare_engine_args

    args = engine_args()
    with caplog.at_level("INFO", logger="vllm.kvcomp"):
        prepare_engine_args(args, build_config(method="zigzag"))
    assert args.enable_prefix_caching is False
    assert "prefix caching switched off" in caplog.text
    assert args.attention_backend.name == "CUSTOM"


def fake_vllm_config(**model):
    defaults = dict(
        runner_type="generate",
        use_mla=False,
        is_encoder_decoder=False,
        is_multimodal_model=False,
        is_hybrid=False,
        is_attention_free=False,
        hf_text_config=SimpleNamespace(layer_types=None),
        get_sliding_window=lambda: None,
    )
    defaults.update(model)
    return SimpleNamespace(
        model_config=SimpleNamespace(**defaults),
        use_v2_model_runner=True,
        cache_config=SimpleNamespace(enable_prefix_caching=False, cache_dtype="auto", block_size=16),
    )


@pytest.mark.parametrize(
    "model, needle",
    [
        ({"use_mla": True}, "MLA"),
        ({"get_sliding_window": lambda: 4096}, "sliding-window"),
        ({"hf_text_config": SimpleNamespace(layer_types=["full_attention", "sliding_attention"])}, "sliding-window"),
        ({"is_hybrid": True}, "hybrid"),
        ({"runner_type": "pooling"}, "--runner pooling"),
        ({"is_multimodal_model": True}, "multimodal"),
    ],
)
def test_unsupported_models_are_refused(model, needle):
    from vllm_kvcomp.engine.requirements import check_vllm_config

    with pytest.raises(CompressionConfigError, match=needle):
        check_vllm_config(fake_vllm_config(**model), build_config(method="zigzag"))


def test_v1_runner_and_small_recent_window_are_refused():
    from vllm_kvcomp.engine.requirements import check_vllm_config

    config = fake_vllm_config()
    config.use_v2_model_runner = False
    with pytest.raises(CompressionConfigError, match="V2 GPU model runner"):
        check_vllm_config(config, build_config(method="zigzag"))
    config = fake_vllm_config()
    config.cache_config.block_size = 32
    with pytest.raises(CompressionConfigError, match=r"num_recent \(16\) must be >= the KV block size \(32\)"):
        check_vllm_config(config, build_config(method="zigzag", overrides={"num_recent": 16, "window": 8}))


def test_check_config_command(tmp_path, capsys):
    from vllm_kvcomp.cli import main

    assert main(["check-config", "configs/zigzag.yaml", "--kv-budget", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "method: zigzag" in out and "budget: 0.3" in out and "tau: 0.9" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: zigzag\nwindow: 0\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "window" in err and "\n" not in err


def test_eval_and_bench_point_to_the_checkout_tooling(capsys):
    """The benchmarks and the evaluation left the package: one line naming the new command, exit 2."""
    from vllm_kvcomp.cli import main

    assert main(["eval", "--backend", "hf", "--model", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert "python -m evaluation" in err and "\n" not in err
    assert main(["bench", "throughput", "--runs", "stock"]) == 2
    assert "python -m bench.throughput" in capsys.readouterr().err


def test_evict_every_must_be_a_multiple_of_the_block_size():
    """Decode-time eviction (issue #12) runs at the prefill's offset in its block: whole blocks apart."""
    from vllm_kvcomp.engine.requirements import check_vllm_config

    check_vllm_config(fake_vllm_config(), build_config(method="zigzag", overrides={"evict_every": 128}))
    config = build_config(method="zigzag", overrides={"evict_every": 40})
    with pytest.raises(
        CompressionConfigError, match=r"evict_every \(40\) must be a multiple of the KV block size \(16\)"
    ):
        check_vllm_config(fake_vllm_config(), config)
    with pytest.raises(CompressionConfigError, match=r"evict_every \(8\)|greater than or equal to 16"):
        build_config(method="zigzag", overrides={"evict_every": 8})
    with pytest.raises(CompressionConfigError, match=r"evict_every \(32\) must be >= decode_window \(64\)"):
        build_config(method="zigzag", overrides={"evict_every": 32, "decode_window": 64})
