"""Paired comparison of one method across two quality runs on the same prompts (issue #13, item 4).

    python -m evaluation.compare BASE.json OTHER.json --method uniform [--label layer_share=2] [--out F.json]

BASE and OTHER are `python -m evaluation` results measured on the same prompts (same tasks, lengths,
depths, samples and model) with different server options, e.g. per-layer scoring (BASE) and
`layer_share: 2` (OTHER). Each budget's rows are matched by prompt, and (OTHER - BASE) gets a paired
bootstrap 95% interval, also in units of full KV's score. Full KV's rows must agree in both files
(score for score): if they do not, the runs did not see the same prompts, or the engines differ
beyond the option compared, and the comparison is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.decision import per_prompt
from evaluation.report import paired_delta_ci


class CompareError(ValueError):
    pass


def compare(base: dict, other: dict, method: str, protocol: str = "aware") -> list[dict]:
    """Per budget measured in both: the scores, the paired delta (OTHER - BASE) and its 95% interval."""
    by_base, by_other = per_prompt(base["rows"], protocol), per_prompt(other["rows"], protocol)
    full_base, full_other = by_base.get(("none", 1.0), {}), by_other.get(("none", 1.0), {})
    if not full_base or full_base != full_other:
        raise CompareError("full KV's rows differ between the files: not the same prompts or not the same engine")
    full_mean = sum(full_base.values()) / len(full_base)
    budgets = sorted((b for m, b in by_base if m == method), reverse=True)
    out = []
    for budget in budgets:
        a, b = by_other.get((method, budget), {}), by_base.get((method, budget), {})
        if not a:
            continue
        if a.keys() != b.keys():
            raise CompareError(f"{method}@{budget:g}: the files hold different prompts")
        keys = sorted(a)
        delta, lo, hi = paired_delta_ci([a[k] for k in keys], [b[k] for k in keys])
        out.append(
            {
                "method": method,
                "budget": budget,
                "n": len(keys),
                "base_score": sum(b.values()) / len(b),
                "other_score": sum(a.values()) / len(a),
                "full_score": full_mean,
                "delta": delta,
                "ci95": [lo, hi],
                "ci95_of_full": [lo / full_mean, hi / full_mean] if full_mean else None,
            }
        )
    if not out:
        raise CompareError(f"{method} is in neither file at a common budget")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.compare", description=__doc__.split("\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("other", type=Path)
    p.add_argument("--method", default="uniform")
    p.add_argument("--label", default="other", help="what OTHER changes, e.g. layer_share=2")
    p.add_argument("--out", type=Path, help="write the comparison (and both files' provenance) here")
    args = p.parse_args(argv)
    base, other = (json.loads(path.read_text()) for path in (args.base, args.other))
    try:
        rows = compare(base, other, args.method, base.get("protocol_compared", "aware"))
    except CompareError as err:
        print(f"evaluation.compare: {err}", file=sys.stderr)
        return 2
    for r in rows:
        print(
            f"{r['method']}@{r['budget']:g}: base {r['base_score']:.3f}, {args.label} {r['other_score']:.3f}, "
            f"paired {r['delta']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] (n={r['n']})"
        )
    if args.out:
        record = {
            "model": base.get("model"),
            "label": args.label,
            "command": "python -m evaluation.compare " + " ".join(sys.argv[1:] if argv is None else argv),
            "base": {"file": args.base.name, "commit": base.get("commit"), "command": base.get("command")},
            "other": {"file": args.other.name, "commit": other.get("commit"), "command": other.get("command")},
            "device": base.get("device"),
            "versions": base.get("versions"),
            "date": other.get("date"),
            "paired": rows,
        }
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
