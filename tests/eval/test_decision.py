"""Issue #13's comparison: paired deltas vs uniform, the acceptance rule, and the candidate picker."""

import json

import pytest

from evaluation import decision, pick
from evaluation.output import build_result

BUDGETS = (0.5, 0.2, 0.1, 0.05)
PROMPTS = [("niah_noise", 4096, d / 10, i) for d in range(1, 10, 2) for i in range(8)]  # 40 prompts


def _rows(method, budget, scores):
    return [
        dict(method=method, budget=budget, task=t, context_len=n, depth=d, sample=i, protocol="aware", score=s)
        for (t, n, d, i), s in zip(PROMPTS, scores, strict=True)
    ]


def synthetic_rows(full=1.0):
    """full KV right on every prompt (score `full`); uniform loses 4 prompts of 40 at 0.1 and 0.05;
    "same" is uniform; "worse" also loses 10 more at 0.1; "better" wins back uniform's losses."""
    rows = _rows("none", 1.0, [full] * 40)
    for b in BUDGETS:
        lost = 4 if b <= 0.1 else 0
        uniform = [0.0] * lost + [full] * (40 - lost)
        rows += _rows("uniform", b, uniform) + _rows("same", b, uniform)
        rows += _rows("worse", b, [0.0] * (lost + 10) + [full] * (30 - lost) if b == 0.1 else uniform)
        rows += _rows("better", b, [full] * 40)
    return rows


def test_paired_vs_uniform_entries():
    paired = decision.paired_vs_uniform(synthetic_rows())
    by = {(p["method"], p["budget"]): p for p in paired}
    assert {m for m, _ in by} == {"same", "worse", "better"}, "uniform and full KV are not compared with uniform"
    assert set(by) == {(m, b) for m in ("same", "worse", "better") for b in BUDGETS}
    same = by[("same", 0.1)]
    assert same["delta"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["n"] == 40
    worse = by[("worse", 0.1)]
    assert worse["delta"] == pytest.approx(-10 / 40) and worse["ci95"][0] < -0.25 < worse["ci95"][1] < 0
    assert worse["score"] == pytest.approx(26 / 40) and worse["uniform_score"] == pytest.approx(36 / 40)
    assert by[("better", 0.05)]["delta"] == pytest.approx(4 / 40)


def test_deltas_are_in_units_of_full_score():
    by = {(p["method"], p["budget"]): p for p in decision.paired_vs_uniform(synthetic_rows(full=0.5))}
    worse = by[("worse", 0.1)]
    assert worse["full_score"] == 0.5
    assert worse["delta"] == pytest.approx(-10 / 40 * 0.5)
    assert worse["delta_of_full"] == pytest.approx(-10 / 40)
    assert worse["ci95_of_full"] == pytest.approx([x / 0.5 for x in worse["ci95"]])


def test_decision_on_synthetic_rows():
    rows = synthetic_rows()
    result = decision.decide(rows, decision.paired_vs_uniform(rows))
    assert result["budgets"] == list(BUDGETS) and result["full_score"] == 1.0
    methods = result["methods"]
    assert methods["same"]["passes"] and methods["better"]["passes"]
    assert methods["same"]["share_of_full_at_0.2"] == 1.0
    worse = methods["worse"]
    assert worse["non_inferior"] == {"0.5": True, "0.2": True, "0.1": False, "0.05": True}
    assert not worse["passes"] and worse["worst_ci95_low_of_full"] < -0.25


def _entry(method, budget, low, full=1.0):
    return dict(method=method, budget=budget, ci95=[low, 0.0], ci95_of_full=[low / full, 0.0], full_score=full)


@pytest.mark.parametrize(
    ("low", "share", "passes"),
    [(-0.019, 0.99, True), (-0.021, 0.99, False), (-0.019, 0.981, True), (-0.019, 0.979, False)],
)
def test_rule_thresholds(low, share, passes):
    """Non-inferior iff the CI lower bound >= -0.02 x full; >= 98% of full at budget 0.2."""
    full = 0.8
    rows = _rows("none", 1.0, [full] * 40) + _rows("m", 0.2, [share * full] * 40)
    rows += _rows("uniform", 0.2, [full] * 40) + _rows("uniform", 0.1, [full] * 40)
    paired = [_entry("m", 0.2, -0.001 * full, full), _entry("m", 0.1, low * full, full)]
    verdict = decision.decide(rows, paired)["methods"]["m"]
    assert verdict["non_inferior"]["0.1"] is (low >= -0.02)
    assert verdict["share_of_full_at_0.2"] == pytest.approx(share)
    assert verdict["passes"] is passes


def test_a_budget_not_measured_fails_the_rule():
    rows = [r for r in synthetic_rows() if not (r["method"] == "same" and r["budget"] == 0.05)]
    verdict = decision.decide(rows, decision.paired_vs_uniform(rows))["methods"]["same"]
    assert verdict["non_inferior"]["0.05"] is False and not verdict["passes"]


def test_result_schema_keeps_todays_keys():
    rows = [dict(r, kept_fraction=r["budget"]) for r in synthetic_rows()]
    result = build_result({"model": "m", "command": "c"}, rows, [{"command": "c"}], {"p": {"method": "zigzag"}})
    assert {"model", "results", "rows", "paired_vs_uniform", "decision", "presets", "runs"} <= set(result)
    for entry in result["paired_vs_uniform"]:
        assert {"method", "budget", "delta", "ci95", "delta_of_full", "n"} <= set(entry)
    assert result["rows"] is rows and result["results"][0]["full_score"] == 1.0
    json.dumps(result)  # JSON-serialisable as written


def _results_file(tmp_path, lows: dict[str, dict[float, float]], scores01: dict[str, float]):
    paired = [
        dict(
            method=m,
            budget=b,
            ci95=[lo / 2, 0.1],
            ci95_of_full=[lo, 0.2],
            score=scores01.get(m, 0.5) if b == 0.1 else 0.5,
        )
        for m, per in lows.items()
        for b, lo in per.items()
    ]
    rows = [dict(method="uniform", budget=b) for b in BUDGETS]
    path = tmp_path / "quality_x.json"
    path.write_text(json.dumps({"rows": rows, "paired_vs_uniform": paired}))
    return path


def test_picker_takes_the_largest_worst_case_then_the_score_at_0_1(tmp_path, capsys):
    flat = {b: -0.01 for b in BUDGETS}
    lows = {"a": {**flat, 0.05: -0.05}, "b": flat, "c": dict(flat), "d": {**flat, 0.5: 0.03}}
    path = _results_file(tmp_path, lows, {"b": 0.80, "c": 0.85, "d": 0.1})
    assert pick.main([str(path), "--candidates", "a,b,c"]) == 0
    out = capsys.readouterr()
    assert out.out == "c\n", "b and c tie on the worst case (-0.01); c scores higher at 0.1"
    assert "c: worst CI low vs uniform -0.0100" in out.err
    assert pick.pick(json.loads(path.read_text()), ["a", "b"]) == "b"
    assert pick.pick(json.loads(path.read_text()), ["a", "b", "c", "d"]) == "c", "d's best budget does not help it"


def test_picker_ties_go_to_the_first_named(tmp_path):
    flat = {b: -0.01 for b in BUDGETS}
    path = _results_file(tmp_path, {"a": flat, "b": flat}, {})
    assert pick.pick(json.loads(path.read_text()), ["b", "a"]) == "b"
    assert pick.pick(json.loads(path.read_text()), ["a", "b"]) == "a"


def test_picker_refuses_missing_candidates_and_budgets(tmp_path, capsys):
    lows = {"a": {b: -0.01 for b in BUDGETS}, "b": {0.5: 0.0, 0.2: 0.0}}
    path = _results_file(tmp_path, lows, {})
    assert pick.main([str(path), "--candidates", "a,zz"]) == 2
    assert "'zz' is not in the results" in capsys.readouterr().err
    assert pick.main([str(path), "--candidates", "a,b"]) == 2
    assert "'b' was not measured at budget 0.1" in capsys.readouterr().err
    (tmp_path / "old.json").write_text(json.dumps({"rows": []}))
    assert pick.main([str(tmp_path / "old.json"), "--candidates", "a"]) == 2
