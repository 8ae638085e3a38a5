"""bench/device/quality.sh's arguments and bench/device/qwen_from_gguf.py's joining (no GPU, no model)."""

import hashlib
import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from evaluation.__main__ import parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench/device/quality.sh"


def _quality_sh(*args, **env):
    """bench/device/quality.sh ARGS, a dry run unless env says DRY_RUN=0."""
    full_env = {**os.environ, "DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True)


def _evaluate_args(stdout: str):
    line = next(x for x in stdout.splitlines() if x.startswith("evaluate: "))
    argv = shlex.split(line.removeprefix("evaluate: "))
    assert argv[:4] == ["python3", "-P", "-m", "evaluation"]
    return parser().parse_args(argv[4:])


def test_quality_sh_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_quality_sh_runs_issue_13s_protocol():
    done = _quality_sh("qwen05", "uniform,zigzag,zigzag_shrink50")
    assert done.returncode == 0, done.stderr
    args = _evaluate_args(done.stdout)
    assert args.backend == "vllm" and args.protocols == ["aware"] and args.model == "/tmp/qwen05-hf"
    assert args.tasks == ["niah_noise", "niah_text", "niah_multikey", "vt"]
    assert args.lengths == [4096, 8192, 16384, 24576] and args.budgets == [0.5, 0.2, 0.1, 0.05]
    prompts = len(args.tasks) * len(args.lengths) * len(args.depths) * args.per_cell
    assert prompts == 240, "at least 200 prompts per model"
    assert args.methods == ["uniform", "zigzag", "zigzag_shrink50"] and args.name == "quality_qwen05"
    assert args.gpu_memory_utilization == 0.45 and args.resume
    candidates = ROOT / "configs/eval/zigzag-candidates.yaml"
    assert args.kv_compression_config == (str(candidates) if candidates.exists() else None)
    assert "qwen_from_gguf.py qwen05 --parts /tmp/q/qwen05 --tok" in done.stdout


def test_quality_sh_environment_overrides():
    done = _quality_sh("qwen15", GPU_MEM="0.3", LENGTHS="24576", RESUME="0", RESULTS="/tmp/r", EAGER="1")
    args = _evaluate_args(done.stdout)
    assert args.gpu_memory_utilization == 0.3 and args.lengths == [24576] and not args.resume and args.enforce_eager
    assert args.methods == ["uniform", "zigzag"] and args.out == "/tmp/r" and args.name == "quality_qwen15"
    assert args.model_name.startswith("Qwen2.5-Coder-1.5B-Instruct")
    missing = _quality_sh("qwen05", CONFIG="configs/eval/absent.yaml")
    assert _evaluate_args(missing.stdout).kv_compression_config is None and "no " in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [((), "unknown model key"), (("qwen7",), "unknown model key"), (("qwen05", "a;b"), "bad METHODS")],
)
def test_quality_sh_refuses_bad_arguments(args, message):
    done = _quality_sh(*args)
    assert done.returncode == 2 and message in done.stderr and "Usage" in done.stderr


def _converter():
    spec = importlib.util.spec_from_file_location("qwen_from_gguf", ROOT / "bench/device/qwen_from_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parts(tmp_path, data: bytes, digest: str | None = None):
    parts = tmp_path / "q"
    parts.mkdir()
    for i in range(0, len(data), 1000):
        (parts / f"gguf.part{i // 1000:02d}").write_bytes(data[i : i + 1000])
    (parts / "gguf.sha256").write_text(f"{digest or hashlib.sha256(data).hexdigest()}  model.gguf\n")
    return parts


def test_gguf_parts_are_joined_in_order_and_checked(tmp_path):
    conv = _converter()
    data = os.urandom(3500)
    parts = _parts(tmp_path, data)
    assert conv.join_parts(parts).read_bytes() == data
    (parts / "gguf.part00").write_bytes(b"x" * 1000)  # the joined file is reused while its hash matches
    assert conv.join_parts(parts).read_bytes() == data


def test_gguf_hash_mismatch_stops(tmp_path):
    conv = _converter()
    parts = _parts(tmp_path, os.urandom(2500), digest="0" * 64)
    with pytest.raises(SystemExit, match="sha256 mismatch from 3 parts"):
        conv.join_parts(parts)


def test_a_converted_folder_is_not_converted_again(tmp_path, capsys, monkeypatch):
    conv = _converter()
    out = tmp_path / "qwen05-hf"
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (out / name).write_text("{}")
    monkeypatch.setattr(conv, "convert", lambda *a: pytest.fail("converted again"))
    assert conv.main(["qwen05", "--out", str(out), "--parts", str(tmp_path / "absent")]) == 0
    assert capsys.readouterr().out.strip() == str(out)


def _paths(tmp_path):
    names = ("OUT", "RESULTS", "LOGS", "STATE", "TOOLS")
    env = {name: str(tmp_path / name.lower()) for name in names}
    return {**env, "KVC": str(tmp_path / "no-plugin"), "DRY_RUN": "0"}


def test_quality_sh_needs_the_installed_plugin(tmp_path):
    done = _quality_sh("qwen05", **_paths(tmp_path))
    assert done.returncode == 3 and "session.sh install" in done.stdout


def test_quality_sh_detached_run_and_status(tmp_path):
    """DETACH=1 returns at once; the run goes on in its own session; `status` reports and packs."""
    env = _paths(tmp_path)
    started = _quality_sh("qwen05", "uniform", DETACH="1", **env)
    assert started.returncode == 0 and "started in the background" in started.stdout
    status = _quality_sh("status", "qwen05", WAIT="20", **env)
    assert status.returncode == 0 and "quality_qwen05 not running" in status.stdout
    assert "no plugin in" in status.stdout, "the background run's log is shown"
    listing = subprocess.run(["tar", "tzf", f"{env['OUT']}/quality_qwen05.tgz"], capture_output=True, text=True)
    assert "quality_qwen05/quality_qwen05.driver.log" in listing.stdout
