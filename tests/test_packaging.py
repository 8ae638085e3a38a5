"""The built wheel holds what operators run, and only that (pyproject.toml's [tool.setuptools]).

Builds the wheel from a copy of the checkout (`python -m build --wheel --no-isolation`;
`build`, `setuptools>=69` and `wheel` come with the `test` extra) and reads its file list:
every module of the plugin, the Triton kernels as `vllm_kvcomp.kernels`, every method's
default YAML and the calibrated profiles; no top-level `kernels` package, no benchmarks or
evaluation harness (bench/, evaluation/: run from a checkout), no tests. Then the operator
tools are imported from the unpacked wheel alone, with the checkout off sys.path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# not part of any build: VCS, environments, the device bundle, build outputs, results
SKIP_TOP = {".git", ".venv", ".device", ".whl", "build", "dist", ".pytest_cache", ".hypothesis"}
SKIP_ANYWHERE = {"__pycache__", ".pytest_cache", ".hypothesis"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    rel = Path(directory).resolve().relative_to(ROOT)
    skipped = {n for n in names if n in SKIP_ANYWHERE or n.endswith(".egg-info")}
    if rel == Path("."):
        skipped |= SKIP_TOP & set(names)
    if rel == Path("bench"):
        skipped |= {"results"} & set(names)
    return skipped


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore, symlinks=True)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (path,) = (tmp / "dist").glob("vllm_kvcomp-*.whl")
    return path


@pytest.fixture(scope="module")
def names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _repo_files(folder: str, pattern: str) -> list[Path]:
    files = sorted((ROOT / folder).glob(pattern))
    assert files, f"no {folder}/{pattern} in the checkout"
    return files


def test_every_plugin_module_is_in_the_wheel(names):
    """A subpackage missing from [tool.setuptools] packages would silently be left out."""
    for path in _repo_files("vllm_kvcomp", "**/*.py"):
        if "__pycache__" not in path.parts:
            assert path.relative_to(ROOT).as_posix() in names


def test_kernels_ship_as_vllm_kvcomp_kernels_only(names):
    for path in _repo_files("kernels", "*.py"):
        assert f"vllm_kvcomp/kernels/{path.name}" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level `kernels` would shadow the PyPI package"
    # one top-level package: vllm_kvcomp (plus the wheel's own metadata)
    assert not [n for n in names if not n.startswith(("vllm_kvcomp/", "vllm_kvcomp-"))]


def test_method_defaults_and_calibrated_profiles_are_packaged(names):
    for path in _repo_files("configs", "*.yaml"):
        assert f"vllm_kvcomp/configs/{path.name}" in names
    for path in _repo_files("configs/profiles", "*.yaml"):
        assert f"vllm_kvcomp/configs/profiles/{path.name}" in names


def test_no_tooling_and_no_tests(names):
    tooling = ("bench/", "evaluation/", "vllm_kvcomp/bench/", "vllm_kvcomp/eval/", "tests/")
    assert not [n for n in names if n.startswith(tooling)]
    assert not [n for n in names if Path(n).name.startswith("test_") or Path(n).name == "conftest.py"]
    assert not [n for n in names if n.endswith((".png", ".json", ".md", ".sh"))]


def test_entry_points(wheel, names):
    (path,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(path).decode()
    assert "vllm-kvcomp = vllm_kvcomp.cli:main" in text
    assert "kvcomp = vllm_kvcomp:register" in text


def test_operator_tools_run_from_the_wheel_alone(wheel, tmp_path):
    """calibrate's sample documents and prefill, the packaged profile, and the CLI, with
    neither the checkout nor the tooling importable (only the unpacked wheel added, cwd outside the repo)."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    probe = textwrap.dedent(
        f"""
        import sys
        from importlib import resources

        import vllm_kvcomp
        from vllm_kvcomp import calibrate, cli, hf_prefill
        from vllm_kvcomp.config import build_config

        assert vllm_kvcomp.__file__.startswith({str(site)!r}), vllm_kvcomp.__file__

        class Tok:
            def __call__(self, text, add_special_tokens=False):
                return {{"input_ids": text.split()}}

            def decode(self, ids):
                return " ".join(ids)

            def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
                return "user: " + messages[0]["content"] + "\\nassistant:"

        prompts = calibrate.sample_prompts(Tok(), ["niah_text", "vt"], [300], 2)
        assert [p[0] for p in prompts] == ["niah_text", "vt"] and all(len(p[2].split()) > 250 for p in prompts)
        profiles = resources.files("vllm_kvcomp.configs").joinpath("profiles")
        for profile in profiles.iterdir():
            if profile.name.endswith(".yaml"):
                with resources.as_file(profile) as path:
                    assert build_config(config_path=path).method == "profile"
        assert cli.main(["eval"]) == 2 and cli.main(["bench", "throughput"]) == 2
        for name in ("evaluation", "bench", "kernels"):
            assert name not in sys.modules, name
        print("OPERATOR TOOLS OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        timeout=300,
    )
    assert "OPERATOR TOOLS OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
