"""`vllm-kvcomp`: the plugin's own command line (vLLM is driven with `vllm serve`).

  vllm-kvcomp check-config configs/zigzag.yaml [--kv-compression M] [--kv-budget B]
  vllm-kvcomp bench throughput [...]                 plugin vs stock vLLM at the same KV memory (GPU)
  vllm-kvcomp eval --backend hf|vllm --model DIR [...]  quality vs full KV on RULER-style tasks
  vllm-kvcomp calibrate MODEL_DIR [...]              static per-layer budgets (method profile), CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import yaml

from vllm_kvcomp.config import METHODS, CompressionConfigError, build_config


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def check_config(args) -> int:
    try:
        config = build_config(method=args.kv_compression, budget=args.kv_budget, config_path=args.path)
    except CompressionConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print(yaml.safe_dump(config.model_dump(), sort_keys=False), end="")
    return 0


def bench(args) -> int:
    from vllm_kvcomp.bench import throughput

    return throughput.main(args.rest)


def evaluate(args) -> int:
    from tqdm import tqdm

    from vllm_kvcomp.eval.report import aggregate, markdown, plot_needle_heatmaps, plot_score_vs_budget
    from vllm_kvcomp.eval.tasks import TaskGenerator

    if args.backend == "vllm" and "agnostic" in args.protocols:
        print(
            "vllm-kvcomp eval: --backend vllm measures the query-aware protocol only (vLLM compresses the "
            "whole prompt after prefill); use --protocols aware, or --backend hf for query-agnostic",
            file=sys.stderr,
        )
        return 2
    overrides = {"metrics_port": None}
    # Scorer options (window, pooling...) are shared by every method; "none" is full KV.
    scorer = build_config(method="uniform", config_path=args.kv_compression_config, overrides=overrides)
    configs = {"none": scorer.model_copy(update={"method": "none"})}
    for method in (m for m in args.methods if m != "none"):
        for budget in args.budgets:
            configs[f"{method}@{budget:g}"] = build_config(
                method=method, budget=budget, config_path=args.kv_compression_config, overrides=overrides
            )

    if args.backend == "hf":
        from vllm_kvcomp.eval.hf_backend import HFEvaluator, run_suite

        evaluator = HFEvaluator(args.model, threads=args.threads)
        samples = TaskGenerator(evaluator.tokenizer, seed=args.seed).suite(args.tasks, args.lengths, args.depths, args.per_cell)
        bar = tqdm(total=len(samples) * len(args.protocols), desc="prefills", unit="prompt")
        rows = run_suite(evaluator, samples, configs, args.protocols, args.max_new_tokens, progress=lambda *a: bar.update())
        bar.close()
        backend = "transformers (CPU), plugin scorer/policies/block plan, masked eviction"
        device = "cpu"
    else:
        import torch

        from vllm_kvcomp.eval.vllm_backend import VLLMEvaluator, run_suite_vllm

        evaluator = VLLMEvaluator(args.model, max_model_len=max(args.lengths) + 1024, scorer=scorer)
        samples = TaskGenerator(evaluator.tokenizer, seed=args.seed).suite(args.tasks, args.lengths, args.depths, args.per_cell)
        rows, seconds = run_suite_vllm(evaluator, samples, configs, args.max_new_tokens)
        import vllm

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        backend = (
            f"vLLM {vllm.__version__} + vllm-kvcomp engine (offline LLM, per-request method/budget), "
            f"torch {torch.__version__}; {len(rows)} requests in {seconds:.0f} s, engine start {evaluator.startup_s:.0f} s"
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("quality" if args.backend == "vllm" else "quality_cpu")
    result = {
        "model": args.model_name or Path(args.model).name,
        "backend": backend,
        "device": device,
        "date": datetime.date.today().isoformat(),
        "command": "vllm-kvcomp " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "results": aggregate(rows),
        "rows": rows,
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    table = markdown(rows, args.protocols)
    header = [
        f"# Quality vs full KV: {result['model']}",
        "",
        f"Command: `{result['command']}` ({result['date']}). Device: {device}. Backend: {backend}.",
        f"Tasks {', '.join(args.tasks)}; lengths {args.lengths}; depths {args.depths}; "
        f"{args.per_cell} sample(s) per cell; exact match; means over all tasks and lengths.",
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(header) + table + "\n")
    for protocol in args.protocols:
        plot_score_vs_budget(rows, protocol, out / f"{name}_{protocol}.png")
        plot_needle_heatmaps(rows, protocol, out / f"{name}_{protocol}_heatmap.png")
    print(table)
    return 0


def calibrate(args) -> int:
    from vllm_kvcomp import calibrate as calibration

    return calibration.main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-kvcomp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a compression YAML and print the merged config")
    p.add_argument("path", nargs="?", default=None)
    p.add_argument("--kv-compression", choices=METHODS)
    p.add_argument("--kv-budget")
    p.set_defaults(func=check_config)

    p = sub.add_parser("bench", help="benchmarks on a GPU: `bench throughput --help`", add_help=False)
    p.add_argument("what", choices=["throughput"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=bench)

    p = sub.add_parser("eval", help="quality of every method vs full KV on RULER-style tasks")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers on CPU; vllm: the real engine on a GPU (query-aware only)")
    p.add_argument("--model", required=True, help="HF model folder (see ../shared/models)")
    p.add_argument("--model-name")
    p.add_argument("--tasks", type=_csv(str), default=["niah_noise", "niah_text", "niah_multikey", "vt"])
    p.add_argument("--lengths", type=_csv(int), default=[4096])
    p.add_argument("--depths", type=_csv(float), default=[0.1, 0.5, 0.9])
    p.add_argument("--per-cell", type=int, default=1)
    p.add_argument("--methods", type=_csv(str), default=["uniform", "pyramid", "zigzag", "simlayer"])
    p.add_argument("--budgets", type=_csv(float), default=[0.5, 0.25, 0.1])
    p.add_argument("--protocols", type=_csv(str), default=["agnostic", "aware"])
    p.add_argument("--kv-compression-config", default=None, help="YAML with the scorer options")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default=None, help="file stem (default: quality for vllm, quality_cpu for hf)")
    p.set_defaults(func=evaluate)

    p = sub.add_parser(
        "calibrate",
        help="measure per-layer uncertainty on sample prompts (CPU) and write a profile YAML for "
        "--kv-compression-config (method profile: static per-layer budgets)",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF model folder")
    p.add_argument("--lengths", type=_csv(int), default=[4096], help="prompt lengths in tokens (default 4096)")
    p.add_argument("--samples", type=int, default=None,
                   help="sample prompts (default 8; with --prompts: the first N, default all)")
    p.add_argument("--prompts", default=None, metavar="JSONL",
                   help='your own workload instead of --tasks/--lengths: one {"prompt": "..."} or '
                   '{"messages": [...]} object per line, optional "task" label')
    p.add_argument("--tasks", type=_csv(str), default=["niah_text", "niah_noise"],
                   help="documents of `eval` tasks, cycled over the samples (default niah_text,niah_noise)")
    p.add_argument("--tau", type=float, default=0.9, help="ZigZagKV attention-mass threshold (default 0.9)")
    p.add_argument("--window", type=int, default=32, help="observation window, last prompt queries (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="0.2", help="budget written to the profile (default 0.2)")
    p.add_argument("--min-budget-ratio", type=float, default=0.2, help="profile.min_budget_ratio (default 0.2)")
    p.add_argument("--model-name", default=None, help="name in the profile (default: the folder name)")
    p.add_argument("--out", default=None, help="default configs/profiles/<model folder name>.yaml")
    p.set_defaults(func=calibrate)

    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
