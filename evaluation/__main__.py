"""Quality of every method vs full KV on RULER-style tasks, run from a checkout.

  python -m evaluation --backend hf --model DIR [...]     CPU: transformers + the plugin's scorer, planner, masks
  python -m evaluation --backend vllm --model DIR [...]   GPU: the real engine (query-aware protocol only)

Writes <out>/<name>.json, <name>.md and, per protocol, <name>_<protocol>.png and
<name>_<protocol>_heatmap.png (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from vllm_kvcomp.calibration_data import TaskGenerator
from vllm_kvcomp.config import build_config

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
    return p


def main(argv=None) -> int:
    from tqdm import tqdm

    from evaluation.plots import plot_needle_heatmaps, plot_score_vs_budget
    from evaluation.report import aggregate, markdown

    args = parser().parse_args(argv)
    if args.backend == "vllm" and "agnostic" in args.protocols:
        print(
            f"{PROG}: --backend vllm measures the query-aware protocol only (vLLM compresses the "
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
        from evaluation.hf_backend import HFEvaluator, run_suite

        evaluator = HFEvaluator(args.model, threads=args.threads)
        samples = TaskGenerator(evaluator.tokenizer, seed=args.seed).suite(
            args.tasks, args.lengths, args.depths, args.per_cell
        )
        bar = tqdm(total=len(samples) * len(args.protocols), desc="prefills", unit="prompt")
        rows = run_suite(
            evaluator, samples, configs, args.protocols, args.max_new_tokens, progress=lambda *a: bar.update()
        )
        bar.close()
        backend = "transformers (CPU), plugin scorer/policies/block plan, masked eviction"
        device = "cpu"
    else:
        import torch

        from evaluation.vllm_backend import VLLMEvaluator, run_suite_vllm

        evaluator = VLLMEvaluator(args.model, max_model_len=max(args.lengths) + 1024, scorer=scorer)
        samples = TaskGenerator(evaluator.tokenizer, seed=args.seed).suite(
            args.tasks, args.lengths, args.depths, args.per_cell
        )
        rows, seconds = run_suite_vllm(evaluator, samples, configs, args.max_new_tokens)
        import vllm

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        backend = (
            f"vLLM {vllm.__version__} + vllm-kvcomp engine (offline LLM, per-request method/budget), "
            f"torch {torch.__version__}; {len(rows)} requests in {seconds:.0f} s, "
            f"engine start {evaluator.startup_s:.0f} s"
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("quality" if args.backend == "vllm" else "quality_cpu")
    result = {
        "model": args.model_name or Path(args.model).name,
        "backend": backend,
        "device": device,
        "date": datetime.date.today().isoformat(),
        "command": f"{PROG} " + " ".join(sys.argv[1:] if argv is None else argv),
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


if __name__ == "__main__":
    sys.exit(main())
