"""Pick one candidate from a quality result: `python -m evaluation.pick RESULTS.json --candidates a,b,c`.

The rule, fixed before the candidates are measured:
  1. For each candidate, take the lower bound of the paired 95% CI of (candidate - uniform) at
     every budget of the results (`paired_vs_uniform`), in units of full KV's score
     (`ci95_of_full`; the raw bound where full KV scored 0), and keep the smallest over budgets
     (the candidate's worst case against uniform).
  2. Choose the candidate whose worst case is largest.
  3. Ties (equal to 1e-9) go to the higher score at budget 0.1; remaining ties to the candidate
     named first in --candidates.
A candidate missing from the results, or not measured at one of the budgets uniform was, is an
error (exit 2): no candidate is chosen on less evidence than the others.

Prints the chosen name alone on stdout (the table of every candidate on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIE_BUDGET = 0.1
TIE_TOLERANCE = 1e-9


class PickError(ValueError):
    pass


def _lower_of_full(entry: dict) -> float:
    return entry["ci95_of_full"][0] if entry.get("ci95_of_full") else entry["ci95"][0]


def candidate_keys(result: dict, candidates: list[str]) -> dict[str, tuple[float, float | None]]:
    """Per candidate: (worst paired CI lower bound over budgets, in units of full; score at 0.1)."""
    paired = result.get("paired_vs_uniform")
    if paired is None:
        raise PickError("the results have no paired_vs_uniform list (written by python -m evaluation)")
    budgets = sorted({r["budget"] for r in result["rows"] if r["method"] == "uniform"}, reverse=True)
    if not candidates:
        raise PickError("no candidates given")
    keys = {}
    for name in candidates:
        entries = {p["budget"]: p for p in paired if p["method"] == name}
        if not entries:
            raise PickError(f"candidate {name!r} is not in the results")
        missing = [b for b in budgets if b not in entries]
        if missing:
            raise PickError(f"candidate {name!r} was not measured at budget {missing[0]:g}")
        worst = min(_lower_of_full(entries[b]) for b in budgets)
        tie = entries[TIE_BUDGET]["score"] if TIE_BUDGET in entries else None
        keys[name] = (worst, tie)
    return keys


def pick(result: dict, candidates: list[str]) -> str:
    """The chosen candidate (module docstring)."""
    keys = candidate_keys(result, candidates)
    best = max(keys[name][0] for name in candidates)
    tied = [name for name in candidates if keys[name][0] >= best - TIE_TOLERANCE]

    def tie_score(name: str) -> float:
        score = keys[name][1]
        return score if score is not None else float("-inf")

    return max(tied, key=tie_score)  # max() keeps the first of equal scores: --candidates order


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.pick", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", help="a quality_<model>.json written by python -m evaluation")
    p.add_argument("--candidates", required=True, help="comma-separated method or preset names")
    args = p.parse_args(argv)
    candidates = [c for c in args.candidates.split(",") if c]
    try:
        result = json.loads(Path(args.results).read_text())
        keys = candidate_keys(result, candidates)
        chosen = pick(result, candidates)
    except (OSError, ValueError, KeyError) as err:
        print(f"python -m evaluation.pick: {err}", file=sys.stderr)
        return 2
    for name in candidates:
        worst, tie = keys[name]
        shown = f"{tie:.3f}" if tie is not None else "n/a"
        mark = " <- chosen" if name == chosen else ""
        print(
            f"{name}: worst CI low vs uniform {worst:+.4f} of full, score@{TIE_BUDGET:g} {shown}{mark}", file=sys.stderr
        )
    print(chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
