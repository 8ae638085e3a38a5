"""Host cost of the scheduler's side of a decode step: stock vLLM's scheduler against the plugin's.

    python -m bench.scheduler_step_cost --out bench/results/lifetime/scheduler_step_cost.json

The 1B shape's decode step is host-bound (bench/results/lifetime/h200_same_batch_ab/): the engine's main
thread schedules, prepares the batch and launches the graph, and every microsecond of it is the step's.
At the same batch the plugin's step was slower than stock's, also at budget 1.0 where nothing is
scored. This times the part that runs in vLLM's scheduler: `schedule()` and `update_from_output()`
for R running decode requests (one token each), driven as EngineCore drives an async scheduler (one
step in flight), with vLLM 0.25.1's real classes on this CPU:

* stock: `AsyncScheduler` over `FullAttentionSpec` (what `vllm serve` runs without the plugin);
* the plugin: `AsyncCompressionScheduler` over `CompressedAttentionSpec` (its KV manager with growth
  bounds, the compression report hook), with requests at budget 1.0 (`kv_budget` 1.0) and at a token
  budget (`kv_budget` 1024: bounded admission; no decode evictions happen here: no worker reports them).

The worker's side (the runner's hooks, the runtime's `begin_step` / `layer_tables` / `end_step`) is not
in it; `bench/decode_host_cost.py` replays part of that. Each configuration: the fastest of `--repeats`
runs of `--steps` decode steps, in µs per step.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import offline

BS = 16
CONFIG_MAKER = """
import json, pickle, sys
import vllm.platforms as platforms
from vllm.platforms.cpu import CpuPlatform
platforms._current_platform = CpuPlatform()  # before vLLM's config modules capture the platform
from vllm.engine.arg_utils import EngineArgs
model, out, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(model + "/config.json", "w") as f:  # the 1B shape's attention (16 layers, 8 KV heads of 64)
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
               "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
               "num_hidden_layers": 16, "vocab_size": 128256, "max_position_embeddings": max_len}, f)
args = EngineArgs(model=model, skip_tokenizer_init=True, max_model_len=max_len, block_size=16, max_num_seqs=256,
                  max_num_batched_tokens=8192, enable_prefix_caching=False)
with open(out, "wb") as f:
    pickle.dump(args.create_engine_config(), f)
"""


def vllm_config_bytes(max_len: int) -> bytes:
    """vLLM's real VllmConfig, pickled, built in a fresh process on the CPU platform (as
    tests/engine/test_scheduler.py); `pickle.loads` gives each scheduler a fresh copy."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "config.pkl"
        cmd = [sys.executable, "-c", CONFIG_MAKER, work, str(out), str(max_len)]
        subprocess.run(cmd, check=True, timeout=300, capture_output=True)
        return out.read_bytes()


def make_scheduler(config_bytes: bytes, num_blocks: int, plugin: bool):
    import torch
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.structured_output import StructuredOutputManager

    import vllm_kvcomp
    from vllm_kvcomp.engine.kv_cache import CompressedAttentionSpec
    from vllm_kvcomp.engine.scheduler import AsyncCompressionScheduler

    vllm_kvcomp.register()
    config = pickle.loads(config_bytes)
    config.cache_config.num_gpu_blocks = num_blocks
    config.additional_config = {"kv_compression": {"method": "uniform", "evict_every": 128}} if plugin else {}
    spec_cls = CompressedAttentionSpec if plugin else FullAttentionSpec
    spec = spec_cls(block_size=BS, num_kv_heads=8, head_size=64, dtype=torch.bfloat16)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(16)]
    kv = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=spec.page_size_bytes * num_blocks, shared_by=[n]) for n in names],
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
    )
    cls = AsyncCompressionScheduler if plugin else AsyncScheduler
    som = StructuredOutputManager(config)
    return cls(vllm_config=config, kv_cache_config=kv, structured_output_manager=som, block_size=BS, log_stats=True)


def time_steps(scheduler, requests: int, prompt: int, extra_args: dict | None, steps: int) -> float:
    """µs per decode step (schedule + update_from_output) once all `requests` decode."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    for i in range(requests):
        params = SamplingParams(max_tokens=steps + 64, ignore_eos=True, extra_args=extra_args)
        scheduler.add_request(Request(f"r{i}", list(range(3, 3 + prompt)), params, None, arrival_time=float(i)))

    def output(out):
        ids = list(out.num_scheduled_tokens)
        return ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=[[7] for _ in ids]
        )

    in_flight = None
    elapsed, timed = 0.0, 0
    while timed < steps:
        start = time.perf_counter()
        out = scheduler.schedule()
        if in_flight is not None:  # one step in flight, as EngineCore runs an async scheduler
            scheduler.update_from_output(*in_flight)
        decoding = len(out.num_scheduled_tokens) == requests and all(n == 1 for n in out.num_scheduled_tokens.values())
        if decoding:
            elapsed += time.perf_counter() - start
            timed += 1
        in_flight = (out, output(out))
    return elapsed / steps * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    max_len = args.prompt + args.steps + 256
    num_blocks = args.requests * (max_len // BS + 2) + 1
    cases = {
        "stock": (False, None),
        "plugin@1.0": (True, {"kv_budget": 1.0}),
        "plugin@1024": (True, {"kv_budget": 1024}),
    }
    config = vllm_config_bytes(max_len)
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # the cases in turn, so that a drift of this host spreads over all of them
        for name, (plugin, extra) in cases.items():
            scheduler = make_scheduler(config, num_blocks, plugin)
            runs[name].append(time_steps(scheduler, args.requests, args.prompt, extra, args.steps))
    result = {name: {"us_per_step": min(times), "runs": times} for name, times in runs.items()}
    for name, row in result.items():
        times = ", ".join(f"{t:.1f}" for t in row["runs"])
        print(f"[scheduler_step_cost] {name}: {row['us_per_step']:.1f} µs per step (runs {times})")
    import vllm

    report = {
        "command": "python -m bench.scheduler_step_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": offline.current_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": offline.cpu_name(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "requests": args.requests,
        "prompt": args.prompt,
        "steps": args.steps,
        "results": result,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
