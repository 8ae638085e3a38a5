"""`vllm-kvcomp`: the plugin's own command line (vLLM is driven with `vllm serve`).

  vllm-kvcomp check-config configs/zigzag.yaml [--kv-compression M] [--kv-budget B]
  vllm-kvcomp calibrate MODEL_DIR [...]              static per-layer budgets (method profile), CPU

Benchmarks and the quality evaluation are not installed; they run from a checkout
(docs/BENCHMARKS.md): python -m bench.throughput [...], python -m evaluation [...].
"""

from __future__ import annotations

import argparse
import sys

import yaml

from vllm_kvcomp.config import CompressionConfigError, build_config, method_names

# Former subcommands, now run from a checkout: a one-line pointer instead of argparse's "invalid choice".
MOVED = {"eval": "python -m evaluation", "bench": "python -m bench.throughput"}


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


def calibrate(args) -> int:
    from vllm_kvcomp import calibrate as calibration

    return calibration.main(args)


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in MOVED:
        print(
            f"vllm-kvcomp {words[0]}: moved out of the installed package; from a checkout of the repository "
            f"run `{MOVED[words[0]]} ...` (docs/BENCHMARKS.md)",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="vllm-kvcomp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a compression YAML and print the merged config")
    p.add_argument("path", nargs="?", default=None)
    p.add_argument("--kv-compression", choices=method_names())
    p.add_argument("--kv-budget")
    p.set_defaults(func=check_config)

    p = sub.add_parser(
        "calibrate",
        help="measure per-layer uncertainty on sample prompts (CPU) and write a profile YAML for "
        "--kv-compression-config (method profile: static per-layer budgets)",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF model folder")
    p.add_argument("--lengths", type=_csv(int), default=[4096], help="prompt lengths in tokens (default 4096)")
    p.add_argument(
        "--samples", type=int, default=None, help="sample prompts (default 8; with --prompts: the first N, default all)"
    )
    p.add_argument(
        "--prompts",
        default=None,
        metavar="JSONL",
        help='your own workload instead of --tasks/--lengths: one {"prompt": "..."} or '
        '{"messages": [...]} object per line, optional "task" label',
    )
    p.add_argument(
        "--tasks",
        type=_csv(str),
        default=["niah_text", "niah_noise"],
        help="sample documents (RULER-style tasks), cycled over the samples (default niah_text,niah_noise)",
    )
    p.add_argument("--tau", type=float, default=0.9, help="ZigZagKV attention-mass threshold (default 0.9)")
    p.add_argument("--window", type=int, default=32, help="observation window, last prompt queries (default 32)")
    p.add_argument("--simlayer-recent", type=int, default=1024, help="simlayer.recent of the SimLayerKV threshold")
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
