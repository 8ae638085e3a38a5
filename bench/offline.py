"""Run one engine configuration on one workload, in a fresh process, and report.

    python bench/offline.py SPEC.json RESULT.json     (or python -m bench.offline, from a checkout)
    python bench/offline.py --serve SPEC.json FD      (workloads one at a time from stdin: bench/paired.py)

SPEC (json): {"model", "compression": {...} | null, "kv_cache_memory_bytes",
"max_model_len", "max_num_seqs", "workload": {"num_prompts", "prompt_len",
"output_len", "seed", "extra_args" (or "extra_args_cycle": one per request, in
turn), "logprobs": bool} (or "workloads": [...], run one after the other on the
same engine), "env": {...}, "enforce_eager", "return_tokens"}.

Each configuration gets its own process (a clean GPU and a clean vLLM), so that
stock vLLM and vLLM + plugin run the same prompts with the same KV memory on
the same GPU, one after the other. The result holds wall time, output tokens/s,
requests/s, the largest number of requests vLLM ran at once (sampled from its
`vllm:num_requests_running` gauge), TTFT/TPOT percentiles from vLLM's request
metrics, the plugin's compression counters (its Prometheus endpoint), and
optionally the generated token ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

try:  # run as a module (python -m bench.offline)
    from bench import thread_cpu
except ImportError:  # or as a script under python -P (run_in_subprocess): its folder is not on sys.path
    sys.path.append(str(Path(__file__).resolve().parent))
    import thread_cpu  # type: ignore[no-redef]


def current_commit() -> str | None:
    """The commit measured: $KVCOMP_COMMIT (the device has no reliable .git), else git."""
    if os.environ.get("KVCOMP_COMMIT"):
        return os.environ["KVCOMP_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _stamp(command: str) -> dict:
    """The command, the commit and the date: how every results file begins."""
    import datetime

    return {
        "command": command,
        "commit": current_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def provenance(command: str, run: dict) -> dict:
    """What every results file records: the command, the commit, the date, and the device and
    versions of an engine run (`run_in_subprocess`'s record)."""
    return {**_stamp(command), **{key: run.get(key) for key in ("device", "vllm", "torch")}}


def bench_header(prog: str, argv, device: str, args) -> dict:
    """The header of a micro-benchmark's results file: command, commit, date, device and setup
    (its arguments but `--out`)."""
    command = f"python -m {prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    return {**_stamp(command), "device": device, "setup": {k: v for k, v in vars(args).items() if k != "out"}}


def write_json(result: dict, out: Path | None) -> None:
    """Print a results file and write it to `out` (parents made), when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def cpu_name() -> str:
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def make_prompts(workload: dict) -> list[list[int]]:
    rng = np.random.default_rng(workload.get("seed", 0))
    length = workload["prompt_len"]
    out = []
    for _ in range(workload["num_prompts"]):
        n = int(rng.integers(length[0], length[1] + 1)) if isinstance(length, list) else int(length)
        out.append(rng.integers(3, 32000, n).tolist())
    return out


def scrape_plugin_metrics(port: int | None) -> dict:
    """The plugin's metrics: from this process's registry (what vLLM's /metrics shows;
    the plugin collects the engine's metric files there), or from `metrics_port`."""
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    if port is None:
        text = generate_latest(REGISTRY).decode()
    else:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError as exc:
            return {"error": str(exc)}
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created") or not sample.name.startswith("vllm_kvcomp_"):
                continue
            labels = {k: v for k, v in sample.labels.items()}
            key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
            out[key] = sample.value
    return out


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def _counter_delta(after: dict, before: dict) -> dict:
    """Plugin counters of one workload: the process totals after minus before."""
    if "error" in after:
        return after
    cumulative = ("_total", "_count", "_sum", "_bucket")

    def is_cumulative(key: str) -> bool:
        name = key.split("{", 1)[0]
        return name.endswith(cumulative)

    return {k: v - before.get(k, 0.0) if is_cumulative(k) else v for k, v in after.items()}


def build_llm(spec: dict):
    from vllm import LLM

    kwargs = dict(
        model=spec["model"],
        skip_tokenizer_init=True,
        dtype="bfloat16",
        seed=0,
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec.get("max_num_seqs", 256),
        kv_cache_memory_bytes=spec["kv_cache_memory_bytes"],
        disable_log_stats=False,
        enable_prefix_caching=False,  # random prompts share nothing; the plugin turns it off anyway
        enforce_eager=spec.get("enforce_eager", False),
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
    )
    if spec.get("gpu_memory_utilization"):  # below vLLM's default when another engine shares the GPU
        kwargs["gpu_memory_utilization"] = spec["gpu_memory_utilization"]
    if spec.get("compression"):
        kwargs["additional_config"] = {"kv_compression": spec["compression"]}
    if spec.get("profile"):  # bench/step_profile.py: vLLM's torch profiler over a window of engine steps
        kwargs["profiler_config"] = profiler_config(spec["profile"])
    if spec.get("cudagraph_mode"):  # e.g. "PIECEWISE": attention outside the graphs (default FULL_AND_PIECEWISE)
        kwargs["compilation_config"] = {"cudagraph_mode": spec["cudagraph_mode"]}
    return LLM(**kwargs)


def profiler_config(profile: dict):
    """vLLM's torch profiler: `iterations` engine steps, `delay` steps after `start_profile`; the
    worker's trace (*.pt.trace.json.gz) and vLLM's per-op table (profiler_out_0.txt) go to `dir`."""
    from vllm.config import ProfilerConfig

    return ProfilerConfig(
        profiler="torch",
        torch_profiler_dir=str(Path(profile["dir"]).resolve()),
        torch_profiler_with_stack=False,
        ignore_frontend=True,
        delay_iterations=profile.get("delay", 0),
        max_iterations=profile["iterations"],
    )


def run_workload(llm, workload: dict, *, plugin: bool, metrics_port: int | None, return_tokens: bool) -> dict:
    """Generate one workload on a warm engine and measure it.

    `workload["extra_args"]` goes to every request's SamplingParams (the
    plugin's per-request `kv_compression` / `kv_budget`).
    """
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids in make_prompts(workload)]
    # `extra_args_cycle`: request i gets entry i % n (mixed batches); else `extra_args` for all.
    # `logprobs`: also return each generated token's log-probability (SamplingParams.logprobs=0).
    cycle = workload.get("extra_args_cycle") or [workload.get("extra_args")]
    params = [
        SamplingParams(
            max_tokens=workload["output_len"],
            temperature=0.0,
            ignore_eos=True,
            extra_args=cycle[i % len(cycle)],
            logprobs=0 if workload.get("logprobs") else None,
        )
        for i in range(len(prompts))
    ]
    before = scrape_plugin_metrics(metrics_port) if plugin else {}

    # every 50 ms, (requests running, vllm:kv_cache_usage_perc: a share of the KV pool in [0, 1]): their
    # maxima, and their means (the average batch and KV held, hence the average footprint of a running
    # request, usage / running: the physics of a ratio)
    samples: list[tuple[float, float]] = []
    preemptions_before = sum(
        float(getattr(m, "value", 0.0)) for m in llm.get_metrics() if m.name == "vllm:num_preemptions"
    )
    preemptions = [preemptions_before]  # vLLM's counter (the engine's total so far)
    stop = threading.Event()

    def sample_running():
        while not stop.is_set():
            running = usage = 0.0
            for metric in llm.get_metrics():
                if metric.name == "vllm:num_requests_running":
                    running = float(getattr(metric, "value", 0.0))
                elif metric.name == "vllm:kv_cache_usage_perc":
                    usage = float(getattr(metric, "value", 0.0))
                elif metric.name == "vllm:num_preemptions":
                    preemptions[0] = float(getattr(metric, "value", 0.0))
            samples.append((running, usage))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_running, daemon=True)
    sampler.start()
    threads_before, host_before = thread_cpu.snapshot(), thread_cpu.host_snapshot()
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    threads_after = thread_cpu.snapshot()
    cpu = thread_cpu.busiest(threads_before, threads_after, elapsed)
    run_pids = {pid for pid, _ in threads_after}
    cpu["host"] = thread_cpu.host_usage(host_before, thread_cpu.host_snapshot(), elapsed, exclude=run_pids)
    stop.set()
    sampler.join()

    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft, tpot = [], []
    for o in outputs:
        m = getattr(o, "metrics", None)
        if m is None:
            continue
        first = getattr(m, "first_token_latency", None)
        if first:
            ttft.append(first)
        n = len(o.outputs[0].token_ids)
        last, first_ts = getattr(m, "last_token_ts", None), getattr(m, "first_token_ts", None)
        if last and first_ts and n > 1:
            tpot.append((last - first_ts) / (n - 1))
    result = {
        "workload": {k: v for k, v in workload.items()},
        "elapsed_s": elapsed,
        "num_prompts": len(prompts),
        "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / elapsed,
        "req_s": len(prompts) / elapsed,
        "max_running": max((r for r, _ in samples), default=0.0),
        "max_kv_cache_usage": max((u for _, u in samples), default=0.0),
        "mean_running": sum(r for r, _ in samples) / len(samples) if samples else None,
        "mean_kv_cache_usage": sum(u for _, u in samples) / len(samples) if samples else None,
        "preemptions": preemptions[0] - preemptions_before,
        "ttft_s": _percentiles(ttft),
        "tpot_s": _percentiles(tpot),
        "cpu": cpu,  # the busiest threads of this process and the engine's, and the host (bench/thread_cpu.py)
    }
    if plugin:
        result["plugin_metrics"] = _counter_delta(scrape_plugin_metrics(metrics_port), before)
    if return_tokens:
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
    if workload.get("logprobs"):
        result["logprobs"] = [chosen_logprobs(o.outputs[0]) for o in outputs]
    return result


def chosen_logprobs(completion) -> list[float]:
    """The log-probability of each generated token (vLLM returns the chosen one with logprobs=0)."""
    return [float(step[token].logprob) for token, step in zip(completion.token_ids, completion.logprobs or [])]


def start_engine(spec: dict) -> tuple:
    """`spec`'s engine, warm: (llm, the result's header, plugin on?, the plugin's metrics port)."""
    for key, value in (spec.get("env") or {}).items():
        os.environ[key] = str(value)
    from vllm import SamplingParams

    t_start = time.perf_counter()
    llm = build_llm(spec)
    startup_s = time.perf_counter() - t_start
    # warm-up request: the first generate pays one-off costs (sampler, graphs)
    llm.generate([{"prompt_token_ids": list(range(3, 67))}], SamplingParams(max_tokens=4), use_tqdm=False)

    compression = spec.get("compression") or {}
    import torch
    import vllm

    header: dict = {
        "name": spec.get("name"),
        "compression": spec.get("compression"),
        "startup_s": startup_s,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "vllm": vllm.__version__,
        "torch": torch.__version__,
    }
    # port None: read vLLM's registry in this process
    return llm, header, compression.get("method", "none") != "none", compression.get("metrics_port")


def run(spec: dict, result_path: Path | None = None) -> dict:
    """One engine, one or more workloads (`spec["workloads"]`, or one `spec["workload"]`).

    With `result_path`, the result so far is written after every workload, so a
    run cut short by a time limit keeps what it measured.
    """
    llm, result, plugin, port = start_engine(spec)
    single = "workloads" not in spec
    workloads = [spec["workload"]] if single else spec["workloads"]
    result["workloads"] = []
    if spec.get("profile"):  # the window starts `delay` steps into the first workload
        llm.start_profile()
    for workload in workloads:
        measured = measure(llm, spec, workload, plugin, port)
        result["workloads"].append(measured)
        if result_path is not None:
            Path(result_path).write_text(json.dumps(result))
    if spec.get("profile"):
        llm.stop_profile()  # (a no-op once `iterations` steps were profiled)
    llm.llm_engine.engine_core.shutdown()
    if single:  # the flat form of one workload (engine tests)
        flat = {**result, **result["workloads"][0]}
        del flat["workloads"]
        return flat
    return result


def serve(spec: dict, commands, results) -> None:
    """`spec`'s engine, driven a workload at a time (bench/paired.py): one JSON line on `results` once the
    engine is warm (the result's header), then for each JSON workload line read from `commands`, its
    result as one line; "stop" or the end of `commands` shuts the engine down."""
    llm, header, plugin, port = start_engine(spec)
    _send(results, header)
    for line in commands:
        if line.strip() == "stop":
            break
        _send(results, measure(llm, spec, json.loads(line), plugin, port))
    llm.llm_engine.engine_core.shutdown()


def measure(llm, spec: dict, workload: dict, plugin: bool, port: int | None) -> dict:
    """`run_workload` with the tokens returned if the workload (or else the spec) asks for them."""
    want_tokens = workload.get("return_tokens", spec.get("return_tokens", False))
    return run_workload(llm, workload, plugin=plugin, metrics_port=port, return_tokens=want_tokens)


def _send(stream, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def run_in_subprocess(spec: dict, workdir: str | Path, timeout: float = 900, partial_ok: bool = False) -> dict:
    """Run `spec` in a fresh Python process; logs go to workdir/<name>.log.

    `partial_ok`: if the process fails or times out after finishing some of its
    workloads, return those (marked `"partial": true`) instead of raising.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = spec.get("name", "run")
    spec_path, result_path, log_path = (workdir / f"{name}{s}" for s in (".spec.json", ".result.json", ".log"))
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                # this file as a script: it imports only the installed plugin and vLLM, and
                # PYTHONSAFEPATH (python -P) keeps its folder and the cwd off sys.path
                [sys.executable, str(Path(__file__).resolve()), str(spec_path), str(result_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=workdir,  # never import a source checkout from the cwd
                env={**os.environ, "PYTHONSAFEPATH": "1"},
            )
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    if returncode != 0 and partial_ok and result_path.exists():
        result = json.loads(result_path.read_text())
        result["partial"] = True
        return result
    if returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{name} failed (exit {returncode}); log tail:\n{tail}")
    return json.loads(result_path.read_text())


def main() -> None:
    if sys.argv[1] == "--serve":  # SPEC.json RESULTS_FD: bench/paired.py's engine process
        with open(int(sys.argv[3]), "w") as results:
            serve(json.loads(Path(sys.argv[2]).read_text()), sys.stdin, results)
        return
    spec = json.loads(Path(sys.argv[1]).read_text())
    result_path = Path(sys.argv[2])
    result = run(spec, result_path if "workloads" in spec else None)
    result_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
