"""bench.step_profile: a decode window's GPU busy and idle time from vLLM's torch-profiler trace."""

import gzip
import json

import pytest

from bench import offline, step_profile


def _trace(kernels):
    """A Chrome trace of (ts µs, dur µs, name) kernels plus CPU events (ignored)."""
    events = [{"cat": "kernel", "ts": ts, "dur": dur, "name": name} for ts, dur, name in kernels]
    events += [{"cat": "cpu_op", "ts": 0, "dur": 10_000, "name": "aten::mm"}]
    events += [{"cat": "user_annotation", "ts": 0, "dur": 50, "name": "kvcomp::end_step"}] * 2
    events += [{"cat": "cuda_runtime", "ts": 0, "dur": 5, "name": "cudaGraphLaunch"}] * 2
    return {"traceEvents": events}


def test_busy_time_is_the_union_of_kernel_intervals_and_idle_the_rest():
    # window 0..1000 µs; kernels cover 0..300 (two overlap) and 600..1000: 700 busy, 300 idle
    trace = _trace([(0, 200, "gemm"), (100, 200, "flash"), (600, 400, "gemm")])
    got = step_profile.summarize_trace(trace, steps=2)
    assert got["window_ms"] == pytest.approx(1.0) and got["ms_per_step"] == pytest.approx(0.5)
    assert got["gpu_busy_ms_per_step"] == pytest.approx(0.35) and got["gpu_idle_share"] == pytest.approx(0.3)
    assert got["kernel_launches_per_step"] == 1.5
    assert [(k["name"], k["ms_per_step"], k["calls_per_step"]) for k in got["top_kernels"]] == [
        ("gemm", pytest.approx(0.3), 1.0),
        ("flash", pytest.approx(0.1), 0.5),
    ]
    assert got["host_ranges"] == [
        {"name": "kvcomp::end_step", "ms_per_step": pytest.approx(0.05), "calls_per_step": 1.0}
    ]
    assert got["cuda_runtime"][0]["name"] == "cudaGraphLaunch" and got["cuda_runtime"][0]["calls_per_step"] == 1.0
    assert "error" in step_profile.summarize_trace({"traceEvents": []}, steps=1)
    assert got["batch"] == {}  # no per-step ranges of vLLM's in this trace


def test_batch_sizes_come_from_vllms_per_step_ranges():
    names = ["execute_context_0(0)_generation_46(46)"] * 3 + ["execute_context_1(1)_generation_44(44)"]
    events = [{"cat": "user_annotation", "name": n, "dur": 1} for n in names]
    events += [{"cat": "user_annotation", "name": "kvcomp::end_step", "dur": 1}]
    events += [{"cat": "cpu_op", "name": "execute_context_9(9)_generation_9(9)", "dur": 1}]  # not a range
    assert step_profile.batch_sizes(events) == {
        "prefill_requests_mean": 0.25,
        "decode_requests_mean": 45.5,
        "decode_requests_min_max": [44, 46],
    }


def test_profiler_config_is_vllms_torch_profiler_over_a_window(tmp_path):
    config = offline.profiler_config({"dir": str(tmp_path), "delay": 600, "iterations": 256})
    assert config.profiler == "torch" and config.torch_profiler_dir == str(tmp_path.resolve())
    assert (config.delay_iterations, config.max_iterations, config.ignore_frontend) == (600, 256, True)


def test_each_run_is_profiled_and_summarised(tmp_path, monkeypatch):
    specs = []

    def fake_run(spec, workdir, timeout=900, partial_ok=False):
        specs.append(spec)
        folder = tmp_path / "work" / ("trace_stock" if "compression" not in spec else "trace_plugin@1024")
        folder.mkdir(parents=True, exist_ok=True)
        gap = 500 if "compression" in spec else 100  # the plugin's steps wait longer for the host
        with gzip.open(folder / "worker.pt.trace.json.gz", "wt") as handle:
            json.dump(_trace([(0, 1000, "gemm"), (1000 + gap, 1000, "gemm")]), handle)
        (folder / "profiler_out_0.txt").write_text("table")
        return {"output_tok_s": 100.0, "tpot_s": {"p50": 0.003}, "device": "FakeGPU"}

    monkeypatch.setattr(offline, "run_in_subprocess", fake_run)
    monkeypatch.setenv("KVCOMP_COMMIT", "feed123")
    out = tmp_path / "out"
    args = ["--model", "/m", "--work", str(tmp_path / "work"), "--out", str(out), "--iterations", "2"]
    assert step_profile.main(args) == 0
    stock, plugin = specs
    assert "compression" not in stock and plugin["compression"]["evict_every"] == 128
    assert plugin["workload"]["extra_args"] == {"kv_budget": 1024.0} and "extra_args" not in stock["workload"]
    assert stock["profile"] == {"dir": str(tmp_path / "work" / "trace_stock"), "delay": 600, "iterations": 2}
    result = json.loads((out / "step_profile.json").read_text())
    runs = result["runs"]
    assert runs["stock"]["gpu_idle_share"] == pytest.approx(100 / 2100)
    assert runs["plugin@1024"]["gpu_idle_share"] == pytest.approx(500 / 2500)
    assert runs["plugin@1024"]["tpot_p50_ms"] == pytest.approx(3.0) and result["device"] == "FakeGPU"
    assert result["commit"] == "feed123" and (out / "profiler_out_plugin@1024.txt").read_text() == "table"
