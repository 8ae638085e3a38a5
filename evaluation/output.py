"""The result files of `python -m evaluation`: <name>.json, <name>.md and the plots.

<name>.json (issue #5's schema, plus issue #13's comparison):
  model, backend, device, date, command   where and how it ran
  results            per (method, budget, task, context_len, protocol): score, full_score, ci95, n...
  rows               one per (prompt, configuration, protocol): the raw scores
  paired_vs_uniform  per (method, budget): paired delta vs uniform, ci95, delta_of_full, n (decision.py)
  decision           the acceptance rule applied per method (decision.py)
  presets            the `presets` of --kv-compression-config that ran (name -> options)
  runs               one entry per invocation that added rows (a --resume'd run adds one)
Plots, per protocol: <name>_<protocol>.png (score vs budget), <name>_<protocol>_heatmap.png (every
method and budget) and <name>_<protocol>_needles.png (full KV, uniform and zigzag at one small budget:
--needles-budget, 0.1, or the smallest budget that ran).
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.decision import decide, decision_markdown, paired_vs_uniform
from evaluation.report import aggregate, markdown


def load_previous(path: Path, model: str) -> tuple[list[dict], list[dict]]:
    """(rows, runs) of an earlier result file of the same model (for --resume); none if absent."""
    if not path.exists():
        return [], []
    data = json.loads(path.read_text())
    if data.get("model") != model:
        raise ValueError(f"--resume: {path} holds results of {data.get('model')!r}, not {model!r}")
    return data.get("rows", []), data.get("runs", [])


def build_result(meta: dict, rows: list[dict], runs: list[dict], presets: dict) -> dict:
    protocol = "aware" if any(r["protocol"] == "aware" for r in rows) else "agnostic"
    paired = paired_vs_uniform(rows, protocol)
    return {
        **meta,
        "results": aggregate(rows),
        "rows": rows,
        "paired_vs_uniform": paired,
        "decision": decide(rows, paired, protocol),
        "protocol_compared": protocol,
        "presets": presets,
        "runs": runs,
    }


def write_tables(out: Path, name: str, result: dict, protocols, header_lines: list[str]) -> str:
    """<name>.json and <name>.md; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    table = markdown(result["rows"], protocols)
    decision = decision_markdown(result["decision"]) if result["decision"]["methods"] else ""
    header = [f"# Quality vs full KV: {result['model']}", "", *header_lines, ""]
    (out / f"{name}.md").write_text("\n".join(header) + table + "\n" + decision)
    return table


def write_plots(out: Path, name: str, rows: list[dict], protocols, needles_methods, needles_budget: float) -> None:
    from evaluation.plots import plot_needle_heatmaps, plot_score_vs_budget

    measured = {r["budget"] for r in rows if r["method"] != "none"}
    if measured and needles_budget not in measured:
        needles_budget = min(measured)  # the smallest budget that ran
    for protocol in protocols:
        plot_score_vs_budget(rows, protocol, out / f"{name}_{protocol}.png")
        plot_needle_heatmaps(rows, protocol, out / f"{name}_{protocol}_heatmap.png")
        plot_needle_heatmaps(
            rows, protocol, out / f"{name}_{protocol}_needles.png", methods=needles_methods, budgets=[needles_budget]
        )
