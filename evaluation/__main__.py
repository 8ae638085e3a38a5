"""Quality of every method vs full KV on RULER-style tasks, run from a checkout.

  python -m evaluation --backend hf --model DIR [...]     CPU: transformers + the plugin's scorer, planner, masks
  python -m evaluation --backend vllm --model DIR [...]   GPU: the real engine (query-aware protocol only)

--methods takes method names and the names of presets in the --kv-compression-config YAML
(`presets:`); rows report the name given. Writes <out>/<name>.json (evaluation/output.py: results,
rows, paired_vs_uniform, decision), <name>.md and, per protocol, <name>_<protocol>.png,
<name>_<protocol>_heatmap.png and <name>_<protocol>_needles.png (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from bench.offline import current_commit
from evaluation.suite import build_configs
from vllm_kvcomp.calibration_data import TaskGenerator
from vllm_kvcomp.config import CompressionConfig

PROG = "python -m evaluation"


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backend",
        choices=["hf", "vllm"],
        default="hf",
        help="hf: transformers on CPU; vllm: the real engine on a GPU (query-aware only)",
    )
    p.add_argument("--model", required=True, help="HF model folder (see ../shared/models)")
    p.add_argument("--model-name")
    p.add_argument("--tasks", type=_csv(str), default=["niah_noise", "niah_text", "niah_multikey", "vt"])
    p.add_argument("--lengths", type=_csv(int), default=[4096])
    p.add_argument("--depths", type=_csv(float), default=[0.1, 0.5, 0.9])
    p.add_argument(
        "--per-cell", "--samples", dest="per_cell", type=int, default=1, help="prompts per (task, length, depth)"
    )
    p.add_argument(
        "--methods",
        type=_csv(str),
        default=["uniform", "pyramid", "zigzag", "simlayer"],
        help="method names, and preset names of the --kv-compression-config YAML",
    )
    p.add_argument("--budgets", type=_csv(float), default=[0.5, 0.25, 0.1])
    p.add_argument("--protocols", type=_csv(str), default=["agnostic", "aware"])
    p.add_argument("--kv-compression-config", default=None, help="YAML with the scorer options (and presets)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default=None, help="file stem (default: quality for vllm, quality_cpu for hf)")
    p.add_argument("--resume", action="store_true", help="keep the rows of <out>/<name>.json, run only the rest")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45, help="vllm: share of the GPU's memory")
    p.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs / compilation")
    p.add_argument(
        "--needles-methods",
        type=_csv(str),
        default=["uniform", "zigzag"],
        help="methods of the needles plot (beside full KV)",
    )
    p.add_argument("--needles-budget", type=float, default=0.1, help="budget of the needles plot")
    return p


def _run_hf(args, configs: dict[str, CompressionConfig], done: set):
    from tqdm import tqdm

    from evaluation.hf_backend import HFEvaluator, run_suite

    evaluator = HFEvaluator(args.model, threads=args.threads)
    samples = TaskGenerator(evaluator.tokenizer, seed=args.seed).suite(
        args.tasks, args.lengths, args.depths, args.per_cell
    )
    # --resume: a prompt is run again (every configuration) unless all its rows are there
    samples = [
        s
        for s in samples
        if any(
            (n, s.task, s.context_len, s.depth, s.meta.get("index", 0), p) not in done
            for n in configs
            for p in args.protocols
        )
    ]
    bar = tqdm(total=len(samples) * len(args.protocols), desc="prefills", unit="prompt")
    rows = run_suite(evaluator, samples, configs, args.protocols, args.max_new_tokens, progress=lambda *a: bar.update())
    bar.close()
    return rows, "transformers (CPU), plugin scorer/policies/block plan, masked eviction", "cpu", {}


def _run_vllm(args, server: CompressionConfig, configs: dict[str, CompressionConfig], done: set, save):
    import torch
    import vllm

    from evaluation.vllm_backend import VLLMEvaluator, run_suite_vllm

    evaluator = VLLMEvaluator(
        args.model,
        scorer=server,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
    )
    samples = TaskGenerator(evaluator.tokenizer, seed=args.seed).suite(
        args.tasks, args.lengths, args.depths, args.per_cell
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    backend = (
        f"vLLM {vllm.__version__} + vllm-kvcomp engine (offline LLM, per-request method/budget), "
        f"torch {torch.__version__}"
    )
    rows, seconds = run_suite_vllm(
        evaluator, samples, configs, args.max_new_tokens, done=done, on_group=lambda rows: save(rows, backend, device)
    )
    stats = {"requests": len(rows), "seconds": round(seconds, 1), "engine_start_s": round(evaluator.startup_s, 1)}
    backend += f"; {len(rows)} requests in {seconds:.0f} s, engine start {evaluator.startup_s:.0f} s"
    return rows, backend, device, stats


def package_versions() -> dict[str, str | None]:
    """Versions of what measured the rows (None where a package is not installed, e.g. vLLM on CPU)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in ("vllm", "torch", "triton", "transformers", "vllm-kvcomp"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main(argv=None) -> int:
    from evaluation.decision import decision_markdown
    from evaluation.output import build_result, load_previous, write_plots, write_tables
    from evaluation.vllm_backend import row_key

    args = parser().parse_args(argv)
    if args.backend == "vllm" and "agnostic" in args.protocols:
        print(
            f"{PROG}: --backend vllm measures the query-aware protocol only (vLLM compresses the "
            "whole prompt after prefill); use --protocols aware, or --backend hf for query-agnostic",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    name = args.name or ("quality" if args.backend == "vllm" else "quality_cpu")
    model = args.model_name or Path(args.model).name
    try:
        # Scorer options (window, pooling...) are shared by every method; "none" is full KV.
        server, configs, presets = build_configs(args.methods, args.budgets, args.kv_compression_config)
        previous, runs = load_previous(out / f"{name}.json", model) if args.resume else ([], [])
    except ValueError as err:  # CompressionConfigError is one
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    command = f"{PROG} " + " ".join(sys.argv[1:] if argv is None else argv)
    date = datetime.date.today().isoformat()
    commit, versions = current_commit(), package_versions()
    header = [
        f"Tasks {', '.join(args.tasks)}; lengths {args.lengths}; depths {args.depths}; "
        f"{args.per_cell} sample(s) per cell; exact match; means over all tasks and lengths.",
    ]

    def save(new_rows, backend, device, stats=None):
        meta = {
            "model": model,
            "backend": backend,
            "device": device,
            "date": date,
            "command": command,
            "commit": commit,
            "versions": versions,
        }
        run = {"command": command, "date": date, "commit": commit, "new_rows": len(new_rows), **(stats or {})}
        fresh = {row_key(r) for r in new_rows}
        rows = [r for r in previous if row_key(r) not in fresh] + new_rows
        result = build_result(meta, rows, [*runs, run], presets)
        lines = [f"Command: `{command}` ({date}). Device: {device}. Backend: {backend}.", *header]
        return result, write_tables(out, name, result, args.protocols, lines)

    done = {row_key(r) for r in previous}
    if args.backend == "hf":
        rows, backend, device, stats = _run_hf(args, configs, done)
    else:
        rows, backend, device, stats = _run_vllm(args, server, configs, done, save)
    result, table = save(rows, backend, device, stats)
    write_plots(out, name, result["rows"], args.protocols, args.needles_methods, args.needles_budget)
    print(table)
    if result["decision"]["methods"]:
        print(decision_markdown(result["decision"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
