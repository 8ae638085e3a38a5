"""`vllm-kvcomp calibrate MODEL_DIR`: static per-layer budget weights (method "profile").

Runs sample prompts (the RULER-style documents of `calibration_data.py`, chat-formatted,
document + question as `vllm serve` sees them; or your own, `--prompts FILE.jsonl`)
through transformers on CPU, captures each layer's observation-window queries
(`hf_prefill.py`), and measures ZigZagKV's layer uncertainty exactly as the engine does per request:
the window attention mass per KV head (`kernels/reference.py`), MBA per head
(`scoring.head_statistics`: fewest tokens holding `tau` of the mass), LMBA_l =
mean over KV heads. Per sample u_l = LMBA_l / sum_l LMBA_l (ZigZagKV's
normalization, so long and short prompts count the same); the profile's weight
of layer l is the mean over samples of L * u_l (mean 1.0 over layers).

The YAML written (default configs/profiles/<model folder>.yaml) is a complete
`--kv-compression-config`: method profile, budget, the weights, and a header
with the per-layer spread and the standard deviation of each weight across
samples. A large spread across samples means the layers' needs depend on the
prompt: per-request zigzag then adapts better than a static profile. The header
says how much of the flexible budget (B_avg - B_min per layer) per-request zigzag
would place on other layers than the profile (< 10%: stable, > 25%: use zigzag;
heuristic thresholds), next to how far the profile is from uniform budgets.
It also measures each layer's SimLayerKV local mass on the same prompts and
suggests a per-model `simlayer.threshold` (the rule: vllm_kvcomp/lazy_layers.py),
written as the profile's `simlayer` section when one is found.
"""

from __future__ import annotations

import datetime
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vllm_kvcomp.calibration_data import TASKS, PromptsFileError, load_prompts, sample_prompts
from vllm_kvcomp.config import CompressionConfig, CompressionConfigError, build_config, parse_budget
from vllm_kvcomp.lazy_layers import render as render_lazy

DEFAULT_TASKS = ("niah_text", "niah_noise")
PROFILES_DIR = Path("configs") / "profiles"
# Heuristic thresholds on `Calibration.budget_moved`, the share of the flexible
# budget that per-request zigzag would place differently from the profile.
STABLE_BELOW = 0.10
UNSTABLE_ABOVE = 0.25


@dataclass
class Calibration:
    """Per-sample layer uncertainty of one model; weights have mean 1.0 over layers."""

    model: str
    per_sample: np.ndarray  # [S, L], each row L * u_l (mean 1.0)
    prompt_tokens: list[int] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    local_mass: np.ndarray | None = None  # [S, L] SimLayerKV local mass (sinks + last simlayer_recent)
    simlayer_recent: int = 1024

    @property
    def num_layers(self) -> int:
        return int(self.per_sample.shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.per_sample.shape[0])

    @property
    def weights(self) -> np.ndarray:
        """Mean over samples of L * u_l (mean 1.0, since every row has mean 1.0)."""
        return self.per_sample.mean(axis=0)

    @property
    def stddev(self) -> np.ndarray:
        """Standard deviation of each layer's weight across samples (0 for one sample)."""
        if self.num_samples < 2:
            return np.zeros(self.num_layers)
        return self.per_sample.std(axis=0, ddof=1)

    @property
    def relative_stddev(self) -> float:
        """Mean over layers of stddev / weight: how much a layer's share moves between prompts."""
        w = self.weights
        return float(np.mean(self.stddev / np.maximum(w, 1e-12)))

    @property
    def budget_moved(self) -> float:
        """Mean over samples of the share of the flexible budget (L * (B_avg - B_min))
        that per-request zigzag would place on other layers than the profile:
        0.5 * sum_l |u_l(sample) - u_l(profile)|, with u = w / L."""
        shares = self.per_sample / self.num_layers
        return float(np.mean(0.5 * np.abs(shares - self.weights / self.num_layers).sum(axis=1)))

    @property
    def uniform_moved(self) -> float:
        """The same distance between the profile and uniform budgets (how far from flat it is)."""
        return float(0.5 * np.abs(self.weights / self.num_layers - 1 / self.num_layers).sum())

    def by_task(self) -> dict[str, tuple[int, float, float]]:
        """Per task: (samples, zigzag's moved share within the task vs the task's own mean
        profile, distance of that task profile from the overall one). Small within-task
        and large between-task numbers mean: calibrate on your own workload."""
        out = {}
        for task in sorted(set(self.tasks)):
            rows = self.per_sample[[i for i, t in enumerate(self.tasks) if t == task]]
            mean = rows.mean(axis=0)
            within = float(np.mean(0.5 * np.abs(rows - mean).sum(axis=1))) / self.num_layers
            between = float(0.5 * np.abs(mean - self.weights).sum()) / self.num_layers
            out[task] = (len(rows), within, between)
        return out

    def verdict(self) -> str:
        if self.num_samples < 2:
            return "one sample only: stability unknown, calibrate with more --samples"
        moved = self.budget_moved
        if moved < STABLE_BELOW:
            return "stable across prompts: a static profile is a good fit"
        if moved > UNSTABLE_ABOVE:
            return "varies a lot across prompts: per-request zigzag is likely better than a static profile"
        return (
            "moderately stable: a profile fits one model and one workload; compare it with zigzag "
            "on your prompts (python -m evaluation, from a checkout)"
        )


def layer_statistics(mass: list[torch.Tensor], prompt_len: int, tau: float, num_sinks: int, recent: int):
    """Per layer, the mean over KV heads of each layer's window mass [Hkv, P]: LMBA_l (ZigZagKV's
    MBA at `tau`) and SimLayerKV's local mass (on the first `num_sinks` and last `recent` tokens),
    in one pass over the stacked layers, as `planner.LayerStats` (`mba`, `local_mass`)."""
    from vllm_kvcomp.planner import layer_stats
    from vllm_kvcomp.scoring import head_statistics

    lens = torch.full((len(mass),), prompt_len)
    mba, local = head_statistics(torch.stack(mass), lens, tau=tau, num_sinks=num_sinks, local_recent=recent)
    return layer_stats(mba, local)


def normalized_weights(lmba: np.ndarray) -> np.ndarray:
    """ZigZagKV's u_l = LMBA_l / sum LMBA, scaled by L (mean 1.0)."""
    lmba = np.maximum(np.asarray(lmba, dtype=np.float64), 0.0)
    total = lmba.sum()
    if total <= 0:
        return np.ones_like(lmba)
    return len(lmba) * lmba / total


def calibrate(
    model_dir: str,
    *,
    prompts_file: str | Path | None = None,
    tasks=DEFAULT_TASKS,
    lengths=(4096,),
    samples: int | None = None,
    tau: float = 0.9,
    window: int = 32,
    threads: int | None = None,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = True,
    simlayer_recent: int = 1024,
) -> Calibration:
    """Prefill the sample prompts and measure every layer's uncertainty.

    With `prompts_file` the prompts are read from it (`load_prompts`; the first
    `samples` of them, all if `samples` is None); otherwise `samples` generated
    task prompts (default 8) of the given `lengths`.
    """
    from tqdm import tqdm

    from vllm_kvcomp.hf_prefill import HFPrefiller

    scorer = build_config(
        method="zigzag",
        overrides={"window": window, "num_recent": max(64, window), "zigzag": {"tau": tau}, "metrics_port": None},
    )
    t0 = time.time()
    evaluator = HFPrefiller(model_dir, threads=threads)
    if prompts_file is not None:
        prompts = load_prompts(prompts_file, evaluator.tokenizer)[:samples]
    else:
        prompts = sample_prompts(evaluator.tokenizer, list(tasks), list(lengths), samples or 8, seed)
    rows, tokens, names, local = [], [], [], []
    bar = tqdm(prompts, desc="calibrate", unit="prompt", disable=not progress, file=sys.stderr)
    for task, _length, text in bar:
        _cache, pre = evaluator.prefill(text, scorer)
        del _cache
        stats = layer_statistics(
            pre.mass, pre.prompt_len, scorer.section("zigzag").tau, scorer.num_sinks, simlayer_recent
        )
        rows.append(normalized_weights(stats.mba))
        local.append(stats.local_mass)
        tokens.append(pre.prompt_len)
        names.append(task)
        bar.set_postfix(tokens=pre.prompt_len, task=task)
    bar.close()
    return Calibration(
        model=model_name or Path(model_dir).name,
        per_sample=np.stack(rows),
        prompt_tokens=tokens,
        tasks=names,
        seconds=time.time() - t0,
        local_mass=np.stack(local),
        simlayer_recent=simlayer_recent,
    )


def _fmt(values, digits: int = 3) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def render_profile(
    cal: Calibration,
    *,
    budget: float = 0.2,
    min_budget_ratio: float = 0.2,
    source: str,
    settings: str = "",
) -> str:
    """The profile YAML: a commented header, then a complete compression config."""
    w, sd, tasks = cal.weights, cal.stddev, cal.by_task()
    simlayer = render_lazy(cal.local_mass, cal.simlayer_recent, CompressionConfig().num_sinks)
    lo, hi = int(np.argmin(w)), int(np.argmax(w))
    lines = [
        f"# vllm-kvcomp calibration profile for {cal.model} (method: profile).",
        f"# Written by `{source}`",
        f"# on {datetime.date.today().isoformat()}: {cal.num_samples} sample prompt(s) "
        f"({', '.join(sorted(set(cal.tasks)))}; {min(cal.prompt_tokens)}-{max(cal.prompt_tokens)} tokens)"
        f"{'; ' + settings if settings else ''}; {cal.seconds:.0f} s on CPU.",
        "#",
        "# layer_weights: ZigZagKV layer uncertainty (MBA over the observation window),",
        "# normalized per sample to mean 1.0 over the layers and averaged over samples.",
        "# Layer l keeps B_min + (B_avg - B_min) * L * w_l / sum(w) tokens, B_min = min_budget_ratio * B_avg.",
        f"# Spread: min {w[lo]:.3f} (layer {lo}), max {w[hi]:.3f} (layer {hi}), "
        f"max/min {w[hi] / max(w[lo], 1e-12):.2f}.",
        f"# Stddev of each weight across samples: {_fmt(sd)}",
        f"# Stability: per-request zigzag would place {100 * cal.budget_moved:.1f}% of the flexible budget "
        "(B_avg - B_min per layer)",
        f"# on other layers than this profile (mean over samples); uniform budgets differ from it by "
        f"{100 * cal.uniform_moved:.1f}%. Mean stddev/weight {cal.relative_stddev:.3f}.",
        *(
            f"# Task {task} ({n} samples): zigzag would move {100 * within:.1f}% within the task; "
            f"its own profile is {100 * between:.1f}% from this one."
            for task, (n, within, between) in (tasks.items() if len(tasks) > 1 else ())
        ),
        f"# Verdict: {cal.verdict()}.",
        *simlayer[0],
        "# Use: vllm serve MODEL --kv-compression-config THIS_FILE [--kv-budget B]",
        "method: profile",
        f"budget: {budget:g}",
        "profile:",
        "  layer_weights:",
    ]
    lines += [f"    - {v:.4f}  # layer {i}, stddev {s:.3f}" for i, (v, s) in enumerate(zip(w, sd))]
    lines += [
        f"  min_budget_ratio: {min_budget_ratio:g}",
        f"  model: {json.dumps(cal.model)}",
        f"  source: {json.dumps(source)}",
        *simlayer[1],
        "",
    ]
    return "\n".join(lines)


def write_profile(path: str | Path, text: str) -> CompressionConfig:
    """Write the profile and load it back the way `--kv-compression-config` will."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return build_config(config_path=path)


def _argument_error(args) -> str | None:
    """What is wrong with the command line, checked before the (slow) prefills; None if nothing."""
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        return f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}"
    if (args.samples is not None and args.samples < 1) or not args.lengths or min(args.lengths) < 256:
        return "need --samples >= 1 and --lengths of at least 256 tokens"
    if args.prompts is not None and not Path(args.prompts).is_file():
        return f"--prompts: no such file: {args.prompts}"
    if not (0 < args.tau < 1) or args.window < 1 or args.simlayer_recent < 1:
        return "need 0 < --tau < 1, --window >= 1 and --simlayer-recent >= 1"
    if not Path(args.model_dir, "config.json").is_file():
        return f"{args.model_dir} is not a Hugging Face model folder (no config.json)"
    return None


def main(args) -> int:
    """The `calibrate` subcommand (argparse namespace from cli.py)."""
    error = _argument_error(args)
    if error:
        print(f"vllm-kvcomp calibrate: {error}", file=sys.stderr)
        return 2
    try:
        budget = parse_budget(args.budget)
        # Fail on a bad budget / ratio before the (slow) prefills.
        build_config(
            method="uniform",
            budget=budget,
            overrides={"profile": {"min_budget_ratio": args.min_budget_ratio}, "metrics_port": None},
        )
    except CompressionConfigError as err:
        print(err, file=sys.stderr)
        return 2
    model_name = args.model_name or Path(args.model_dir.rstrip("/")).name
    out = Path(args.out) if args.out else PROFILES_DIR / f"{model_name}.yaml"
    argv = sys.argv[1:] if args.argv is None else args.argv
    source = "vllm-kvcomp " + shlex.join(argv)

    try:
        cal = calibrate(
            args.model_dir,
            prompts_file=args.prompts,
            tasks=args.tasks,
            lengths=args.lengths,
            samples=args.samples,
            tau=args.tau,
            window=args.window,
            threads=args.threads,
            seed=args.seed,
            model_name=model_name,
            simlayer_recent=args.simlayer_recent,
        )
    except PromptsFileError as err:
        print(f"vllm-kvcomp calibrate: {err}", file=sys.stderr)
        return 2
    settings = f"tau {args.tau:g}, window {args.window}, seed {args.seed}"
    text = render_profile(cal, budget=budget, min_budget_ratio=args.min_budget_ratio, source=source, settings=settings)
    try:
        config = write_profile(out, text)
    except CompressionConfigError as err:
        print(f"vllm-kvcomp calibrate: wrote {out} but it does not load: {err}", file=sys.stderr)
        return 1
    w = np.asarray(config.section("profile").layer_weights)
    assert len(w) == cal.num_layers and math.isclose(float(w.mean()), 1.0, abs_tol=1e-3)
    print(
        f"wrote {out}: {cal.num_layers} layers, weights {w.min():.3f}-{w.max():.3f} "
        f"(across {cal.num_samples} samples zigzag would move {100 * cal.budget_moved:.1f}% of the flexible "
        f"budget, uniform {100 * cal.uniform_moved:.1f}%: {cal.verdict()}); "
        f"{cal.seconds:.0f} s"
    )
    print(f"use it with: vllm serve {args.model_dir} --kv-compression-config {out}")
    return 0
