"""bench.paired: both engines up, passes alternated in ABBA order (with a fake engine process)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import offline
from bench.paired import PAIRED_GPU_MEMORY_UTILIZATION, EngineFailed, alternate, pass_orders

FAKE = [sys.executable, str(Path(__file__).with_name("fake_engine.py"))]


def _specs(passes: int, **plugin_extra) -> dict[str, dict]:
    def workloads(budgets):
        return [{"label": f"c#{k}@{b}", "repeat": k} for k in range(1, passes + 1) for b in budgets]

    return {
        "stock": {"name": "throughput_stock", "workloads": workloads(["stock"])},
        "plugin": {"name": "throughput_plugin", "workloads": workloads(["1024", "1"]), **plugin_extra},
    }


def test_pass_orders_reverse_every_other_pass():
    assert pass_orders(["stock", "plugin"], 4) == [
        ["stock", "plugin"],
        ["plugin", "stock"],
        ["stock", "plugin"],
        ["plugin", "stock"],
    ]


def test_both_engines_start_before_any_workload_and_passes_alternate(tmp_path):
    results = alternate(_specs(3), tmp_path, timeout=60, command=FAKE)
    assert set(results) == {"stock", "plugin"}
    # both up before the first workload; each with the lowered start-up memory check
    first_run = min(w["ran_ns"] for r in results.values() for w in r["workloads"])
    assert all(r["started_ns"] < first_run for r in results.values())
    assert {r["gpu_memory_utilization"] for r in results.values()} == {PAIRED_GPU_MEMORY_UTILIZATION}
    ran = sorted((w["ran_ns"], w["workload"]["label"]) for r in results.values() for w in r["workloads"])
    assert [label for _, label in ran] == [
        "c#1@stock", "c#1@1024", "c#1@1",  # pass 1: stock first
        "c#2@1024", "c#2@1", "c#2@stock",  # pass 2: the plugin first
        "c#3@stock", "c#3@1024", "c#3@1",
    ]  # fmt: skip
    # each run's result lists its own workloads, in the order they ran
    assert [w["workload"]["label"] for w in results["stock"]["workloads"]] == ["c#1@stock", "c#2@stock", "c#3@stock"]
    assert all(not r.get("partial") for r in results.values())


def test_an_engine_that_dies_is_reported_with_its_log(tmp_path):
    expected = r"(?s)throughput_plugin failed during c#2@1 \(exit 3\).*crashing on workload 4"
    with pytest.raises(EngineFailed, match=expected):
        alternate(_specs(2, crash_at=4), tmp_path, timeout=60, command=FAKE)


def test_partial_ok_keeps_what_was_measured_and_stops_both(tmp_path):
    results = alternate(_specs(3, crash_at=4), tmp_path, timeout=60, partial_ok=True, command=FAKE)
    assert results["stock"]["partial"] and results["plugin"]["partial"]
    assert [w["workload"]["label"] for w in results["plugin"]["workloads"]] == ["c#1@1024", "c#1@1", "c#2@1024"]
    assert [w["workload"]["label"] for w in results["stock"]["workloads"]] == ["c#1@stock"]


def test_an_engine_that_stops_answering_is_given_up_at_the_deadline(tmp_path):
    with pytest.raises(EngineFailed, match="throughput_stock failed during c#1@stock"):
        alternate(_specs(2) | {"stock": {**_specs(2)["stock"], "hang_at": 1}}, tmp_path, timeout=3, command=FAKE)


def test_serve_answers_each_workload_line_and_shuts_down(monkeypatch):
    """The engine side (`bench/offline.py --serve`): a header line, then one result line per workload line."""
    calls = []

    core = SimpleNamespace(shutdown=lambda: calls.append("down"))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core))
    monkeypatch.setattr(offline, "start_engine", lambda spec: (llm, {"name": spec["name"]}, True, None))

    def fake_run(llm, workload, *, plugin, metrics_port, return_tokens):
        calls.append((workload["label"], plugin, return_tokens))
        return {"workload": workload, "output_tok_s": 1.0}

    monkeypatch.setattr(offline, "run_workload", fake_run)
    lines = [json.dumps({"label": "a"}), json.dumps({"label": "b", "return_tokens": True}), "stop", '{"label": "x"}']
    commands = io.StringIO("\n".join(lines) + "\n")
    results = io.StringIO()
    offline.serve({"name": "e"}, commands, results)
    answers = [json.loads(line) for line in results.getvalue().splitlines()]
    assert answers[0] == {"name": "e"} and [r["workload"]["label"] for r in answers[1:]] == ["a", "b"]
    assert calls == [("a", True, False), ("b", True, True), "down"]
