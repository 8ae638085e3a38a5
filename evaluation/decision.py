"""Paired comparisons against uniform and the acceptance rule of issue #13 (fixed before measuring).

Rule: a method is acceptable when
  * at every budget measured, the lower bound of the paired 95% bootstrap interval of
    (method - uniform), over the same prompts, is >= -MARGIN * full KV's score
    (non-inferior to uniform by at most 2% of full), and
  * at budget SHARE_BUDGET (0.2) its score is >= MIN_SHARE (98%) of full KV's score.

Scores are exact match per prompt; "full" is the mean over the same prompts of the
uncompressed requests (method "none"). Written into the results as `paired_vs_uniform`
and `decision` (python -m evaluation) and read by `python -m evaluation.pick`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from evaluation.report import paired_delta_ci

REFERENCE = "uniform"
MARGIN = 0.02
SHARE_BUDGET = 0.2
MIN_SHARE = 0.98
RULE = (
    f"acceptable if at every budget the paired 95% CI lower bound of (method - {REFERENCE}) "
    f">= -{MARGIN:g} x full score, and at budget {SHARE_BUDGET:g} score >= {MIN_SHARE:.0%} of full"
)


def per_prompt(rows: list[dict], protocol: str) -> dict[tuple[str, float], dict[tuple, float]]:
    """Per (method, budget): the score of each prompt (task, length, depth, sample) of `protocol`."""
    by: dict[tuple[str, float], dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        if r["protocol"] == protocol:
            by[(r["method"], r["budget"])][(r["task"], r["context_len"], r["depth"], r.get("sample", 0))] = r["score"]
    return by


def _of_full(value: float, full: float | None) -> float | None:
    return value / full if full else None


def paired_vs_uniform(rows: list[dict], protocol: str = "aware") -> list[dict]:
    """Per (method, budget), method != uniform: mean paired delta vs uniform over the prompts both
    scored, its 95% bootstrap CI, the same in units of full KV's score, n pairs, and both scores."""
    by = per_prompt(rows, protocol)
    full_scores = by.get(("none", 1.0), {})
    out = []
    for (method, budget), scores in sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        reference = by.get((REFERENCE, budget))
        if method in ("none", REFERENCE) or not reference:
            continue
        keys = sorted(set(scores) & set(reference))
        if not keys:
            continue
        delta, lo, hi = paired_delta_ci([scores[k] for k in keys], [reference[k] for k in keys])
        full_keys = [k for k in keys if k in full_scores]
        full = float(np.mean([full_scores[k] for k in full_keys])) if full_keys else None
        ci_of_full = [_of_full(lo, full), _of_full(hi, full)] if full else None
        out.append(
            {
                "method": method,
                "budget": budget,
                "delta": delta,
                "ci95": [lo, hi],
                "delta_of_full": _of_full(delta, full),
                "ci95_of_full": ci_of_full,
                "n": len(keys),
                "score": float(np.mean([scores[k] for k in keys])),
                "uniform_score": float(np.mean([reference[k] for k in keys])),
                "full_score": full,
            }
        )
    return out


def _scores(rows: list[dict], protocol: str) -> dict[tuple[str, float], float]:
    return {key: float(np.mean(list(v.values()))) for key, v in per_prompt(rows, protocol).items()}


def _non_inferior(entry: dict | None, full: float | None) -> bool:
    """CI lower bound >= -MARGIN x full (the full score of the same prompts); not measured: False."""
    if entry is None:
        return False
    reference = entry["full_score"] if entry["full_score"] is not None else full
    return reference is not None and entry["ci95"][0] >= -MARGIN * reference


def decide(rows: list[dict], paired: list[dict], protocol: str = "aware") -> dict:
    """The rule applied to each compared method: non-inferiority per budget, share of full at 0.2."""
    scores = _scores(rows, protocol)
    full = scores.get(("none", 1.0))
    budgets = sorted({b for m, b in scores if m == REFERENCE}, reverse=True)

    def share(method: str) -> float | None:
        score = scores.get((method, SHARE_BUDGET))
        return score / full if score is not None and full else None

    methods = {}
    for method in sorted({p["method"] for p in paired}):
        entries = {p["budget"]: p for p in paired if p["method"] == method}
        non_inferior = {f"{b:g}": _non_inferior(entries.get(b), full) for b in budgets}
        lowers = [entries[b]["ci95_of_full"][0] for b in budgets if b in entries and entries[b]["ci95_of_full"]]
        at = share(method)
        methods[method] = {
            "non_inferior": non_inferior,
            "worst_ci95_low_of_full": min(lowers) if lowers else None,
            f"share_of_full_at_{SHARE_BUDGET:g}": at,
            "passes": bool(non_inferior) and all(non_inferior.values()) and at is not None and at >= MIN_SHARE,
        }
    return {
        "rule": RULE,
        "reference": REFERENCE,
        "margin_of_full": MARGIN,
        "min_share_of_full": MIN_SHARE,
        "share_budget": SHARE_BUDGET,
        "full_score": full,
        f"{REFERENCE}_share_of_full_at_{SHARE_BUDGET:g}": share(REFERENCE),
        "budgets": budgets,
        "methods": methods,
    }


def decision_markdown(decision: dict) -> str:
    """The decision block as a short markdown table."""
    budgets = [f"{b:g}" for b in decision["budgets"]]
    share_key = f"share_of_full_at_{decision['share_budget']:g}"
    lines = [
        f"### decision ({decision['rule']})",
        "",
        "| method | " + " | ".join(f"non-inferior @{b}" for b in budgets) + f" | {share_key} | passes |",
        "| --- | " + " | ".join("---" for _ in budgets) + " | --- | --- |",
    ]
    for method, d in decision["methods"].items():
        share = d[share_key]
        cells = ["yes" if d["non_inferior"][b] else "no" for b in budgets]
        shown = f"{share:.1%}" if share is not None else "n/a"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {shown} | {'PASS' if d['passes'] else 'fail'} |")
    return "\n".join(lines) + "\n"
