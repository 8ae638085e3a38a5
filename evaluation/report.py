"""Aggregate scored rows into the quality table, with bootstrap confidence intervals."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

BOOTSTRAP = 2000


def bootstrap_ci(values, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    arr = np.asarray(values, dtype=float)
    if len(arr) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), (BOOTSTRAP, len(arr)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_delta_ci(a, b, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over paired samples and its 95% bootstrap interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    lo, hi = bootstrap_ci(d, seed)
    return float(d.mean()), lo, hi


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (method, budget, task, context_len, protocol), with the full-KV score."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["budget"], r["task"], r["context_len"], r["protocol"])].append(r)
    out = []
    for (method, budget, task, length, protocol), items in sorted(groups.items(), key=lambda kv: str(kv[0])):
        full = groups.get(("none", 1.0, task, length, protocol), [])
        scores = [r["score"] for r in items]
        out.append(
            {
                "method": method,
                "budget": budget,
                "task": task,
                "context_len": length,
                "protocol": protocol,
                "n": len(items),
                "score": float(np.mean(scores)),
                "full_score": float(np.mean([r["score"] for r in full])) if full else None,
                "ci95": bootstrap_ci(scores),
                "kept_fraction": float(np.mean([r["kept_fraction"] for r in items])),
            }
        )
    return out


def overall(rows: list[dict], protocol: str) -> dict[tuple[str, float], dict]:
    """Per (method, budget): mean over every task and length, CI, and paired delta vs uniform."""
    by: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        if r["protocol"] == protocol:
            key = (r["task"], r["context_len"], r["depth"], r.get("sample", 0))
            by[(r["method"], r["budget"])][key] = r["score"]
    result = {}
    for (method, budget), scores in by.items():
        vals = [scores[k] for k in sorted(scores)]
        entry = {"score": float(np.mean(vals)), "ci95": bootstrap_ci(vals), "n": len(vals)}
        uniform = by.get(("uniform", budget))
        if uniform and method != "uniform":
            keys = sorted(set(scores) & set(uniform))
            entry["delta_vs_uniform"] = paired_delta_ci([scores[k] for k in keys], [uniform[k] for k in keys])
        result[(method, budget)] = entry
    return result


def markdown(rows: list[dict], protocols) -> str:
    lines = []
    for protocol in protocols:
        table = overall(rows, protocol)
        if not table:
            continue
        full = table.get(("none", 1.0), {}).get("score")
        lines += [
            f"### protocol: {protocol}",
            "",
            "| method | budget | score | 95% CI | vs full | vs uniform (paired, 95% CI) | n |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for (method, budget), e in sorted(table.items(), key=lambda kv: (kv[0][0] != "none", -kv[0][1], kv[0][0])):
            rel = f"{e['score'] / full:.0%}" if full else ""
            delta = ""
            if "delta_vs_uniform" in e:
                d, lo, hi = e["delta_vs_uniform"]
                delta = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            ci = f"[{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"
            lines.append(f"| {method} | {budget:g} | {e['score']:.3f} | {ci} | {rel} | {delta} | {e['n']} |")
        lines.append("")
    return "\n".join(lines)
