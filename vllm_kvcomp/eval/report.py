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
            lines.append(
                f"| {method} | {budget:g} | {e['score']:.3f} | [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] | {rel} | {delta} | {e['n']} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_score_vs_budget(rows: list[dict], protocol: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = overall(rows, protocol)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    full = table.get(("none", 1.0))
    for method in sorted({m for m, _ in table if m != "none"}):
        pts = sorted((b, e) for (m, b), e in table.items() if m == method)
        xs = [b for b, _ in pts]
        ys = [e["score"] for _, e in pts]
        err = np.array([[e["score"] - e["ci95"][0], e["ci95"][1] - e["score"]] for _, e in pts]).T
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
    if full:
        ax.axhline(full["score"], color="k", ls="--", lw=1, label="full KV")
    ax.set_xlabel("KV budget (fraction of prompt per layer)")
    ax.set_ylabel("exact-match score")
    ax.set_title(f"score vs budget ({protocol})")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_needle_heatmaps(rows: list[dict], protocol: str, path) -> None:
    """Score by needle depth x context length, one panel per (method, budget); full KV first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["protocol"] == protocol]
    if not rows:
        return
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["context_len"] for r in rows})
    methods = ["none"] + sorted({r["method"] for r in rows} - {"none"})
    budgets = sorted({r["budget"] for r in rows if r["method"] != "none"}, reverse=True) or [1.0]
    fig, axes = plt.subplots(
        len(methods),
        len(budgets),
        figsize=(1.6 + 2.2 * len(budgets), 0.8 + 2.0 * len(methods)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for i, method in enumerate(methods):
        for j, budget in enumerate(budgets):
            ax = axes[i][j]
            if method == "none" and j > 0:
                ax.axis("off")
                continue
            grid = np.full((len(depths), len(lengths)), np.nan)
            for di, d in enumerate(depths):
                for li, n in enumerate(lengths):
                    vals = [
                        r["score"]
                        for r in rows
                        if r["method"] == method and (method == "none" or r["budget"] == budget)
                        and r["depth"] == d and r["context_len"] == n
                    ]
                    if vals:
                        grid[di, li] = np.mean(vals)
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for di in range(len(depths)):
                for li in range(len(lengths)):
                    if not np.isnan(grid[di, li]):
                        ax.text(li, di, f"{grid[di, li]:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title("full KV" if method == "none" else f"{method} @ {budget:g}", fontsize=8)
            if j == 0:
                ax.set_ylabel("needle depth", fontsize=7)
            if i == len(methods) - 1:
                ax.set_xlabel("context length", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="exact-match score")
    fig.suptitle(f"needle heatmaps ({protocol}; mean over tasks)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
