"""`python -m evaluation` for issue #13: presets by name, the engine's max_model_len, resumable runs."""

import json

import pytest

from evaluation import suite
from evaluation.__main__ import main, parser
from evaluation.vllm_backend import max_model_len

PRESETS_YAML = """
window: 16
presets:
  zz_half: {method: zigzag, zigzag: {min_budget_ratio: 0.5}}
"""


def _args(model, out, *extra, methods="uniform,zz_half", lengths="192"):
    return [
        "--backend",
        "vllm",
        "--model",
        model,
        "--tasks",
        "niah_noise",
        "--lengths",
        lengths,
        "--depths",
        "0.5",
        "--methods",
        methods,
        "--budgets",
        "0.5,0.1",
        "--protocols",
        "aware",
        "--out",
        str(out),
        "--name",
        "quality_tiny",
        *extra,
    ]


@pytest.fixture
def presets_yaml(tmp_path):
    path = tmp_path / "candidates.yaml"
    path.write_text(PRESETS_YAML)
    return str(path)


def test_a_preset_name_is_passed_through_to_the_request(tiny_model, tmp_path, fake_vllm, presets_yaml):
    rc = main(_args(tiny_model, tmp_path, "--kv-compression-config", presets_yaml))
    assert rc == 0
    extras = [p.extra_args for call in fake_vllm["calls"] for _, p in call]
    assert {"kv_compression": "zz_half", "kv_budget": 0.1} in extras
    assert {"kv_compression": "uniform", "kv_budget": 0.5} in extras and {"kv_compression": "none"} in extras
    assert fake_vllm["kwargs"]["additional_config"]["kv_compression"]["window"] == 16, "the YAML's scorer options"
    data = json.loads((tmp_path / "quality_tiny.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"none", "uniform", "zz_half"}
    assert {r["config"] for r in data["rows"] if r["method"] == "zz_half"} == {"zz_half@0.5", "zz_half@0.1"}
    assert data["presets"] == {"zz_half": {"method": "zigzag", "zigzag": {"min_budget_ratio": 0.5}}}
    assert [(p["method"], p["budget"]) for p in data["paired_vs_uniform"]] == [("zz_half", 0.5), ("zz_half", 0.1)]
    assert set(data["decision"]["methods"]) == {"zz_half"}


def test_a_preset_the_plugin_refuses_stops_before_the_engine_starts(
    tiny_model, tmp_path, fake_vllm, presets_yaml, monkeypatch, capsys
):
    monkeypatch.setattr(suite, "engine_config", lambda server, name, budget: "kv_compression (request): unknown method")
    assert main(_args(tiny_model, tmp_path, "--kv-compression-config", presets_yaml)) == 2
    assert "preset 'zz_half': the installed plugin refuses it" in capsys.readouterr().err
    assert "kwargs" not in fake_vllm


def test_unknown_names_are_refused_with_the_choices(tiny_model, tmp_path, fake_vllm, presets_yaml, capsys):
    assert main(_args(tiny_model, tmp_path, "--kv-compression-config", presets_yaml, methods="uniform,zz_typo")) == 2
    err = capsys.readouterr().err
    assert "unknown method or preset 'zz_typo'" in err and "zz_half" in err and "zigzag" in err


def test_the_plugin_resolves_the_preset_as_the_engine_will(presets_yaml):
    server, configs, presets = suite.build_configs(["uniform", "zz_half"], [0.1], presets_yaml)
    assert "zz_half" in server.presets
    config = configs["zz_half@0.1"]
    assert config.method == "zigzag" and config.budget == 0.1
    assert config.zigzag.min_budget_ratio == 0.5 and config.window == 16
    assert configs["uniform@0.1"].window == 16 and set(presets) == {"zz_half"}


def test_max_model_len_covers_the_longest_prompt_and_its_answer():
    n = max_model_len([4100, 24700, 8200], 24)
    assert n % 256 == 0 and 24700 + 24 <= n <= 24700 + 24 + 512


def test_the_engine_is_sized_from_the_prompts(tiny_model, tmp_path, fake_vllm):
    assert main(_args(tiny_model, tmp_path, methods="uniform", lengths="192,320")) == 0
    longest = max(len(p["prompt_token_ids"]) for call in fake_vllm["calls"] for p, _ in call)
    assert longest + 24 <= fake_vllm["kwargs"]["max_model_len"] <= longest + 24 + 512
    assert [len(c) for c in fake_vllm["calls"]] == [3, 3], "one batch per length: none + uniform x 2 budgets"


def test_a_stopped_run_keeps_finished_lengths_and_resume_runs_only_the_rest(tiny_model, tmp_path, fake_vllm):
    fake_vllm["fail_on_call"] = 1  # the engine dies on the second length
    with pytest.raises(RuntimeError):
        main(_args(tiny_model, tmp_path, methods="uniform", lengths="192,320"))
    saved = json.loads((tmp_path / "quality_tiny.json").read_text())
    assert {r["context_len"] for r in saved["rows"]} == {192} and len(saved["rows"]) == 3
    fake_vllm["fail_on_call"] = None
    fake_vllm["calls"].clear()
    assert main(_args(tiny_model, tmp_path, "--resume", methods="uniform", lengths="192,320")) == 0
    assert [len(c) for c in fake_vllm["calls"]] == [3], "only the 320-token prompt's requests"
    data = json.loads((tmp_path / "quality_tiny.json").read_text())
    assert sorted(r["context_len"] for r in data["rows"]) == [192] * 3 + [320] * 3
    assert len(data["runs"]) == 2 and data["runs"][1]["new_rows"] == 3
    other = _args(tiny_model, tmp_path, "--resume", "--model-name", "another", methods="uniform")
    assert main(other) == 2, "rows of another model are never mixed in"


def test_the_cpu_path_reports_presets_by_name(tiny_model, tmp_path, presets_yaml):
    args = _args(tiny_model, tmp_path, "--kv-compression-config", presets_yaml, "--max-new-tokens", "2")
    args[args.index("vllm")] = "hf"
    assert main([*args, "--threads", "1"]) == 0
    data = json.loads((tmp_path / "quality_tiny.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"none", "uniform", "zz_half"}
    assert (tmp_path / "quality_tiny_aware_needles.png").stat().st_size > 5000


def test_samples_is_the_per_cell_count():
    args = parser().parse_args(["--model", "m", "--samples", "3", "--lengths", "4096,24576"])
    assert args.per_cell == 3 and args.lengths == [4096, 24576] and args.gpu_memory_utilization == 0.45
