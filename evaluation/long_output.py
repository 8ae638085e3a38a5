"""A graded long-output task for lifetime budgets (issue #12): late output depends on a few early facts.

The prompt defines a handful of rules (code words for numbers divisible by small
primes, chosen at random per prompt) inside filler text; the answer applies them
to the numbers 1..N, one line each ("17: 17", "21: KOVAR LIMES", ...), so an
answer of N = 600 lines is about 4-5k tokens. The information the answer needs
is the rules: a few dozen tokens, far below a 1024-token budget, so a compressed
KV cache can in principle keep everything needed. It is not a copy task: the
prompt holds no line of the answer.

Scored per item (line i is right iff it is exactly the rule's output for i), and
against full KV on the same prompt: the greedy-agreement curve (the share of
prompts whose compressed output still equals the full-KV output up to position
t, for t along the generated length).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

PRIMES = (3, 5, 7)
WORDS = (
    "KOVAR LIMES TORAN BELUX QUIRT ZANDO MIRFE HOLAK SEVRO DUNIK PALOR VEXIM "
    "RUTAN GOLBE NIVEX CAROM FELTA JORIN WASKO YELMU"
).split()
_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")


@dataclass
class LongOutputTask:
    rules: dict[int, str]  # divisor -> code word
    num_items: int
    prompt: str  # the user message (rules inside filler text, then the instruction)
    index: int = 0
    meta: dict = field(default_factory=dict)

    def expected(self, n: int) -> str:
        """Line n of a correct answer: the code words of n's divisors in increasing order, or n."""
        words = [self.rules[p] for p in sorted(self.rules) if n % p == 0]
        return f"{n}: {' '.join(words) if words else n}"

    def score(self, output: str) -> list[bool]:
        """Per item 1..N: is the answer's line for it exactly right (missing lines are wrong)."""
        got: dict[int, str] = {}
        for line in output.splitlines():
            match = _LINE.match(line)
            if match and int(match.group(1)) not in got:
                got[int(match.group(1))] = f"{int(match.group(1))}: {match.group(2)}"
        return [got.get(n) == self.expected(n) for n in range(1, self.num_items + 1)]


def make_task(seed: int, num_items: int = 600, filler: list[str] | None = None, index: int = 0) -> LongOutputTask:
    """One prompt: random code words for 3, 5 and 7, stated once early in `filler` sentences."""
    rng = random.Random(f"long-output-{seed}-{index}")
    words = rng.sample(WORDS, len(PRIMES))
    rules = dict(zip(PRIMES, words))
    statement = " ".join(f"Numbers divisible by {p} are marked with the code word {w}." for p, w in rules.items())
    sentences = list(filler or [])
    cut = max(1, len(sentences) // 10)  # the rules come early, then more text
    document = " ".join(sentences[:cut] + [statement] + sentences[cut:])
    instruction = (
        f"Using the marking rules stated in the text above, write one line for every number from 1 to {num_items}, "
        "in order, in the form `n: marks`, where marks are the code words of all the rules that apply to n, "
        "in the order the rules were given, separated by one space, or n itself if no rule applies. "
        "Write only these lines."
    )
    prompt = f"<text>\n{document}\n</text>\n\n{instruction}"
    return LongOutputTask(rules, num_items, prompt, index, {"seed": seed})


def item_accuracy(tasks: list[LongOutputTask], outputs: list[str], last_items: int | None = None) -> float:
    """Mean share of right items over prompts (`last_items`: only the last that many of each answer)."""
    shares = []
    for task, output in zip(tasks, outputs, strict=True):
        right = task.score(output)
        right = right[-last_items:] if last_items else right
        shares.append(sum(right) / len(right))
    return sum(shares) / len(shares)


def agreement_curve(outputs: list[list[int]], reference: list[list[int]], points: int = 16) -> list[dict]:
    """At `points` positions t along the longest reference, the share of prompts whose output equals
    the reference's first t tokens (a prompt whose reference is shorter than t counts if both agree
    to its end)."""
    longest = max((len(r) for r in reference), default=0)
    if longest == 0:
        return []
    curve = []
    for k in range(1, points + 1):
        t = max(1, round(longest * k / points))
        same = [out[: min(t, len(ref))] == ref[:t] for out, ref in zip(outputs, reference, strict=True)]
        curve.append({"position": t, "agreement": sum(same) / len(same)})
    return curve
