"""A per-model SimLayerKV threshold, suggested by `vllm-kvcomp calibrate`.

SimLayerKV (policies/simlayer.py) calls a layer lazy when the observation window
puts more than `simlayer.threshold` of its attention on the sinks and the last
`simlayer.recent` tokens (the layer's "local mass", the statistic the engine
computes per request). The paper's 0.9 was set for Llama-3; on Qwen2.5 it marks no
layer, and simlayer then equals uniform. The local mass depends on the model,
on `recent` and on the prompt length, so calibrate measures it on the same
prompts as the profile and suggests a threshold by this rule:

  * m_l = the layer's local mass, mean over the sample prompts;
  * sort the layers by m, highest first; among the first half (at most L // 2
    lazy layers), find the largest drop between two neighbours;
  * if that drop is at least MIN_GAP (0.1 of the attention), the layers above it
    stand clearly apart: the threshold is the drop's midpoint and they are lazy;
    otherwise no layer stands out and no threshold is suggested (any threshold
    would mark an arbitrary cut of a continuum, or nothing).

`agreement` is the share of (prompt, layer) pairs whose own local mass falls on
the same side of the threshold: how stable the lazy set is across prompts.
Heuristic thresholds (MIN_GAP, half the layers): read the numbers it prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_GAP = 0.1
MAX_LAZY_SHARE = 0.5


@dataclass(frozen=True)
class LazySuggestion:
    threshold: float | None  # None: no layer stands clearly apart
    lazy_layers: list[int]
    gap: float  # the largest drop found (local mass units)
    agreement: float  # share of (prompt, layer) pairs on the threshold's side of the mean (1.0 without one)


def suggest_threshold(per_sample: np.ndarray, min_gap: float = MIN_GAP) -> LazySuggestion:
    """The rule of the module docstring, on the local mass of each sample and layer [S, L]."""
    per_sample = np.atleast_2d(np.asarray(per_sample, dtype=np.float64))
    mean = per_sample.mean(axis=0)
    num_layers = len(mean)
    most = max(1, int(num_layers * MAX_LAZY_SHARE))
    if num_layers < 2:
        return LazySuggestion(None, [], 0.0, 1.0)
    order = np.argsort(-mean, kind="stable")
    ranked = mean[order]
    drops = ranked[:most] - ranked[1 : most + 1]
    k = int(np.argmax(drops))
    gap = float(drops[k])
    if gap < min_gap:
        return LazySuggestion(None, [], gap, 1.0)
    threshold = float((ranked[k] + ranked[k + 1]) / 2)
    lazy = sorted(int(i) for i in order[: k + 1])
    agreement = float(np.mean((per_sample > threshold) == (mean > threshold)))
    return LazySuggestion(round(threshold, 4), lazy, gap, agreement)


def render(local_mass: np.ndarray | None, recent: int, num_sinks: int) -> tuple[list[str], list[str]]:
    """(header comment lines, YAML lines) for the profile; YAML only when a threshold is suggested."""
    if local_mass is None:  # not measured
        return [], []
    values = ", ".join(f"{v:.3f}" for v in np.atleast_2d(local_mass).mean(axis=0))
    found = suggest_threshold(local_mass)
    header = [f"# SimLayerKV: local mass per layer (window attention on {num_sinks} sinks + last {recent}): [{values}]"]
    if np.all(np.atleast_2d(local_mass) > 0.999):
        header.append(
            f"# SimLayerKV: every token is local in these prompts (<= {num_sinks} + {recent} tokens): calibrate "
            "with longer --lengths or a smaller --simlayer-recent to measure it."
        )
        return header, []
    if found.threshold is None:
        header.append(
            f"# SimLayerKV: no layer stands apart (largest drop {found.gap:.3f} < {MIN_GAP}): no threshold "
            "suggested; simlayer would equal uniform (vllm_kvcomp/lazy_layers.py)."
        )
        return header, []
    header.append(
        f"# SimLayerKV: suggested simlayer.threshold {found.threshold:g} (drop {found.gap:.3f}): lazy layers "
        f"{found.lazy_layers}; same side in {100 * found.agreement:.0f}% of (prompt, layer) pairs."
    )
    return header, ["simlayer:", f"  threshold: {found.threshold:g}", f"  recent: {recent}"]
