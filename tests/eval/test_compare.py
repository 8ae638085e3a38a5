"""evaluation.compare: paired comparison of one method across two runs on the same prompts."""

from __future__ import annotations

import json

import pytest

from evaluation.compare import CompareError, compare, main


def _rows(scores_by_budget: dict[float, list[float]], full: list[float]) -> list[dict]:
    rows = []
    for sample, score in enumerate(full):
        rows.append(_row("none", 1.0, sample, score))
    for budget, scores in scores_by_budget.items():
        rows += [_row("uniform", budget, sample, score) for sample, score in enumerate(scores)]
    return rows


def _row(method: str, budget: float, sample: int, score: float) -> dict:
    return {
        "method": method,
        "budget": budget,
        "task": "niah_text",
        "context_len": 4096,
        "depth": 0.5,
        "sample": sample,
        "protocol": "aware",
        "score": score,
    }


def test_paired_delta_matches_rows_by_prompt_not_by_order():
    full = [1.0, 1.0, 1.0, 0.0]
    base = {"rows": _rows({0.1: [1.0, 0.0, 0.0, 0.0]}, full)}
    other_rows = _rows({0.1: [1.0, 1.0, 0.0, 0.0]}, full)
    other = {"rows": list(reversed(other_rows))}  # order must not matter
    (entry,) = compare(base, other, "uniform")
    assert entry["budget"] == 0.1 and entry["n"] == 4
    assert entry["delta"] == pytest.approx(0.25)
    assert entry["base_score"] == pytest.approx(0.25) and entry["other_score"] == pytest.approx(0.5)
    lo, hi = entry["ci95"]
    assert lo <= 0.25 <= hi
    assert entry["ci95_of_full"][0] == pytest.approx(lo / 0.75)


def test_refuses_runs_whose_full_kv_differs():
    base = {"rows": _rows({0.1: [1.0, 0.0]}, [1.0, 1.0])}
    other = {"rows": _rows({0.1: [1.0, 0.0]}, [1.0, 0.0])}
    with pytest.raises(CompareError, match="full KV"):
        compare(base, other, "uniform")


def test_refuses_different_prompts_and_a_missing_method():
    base = {"rows": _rows({0.1: [1.0, 0.0]}, [1.0, 1.0])}
    other = {"rows": _rows({0.1: [1.0]}, [1.0, 1.0])}
    with pytest.raises(CompareError, match="different prompts"):
        compare(base, other, "uniform")
    with pytest.raises(CompareError, match="zigzag"):
        compare(base, base, "zigzag")


def test_command_writes_the_comparison_with_provenance(tmp_path, capsys):
    full = [1.0, 1.0, 0.0]
    for name, scores in (("a", [1.0, 0.0, 0.0]), ("b", [1.0, 1.0, 0.0])):
        data = {"rows": _rows({0.2: scores}, full), "commit": f"c-{name}", "command": f"run {name}", "model": "m"}
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    out = tmp_path / "cmp.json"
    rc = main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--label", "layer_share=2", "--out", str(out)])
    assert rc == 0
    assert "layer_share=2 0.667" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["base"]["commit"] == "c-a" and record["other"]["commit"] == "c-b"
    assert record["paired"][0]["delta"] == pytest.approx(1 / 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": _rows({0.2: [1.0, 1.0, 1.0]}, [0.0, 0.0, 0.0])}))
    assert main([str(tmp_path / "a.json"), str(bad)]) == 2
