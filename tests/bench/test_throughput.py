"""The throughput harness's bookkeeping (the GPU runs themselves are in bench/results)."""

import json

import pytest

from bench import throughput
from bench.offline import _counter_delta, make_prompts


def _measured(label, case, budget, tok_s, running, extra=None):
    return {
        "workload": {"label": label, "case": case, "budget": budget, "prompt_len": 16384, "output_len": 1024},
        "num_prompts": 256,
        "output_tok_s": tok_s,
        "req_s": tok_s / 1024,
        "max_running": running,
        "elapsed_s": 1.0,
        "ttft_s": {"p50": 2.0, "p99": 9.0},
        "tpot_s": {"p50": 0.01, "p99": 0.02},
        **(extra or {}),
    }


def test_workload_plan_covers_every_case_and_budget_with_the_same_prompts():
    stock = throughput.plan_workloads(["decode_heavy", "prefill_heavy"], None, {"prefill_heavy": 8})
    plugin = throughput.plan_workloads(["decode_heavy"], [0.2, 1.0], {})
    assert [w["label"] for w in stock] == ["decode_heavy@stock", "prefill_heavy@stock"]
    assert stock[1]["num_prompts"] == 8 and stock[0]["num_prompts"] == 256
    assert [w["extra_args"] for w in plugin] == [{"kv_budget": 0.2}, {"kv_budget": 1.0}]
    assert [w["return_tokens"] for w in plugin] == [False, True]
    # the prefill probe is stock's alone: a plugin run in the same invocation skips it
    probe = throughput.plan_workloads(["decode_heavy", "decode_heavy_prefill"], [0.2], {})
    assert [w["label"] for w in probe] == ["decode_heavy@0.2"]
    assert [w["label"] for w in throughput.plan_workloads(["decode_heavy_prefill"], None, {})] == [
        "decode_heavy_prefill@stock"
    ]
    small = {**plugin[0], "num_prompts": 3, "prompt_len": 50}
    assert make_prompts(small) == make_prompts({**stock[0], "num_prompts": 3, "prompt_len": 50})


def test_summary_ratios_are_against_stock_of_the_same_case(tmp_path):
    raw = {
        "stock": {
            "workloads": [
                _measured(
                    "decode_heavy@stock",
                    "decode_heavy",
                    None,
                    1000.0,
                    7,
                    {"token_digests": ["a", "b"], "mean_running": 6.0, "mean_kv_cache_usage": 0.9},
                )
            ]
        },
        "plugin": {
            "compression": {"method": "zigzag"},
            "workloads": [
                _measured(
                    "decode_heavy@0.2",
                    "decode_heavy",
                    0.2,
                    2500.0,
                    35,
                    {
                        "plugin_metrics": {
                            "vllm_kvcomp_eviction_seconds_sum": 2.56,
                            "vllm_kvcomp_eviction_seconds_count": 256.0,
                            "vllm_kvcomp_eviction_host_seconds_sum": 0.64,
                            "vllm_kvcomp_blocks_freed_total": 1000.0,
                        },
                        "mean_running": 30.0,
                        "mean_kv_cache_usage": 0.9,
                    },
                ),
                _measured("decode_heavy@1", "decode_heavy", 1.0, 980.0, 7, {"token_digests": ["a", "b"]}),
            ],
        },
    }
    meta = {"device": "H100", "date": "d", "command": "c", "model": "m", "kv_cache_memory_bytes": 4 << 30}
    summary = throughput.summarize(raw, meta)
    by_budget = {c["budget"]: c for c in summary["cases"]}
    assert by_budget[0.2]["ratio_output_tok_s"] == pytest.approx(2.5)
    assert by_budget[1.0]["ratio_output_tok_s"] == pytest.approx(0.98)
    assert by_budget[0.2]["eviction_ms_mean"] == pytest.approx(10.0)
    assert by_budget[0.2]["eviction_host_ms_mean"] == pytest.approx(2.5)
    assert by_budget[0.2]["eviction_host_s_total"] == pytest.approx(0.64)
    assert "| 10.0 (2.5) |" in throughput.markdown(summary)
    assert by_budget[0.2]["stock_max_running"] == 7
    # stock held 0.9 / 6 of the pool per running request, the plugin 0.9 / 30: five times less
    assert by_budget[0.2]["footprint_ratio"] == pytest.approx(5.0)
    assert by_budget[1.0]["footprint_ratio"] is None  # not sampled: no ratio made up
    # 30 running at 2,500 tok/s against 6 at 1,000: each step takes 2x stock's, and 5x the batch / 2 = 2.5x
    assert by_budget[0.2]["step_time_ratio"] == pytest.approx(2.0)
    assert by_budget[0.2]["ratio_output_tok_s"] == pytest.approx((30.0 / 6.0) / by_budget[0.2]["step_time_ratio"])
    assert by_budget[1.0]["step_time_ratio"] is None  # running not sampled
    assert by_budget[0.2]["stock_tpot_p99"] == 0.02
    for key in (
        "case",
        "method",
        "budget",
        "output_tok_s",
        "stock_output_tok_s",
        "ratio_output_tok_s",
        "ttft_p50",
        "tpot_p50",
        "max_running",
    ):
        assert key in by_budget[0.2]
    text = throughput.markdown(summary)
    assert "| decode_heavy | 256 x (16384, 1024) | zigzag | 0.2 |  | 2500 | 1000 | 2.50 | 5.00 |" in text
    assert "| 30.0 / 35 (6.0 / 7) |" in text
    assert "decode_heavy 100% of requests" in text
    throughput.plot_throughput(summary, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 5000
    json.dumps(summary)


def test_merge_replaces_a_remeasured_workload_and_keeps_the_others():
    raw = {"plugin": {"workloads": [_measured("a@0.2", "a", 0.2, 1.0, 1), _measured("a@1", "a", 1.0, 1.0, 1)]}}
    throughput._merge(raw, "plugin", {"compression": {}, "workloads": [_measured("a@0.2", "a", 0.2, 5.0, 1)]})
    labels = {w["workload"]["label"]: w["output_tok_s"] for w in raw["plugin"]["workloads"]}
    assert labels == {"a@1": 1.0, "a@0.2": 5.0}


def test_counter_deltas_leave_gauges_alone():
    before = {
        "vllm_kvcomp_blocks_freed_total": 10.0,
        "vllm_kvcomp_info{budget=0.2,method=zigzag}": 1.0,
        "vllm_kvcomp_eviction_seconds_bucket{le=0.1}": 3.0,
    }
    after = {
        "vllm_kvcomp_blocks_freed_total": 25.0,
        "vllm_kvcomp_info{budget=0.2,method=zigzag}": 1.0,
        "vllm_kvcomp_eviction_seconds_bucket{le=0.1}": 4.0,
    }
    delta = _counter_delta(after, before)
    assert delta["vllm_kvcomp_blocks_freed_total"] == 15.0
    assert delta["vllm_kvcomp_info{budget=0.2,method=zigzag}"] == 1.0
    assert delta["vllm_kvcomp_eviction_seconds_bucket{le=0.1}"] == 1.0


def test_raw_results_of_two_jobs_merge_with_each_case_against_its_own_stock(tmp_path, monkeypatch):
    """Two jobs (one case each, on two GPUs) write two raw files; --merge builds one summary in which
    each case's plugin rows are compared with the stock run of their own invocation."""
    from bench import offline
    from bench.throughput import main

    def fake_run(spec, workdir, timeout=900, partial_ok=False):
        plugin = spec.get("compression") is not None
        workloads = []
        for w in spec["workloads"]:
            speed = {"long_generation": 100.0, "decode_heavy": 1000.0, "decode_heavy_prefill": 1.0}[w["case"]]
            m = _measured(w["label"], w["case"], w["budget"], speed * (3 if plugin else 1), 7)
            workloads.append({**m, "workload": w})
        return {"compression": spec.get("compression"), "device": "FakeGPU", "vllm": "0.25.1", "workloads": workloads}

    monkeypatch.setattr(offline, "run_in_subprocess", fake_run)
    common = ["--model", "/m", "--kv-cache-memory-bytes", "1024", "--runs", "stock,plugin", "--evict-every", "128"]
    monkeypatch.setenv("KVCOMP_COMMIT", "job-a")
    assert main([*common, "--out", str(tmp_path / "a"), "--cases", "long_generation", "--budgets", "1024"]) == 0
    monkeypatch.setenv("KVCOMP_COMMIT", "job-b")
    args = ["--out", str(tmp_path / "b"), "--cases", "decode_heavy,decode_heavy_prefill", "--budgets", "0.2"]
    assert main([*common, *args]) == 0
    raws = [str(tmp_path / job / "throughput_raw.json") for job in "ab"]
    assert main(["--merge", *raws, "--out", str(tmp_path / "merged")]) == 0
    summary = json.loads((tmp_path / "merged" / "throughput.json").read_text())
    got = {c["case"]: c for c in summary["cases"]}
    assert set(got) == {"long_generation", "decode_heavy"}  # the prefill probe is stock's alone
    assert got["long_generation"]["ratio_output_tok_s"] == pytest.approx(3.0)
    assert (got["long_generation"]["invocation"], got["long_generation"]["stock_invocation"]) == (0, 0)
    assert (got["decode_heavy"]["invocation"], got["decode_heavy"]["stock_invocation"]) == (1, 1)
    assert [i["commit"] for i in summary["invocations"]] == ["job-a", "job-b"]
    assert summary["kv_cache_memory_bytes"] == 1024 and summary["model"] == "/m"
    # each case may have its own KV memory (its plugin and stock runs share it): every row names its own
    args = ["--out", str(tmp_path / "c"), "--cases", "long_generation", "--budgets", "1024"]
    assert main([*common, "--kv-cache-memory-bytes", "2048", *args]) == 0
    assert main(["--merge", str(tmp_path / "c" / "throughput_raw.json"), raws[1], "--out", str(tmp_path / "d")]) == 0
    summary = json.loads((tmp_path / "d" / "throughput.json").read_text())
    got = {c["case"]: c["kv_cache_memory_bytes"] for c in summary["cases"]}
    assert got == {"long_generation": 2048, "decode_heavy": 1024} and summary["kv_cache_memory_bytes"] == [1024, 2048]
    # the same case at two KV memories: two rows, each against the stock run of its own KV memory
    monkeypatch.setattr(throughput.offline, "run_in_subprocess", _scaled(fake_run, 4.0))
    assert main([*common, "--kv-cache-memory-bytes", "4096", "--out", str(tmp_path / "f"), *args[2:]]) == 0
    raw_f = str(tmp_path / "f" / "throughput_raw.json")
    assert main(["--merge", raws[0], raw_f, "--out", str(tmp_path / "y")]) == 0
    cases = json.loads((tmp_path / "y" / "throughput.json").read_text())["cases"]
    rows = {c["kv_cache_memory_bytes"]: c for c in cases}
    assert set(rows) == {1024, 4096}
    assert (rows[1024]["stock_output_tok_s"], rows[4096]["stock_output_tok_s"]) == (100.0, 400.0)
    assert (rows[1024]["stock_invocation"], rows[4096]["stock_invocation"]) == (0, 1)
    monkeypatch.setattr(throughput.offline, "run_in_subprocess", fake_run)
    # the same case on another model (e.g. the 8B shape) is a row of its own, against its own model's stock
    monkeypatch.setattr(throughput.offline, "run_in_subprocess", _scaled(fake_run, 2.0))
    assert main([*common, "--model", "/big", "--out", str(tmp_path / "e"), *args[2:]]) == 0
    assert main(["--merge", raws[0], str(tmp_path / "e" / "throughput_raw.json"), "--out", str(tmp_path / "x")]) == 0
    summary = json.loads((tmp_path / "x" / "throughput.json").read_text())
    rows = {(c["model"], c["case"]): c for c in summary["cases"]}
    assert set(rows) == {("/m", "long_generation"), ("/big", "long_generation")}
    assert rows[("/m", "long_generation")]["stock_output_tok_s"] == 100.0
    assert rows[("/big", "long_generation")]["stock_output_tok_s"] == 200.0
    assert rows[("/big", "long_generation")]["ratio_output_tok_s"] == pytest.approx(3.0)
    assert summary["model"] == ["/big", "/m"]


def _scaled(run, factor):
    """A fake engine run `factor` times as fast (another model's speed)."""

    def scaled(spec, workdir, timeout=900, partial_ok=False):
        result = run(spec, workdir, timeout, partial_ok)
        for w in result["workloads"]:
            w["output_tok_s"] *= factor
        return result

    return scaled


def test_main_runs_stock_and_plugin_and_writes_the_issue_schema(tmp_path, monkeypatch):
    """`python -m bench.throughput` end to end with the engine processes faked.

    Checks the specs handed to the engine processes (same model, KV memory and
    prompts; plugin budgets as per-request overrides), the stock-vs-1.0 token
    comparison, and that a later invocation merges into the same results.
    """
    from bench import offline
    from bench.throughput import main

    specs = []

    def fake_run(spec, workdir, timeout=900, partial_ok=False):
        specs.append(spec)
        plugin = spec.get("compression") is not None
        workloads = []
        for w in spec["workloads"]:
            budget = w["budget"] or 1.0
            tok_s = 1000.0 / budget if plugin else 1000.0
            m = _measured(w["label"], w["case"], w["budget"], tok_s, 7 / budget)
            m["workload"] = w
            if w["return_tokens"]:
                m["tokens"] = [[1, 2, 3], [4, 5, 6]] if not plugin else [[1, 2, 3], [4, 5, 7]]
            if plugin:
                m["plugin_metrics"] = {
                    "vllm_kvcomp_eviction_seconds_sum": 0.5,
                    "vllm_kvcomp_eviction_seconds_count": 10.0,
                }
            workloads.append(m)
        return {
            "name": spec["name"],
            "compression": spec.get("compression"),
            "device": "FakeGPU",
            "vllm": "0.25.1",
            "torch": "2.11.0",
            "workloads": workloads,
        }

    monkeypatch.setattr(offline, "run_in_subprocess", fake_run)
    monkeypatch.setenv("KVCOMP_COMMIT", "abc1234")
    common = ["--model", "/m", "--out", str(tmp_path), "--work", str(tmp_path / "w"), "--kv-cache-memory-bytes", "1024"]
    assert main([*common, "--runs", "stock,plugin", "--cases", "decode_heavy", "--budgets", "0.2,1.0"]) == 0
    stock_spec, plugin_spec = specs
    for key in ("model", "kv_cache_memory_bytes", "max_model_len"):
        assert stock_spec[key] == plugin_spec[key]
    assert stock_spec.get("compression") is None
    assert plugin_spec["compression"]["method"] == "uniform"  # the default: README's recommended method
    assert [w["extra_args"] for w in plugin_spec["workloads"]] == [{"kv_budget": 0.2}, {"kv_budget": 1.0}]
    assert plugin_spec["workloads"][0]["seed"] == stock_spec["workloads"][0]["seed"]

    # stock and plugin measured in separate invocations still compare their tokens
    assert main([*common, "--runs", "plugin", "--cases", "decode_heavy", "--budgets", "1.0"]) == 0
    # a second invocation (another case) merges into the same raw results
    assert main([*common, "--runs", "stock,plugin", "--cases", "prefill_heavy", "--budgets", "0.5"]) == 0
    summary = json.loads((tmp_path / "throughput.json").read_text())
    assert summary["device"] == "FakeGPU" and summary["kv_cache_memory_bytes"] == 1024
    got = {(c["case"], c["budget"]): c for c in summary["cases"]}
    assert set(got) == {("decode_heavy", 0.2), ("decode_heavy", 1.0), ("prefill_heavy", 0.5)}
    assert got[("decode_heavy", 0.2)]["ratio_output_tok_s"] == pytest.approx(5.0)
    assert got[("prefill_heavy", 0.5)]["ratio_output_tok_s"] == pytest.approx(2.0)
    assert got[("decode_heavy", 1.0)]["identical_to_stock"] == 0.5
    assert got[("decode_heavy", 0.2)]["eviction_ms_mean"] == pytest.approx(50.0)
    raw = json.loads((tmp_path / "throughput_raw.json").read_text())
    assert all("tokens" not in w for run in ("stock", "plugin") for w in raw[run]["workloads"])
    # every invocation is recorded with its command and commit, and each row names the one that measured it
    assert [i["command"].split("--runs ")[1][:12] for i in summary["invocations"]] == [
        "stock,plugin",
        "plugin --cas",
        "stock,plugin",
    ]
    assert all(i["commit"] == "abc1234" and i["device"] == "FakeGPU" for i in summary["invocations"])
    assert (got[("decode_heavy", 1.0)]["invocation"], got[("decode_heavy", 1.0)]["stock_invocation"]) == (1, 0)
    assert not got[("decode_heavy", 1.0)]["same_invocation"]
    assert got[("prefill_heavy", 0.5)]["same_invocation"] and got[("decode_heavy", 0.2)]["same_invocation"]
    text = (tmp_path / "throughput.md").read_text()
    assert "- 1: `python -m bench.throughput" in text and "| 1 (0) |" in text
    assert len(raw["stock"]["workloads"][0]["token_digests"]) == 2
    assert (tmp_path / "throughput.md").exists() and (tmp_path / "throughput_vs_budget.png").exists()


def test_bad_arguments_are_refused():
    from bench.throughput import main

    with pytest.raises(SystemExit):
        main(["--cases", "decode_heavy,chat"])
    with pytest.raises(SystemExit):
        main(["--budgets", "0.2,1.5"])


def test_long_generation_takes_token_budgets_and_evict_every(monkeypatch, tmp_path):
    """Issue #12's case: 1k prompts, 16k outputs, token budgets; evict_every reaches the plugin's config."""
    workloads = throughput.plan_workloads(["long_generation"], [1024, 2048], {})
    assert [w["label"] for w in workloads] == ["long_generation@1024", "long_generation@2048"]
    assert workloads[0]["output_len"] == 16384 and workloads[0]["extra_args"] == {"kv_budget": 1024}
    specs = []

    def fake_run(spec, *args, **kwargs):
        specs.append(spec)
        return {"workloads": [], "device": "fake"}

    monkeypatch.setattr(throughput.offline, "run_in_subprocess", fake_run)
    monkeypatch.setattr(throughput, "plot_throughput", lambda *a, **k: None)
    argv = ["--model", "m", "--runs", "plugin", "--cases", "long_generation", "--budgets", "1024,2048"]
    throughput.main([*argv, "--evict-every", "128", "--out", str(tmp_path)])
    assert specs[0]["compression"] == {"method": "uniform", "budget": 0.2, "evict_every": 128}
    with pytest.raises(SystemExit):
        throughput.main([*argv[:-1], "1024.5", "--out", str(tmp_path)])


def test_amdahl_bound_from_the_prefill_probe():
    """Stock: 100 s in all, 40 s of it prefill (the probe); the plugin runs 5x the requests at once:
    the bound is 100 / (40 + 60 / 5) = 1.923, and a 1.8x ratio is 93.6% of it."""
    stock = _measured("decode_heavy@stock", "decode_heavy", None, 1000.0, 7, {"preemptions": 3.0})
    stock["elapsed_s"] = 100.0
    probe = _measured("decode_heavy_prefill@stock", "decode_heavy_prefill", None, 1.0, 7)
    probe["elapsed_s"] = 40.0
    plugin = _measured("decode_heavy@0.2", "decode_heavy", 0.2, 1800.0, 35, {"preemptions": 0.0})
    raw = {
        "stock": {"workloads": [stock, probe]},
        "plugin": {"compression": {"method": "uniform"}, "workloads": [plugin]},
    }
    meta = {"device": "H200", "date": "d", "command": "c", "model": "m", "kv_cache_memory_bytes": 4 << 30}
    case = throughput.summarize(raw, meta)["cases"][0]
    assert case["stock_prefill_s"] == 40.0
    assert case["amdahl_bound"] == pytest.approx(100 / 52)
    assert case["share_of_amdahl_bound"] == pytest.approx(1.8 / (100 / 52))
    assert (case["preemptions"], case["stock_preemptions"]) == (0.0, 3.0)
    assert "amdahl_bound" not in throughput.amdahl({"stock_elapsed_s": None}, probe)


def test_repeated_passes_compare_pass_k_of_the_plugin_with_pass_k_of_stock():
    stock_plan = throughput.plan_workloads(["decode_heavy"], None, {"decode_heavy": 32}, repeats=3)
    plugin_plan = throughput.plan_workloads(["decode_heavy"], [1.0], {"decode_heavy": 32}, repeats=3)
    assert [w["label"] for w in stock_plan] == [f"decode_heavy#{k}@stock" for k in (1, 2, 3)]
    assert [w["label"] for w in plugin_plan] == [f"decode_heavy#{k}@1" for k in (1, 2, 3)]
    assert {w["num_prompts"] for w in plugin_plan} == {32} and [w["repeat"] for w in plugin_plan] == [1, 2, 3]
    assert make_prompts(plugin_plan[2]) == make_prompts(stock_plan[0])  # every pass the same prompts
    stock_rates, plugin_rates = [1000.0, 1010.0, 990.0], [970.0, 1000.0, 999.0]
    raw = {
        "stock": {
            "workloads": [
                _measured(w["label"], w["case"], None, rate, 7) for w, rate in zip(stock_plan, stock_rates, strict=True)
            ]
        },
        "plugin": {
            "compression": {"method": "uniform"},
            "workloads": [
                _measured(w["label"], w["case"], 1.0, rate, 7, {"plugin_metrics": {}})
                for w, rate in zip(plugin_plan, plugin_rates, strict=True)
            ],
        },
    }
    for run in ("stock", "plugin"):  # the plan's own tags, as bench.offline returns them
        for w, planned in zip(raw[run]["workloads"], stock_plan if run == "stock" else plugin_plan, strict=True):
            w["workload"].update(base_case=planned["base_case"], repeat=planned["repeat"])
    meta = {"device": "H200", "date": "d", "command": "c", "model": "m", "kv_cache_memory_bytes": 4 << 30}
    summary = throughput.summarize(raw, meta)
    ratios = [c["ratio_output_tok_s"] for c in summary["cases"]]
    assert ratios == pytest.approx([p / s for p, s in zip(plugin_rates, stock_rates, strict=True)])
    assert [c["base_case"] for c in summary["cases"]] == ["decode_heavy"] * 3
    text = throughput.markdown(summary)
    # sd of (0.97, 0.990099, 1.009091) is 0.0195: standard error 0.0195 / sqrt(3) = 0.011
    expected = "- decode_heavy @ 1 (invocation None): 0.970, 0.990, 1.009; mean 0.990 (standard error 0.011), "
    assert expected + "range 0.970-1.009" in text


def test_paired_runs_both_engines_through_bench_paired_and_compares_pass_by_pass(monkeypatch, tmp_path):
    """--paired hands both runs' specs to bench.paired.alternate at once (never one engine process
    after the other) and summarizes pass k against pass k as --repeats does."""
    calls = []

    def fake_alternate(specs, workdir, timeout, partial_ok=False):
        calls.append((list(specs), timeout, partial_ok))
        rates = {"stock": [1000.0, 900.0], "plugin": [990.0, 882.0]}
        return {
            run: {
                "device": "FakeGPU",
                "compression": spec.get("compression"),
                "workloads": [
                    {**_measured(w["label"], w["case"], w["budget"], rate, 64), "workload": w}
                    for w, rate in zip(spec["workloads"], rates[run], strict=True)
                ],
            }
            for run, spec in specs.items()
        }

    monkeypatch.setattr(throughput.paired, "alternate", fake_alternate)
    monkeypatch.setattr(throughput.offline, "run_in_subprocess", lambda *a, **k: pytest.fail("not one after the other"))
    monkeypatch.setattr(throughput, "plot_throughput", lambda *a, **k: None)
    argv = ["--model", "m", "--cases", "decode_heavy", "--budgets", "1.0", "--out", str(tmp_path), "--timeout", "500"]
    assert throughput.main([*argv, "--repeats", "2", "--paired"]) == 0
    assert calls == [(["stock", "plugin"], 500.0, True)]
    text = (tmp_path / "throughput.md").read_text()
    assert "- decode_heavy @ 1 (invocation 0): 0.990, 0.980; mean 0.985 (standard error 0.005), range 0.980" in text
    assert "--paired" in json.loads((tmp_path / "throughput.json").read_text())["invocations"][0]["command"]


@pytest.mark.parametrize("extra", [["--repeats", "1"], ["--repeats", "3", "--runs", "plugin"], ["--runs", "stock,gpu"]])
def test_paired_needs_both_runs_and_two_passes(extra, tmp_path):
    with pytest.raises(SystemExit):
        throughput.main(["--model", "m", "--out", str(tmp_path), "--paired", *extra])
