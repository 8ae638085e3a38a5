"""Every plot of the benchmarks and the evaluation (matplotlib, written as PNG).

plot_score_vs_budget   quality: score vs budget per method, full KV as a line
plot_needle_heatmaps   quality: score by needle depth x context length per (method, budget)
plot_throughput        throughput: output tok/s ratio to stock vs budget per case
"""

from __future__ import annotations

import numpy as np

from evaluation.report import overall


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_score_vs_budget(rows: list[dict], protocol: str, path) -> None:
    plt = _pyplot()
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


def _needle_grid(rows: list[dict], method: str, budget: float, depths, lengths) -> np.ndarray:
    """Mean score per (depth, length) of one method at one budget (full KV: any budget)."""
    grid = np.full((len(depths), len(lengths)), np.nan)
    for di, d in enumerate(depths):
        for li, n in enumerate(lengths):
            vals = [
                r["score"]
                for r in rows
                if r["method"] == method
                and (method == "none" or r["budget"] == budget)
                and r["depth"] == d
                and r["context_len"] == n
            ]
            if vals:
                grid[di, li] = np.mean(vals)
    return grid


def plot_needle_heatmaps(rows: list[dict], protocol: str, path, methods=None, budgets=None) -> None:
    """Score by needle depth x context length, one panel per (method, budget); full KV first.

    methods / budgets: only these (default: every one in the rows)."""
    plt = _pyplot()
    rows = [
        r
        for r in rows
        if r["protocol"] == protocol
        and (methods is None or r["method"] in methods or r["method"] == "none")
        and (budgets is None or r["budget"] in budgets or r["method"] == "none")
    ]
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
            grid = _needle_grid(rows, method, budget, depths, lengths)
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


def plot_throughput(summary: dict, path) -> None:
    """Output tok/s of the plugin over stock vs budget (bench/throughput.py's summary): one panel for
    fraction budgets and one for token budgets (different axes), one line per case and model, and the
    footprint ratio (what KV capacity allows) dotted beside each measured line."""
    plt = _pyplot()
    panels = [
        (kind, [c for c in summary["cases"] if c["ratio_output_tok_s"] and (c["budget"] > 1) == (kind == "tokens")])
        for kind in ("fraction", "tokens")
    ]
    panels = [(kind, cases) for kind, cases in panels if cases]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, (kind, cases) in zip(axes[0], panels, strict=False):
        lines = sorted({(c["case"], str(c.get("model") or "")) for c in cases})
        for case, model in lines:
            rows = sorted((c for c in cases if (c["case"], str(c.get("model") or "")) == (case, model)),
                          key=lambda c: c["budget"])  # fmt: skip
            name = case + (f" ({_short_model(model)})" if len(lines) > len({c for c, _ in lines}) else "")
            line = ax.plot([c["budget"] for c in rows], [c["ratio_output_tok_s"] for c in rows], marker="o", label=name)
            bound = [(c["budget"], c["footprint_ratio"]) for c in rows if c.get("footprint_ratio")]
            if bound:
                ax.plot(*zip(*bound), ls=":", marker="x", color=line[0].get_color(), label=f"{name}: footprint ratio")
        ax.axhline(1.0, color="k", ls="--", lw=1, label="stock vLLM")
        ax.set_xlabel(
            "KV budget (fraction of context per layer)" if kind == "fraction" else "KV budget (tokens per layer)"
        )
        ax.set_ylabel("output tok/s, ratio to stock")
        ax.legend(fontsize=7)
    fig.suptitle("throughput vs budget (same GPU, same KV memory as stock)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short_model(model: str) -> str:
    """'random-weight llama-8b (32 layers, ...)' -> 'llama-8b'."""
    words = model.replace("(", " ").split()
    return next((w for w in words if w.startswith("llama-")), model[:24])
