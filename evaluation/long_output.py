"""A graded long-output task for lifetime budgets (issue #12): late output depends on a few early facts.

The prompt names the ten digits with random code words (stated once, early, in
filler text); the answer applies them to the numbers 1..N, one line each, the
name of the number's last digit ("17: HOLAK", "20: MIRFE", ...), so an answer of
N = 800 lines is about 9k tokens with Qwen2.5's tokenizer (digits are single
tokens). The information the answer needs is the ten names: about 70 tokens,
far below a 1024-token budget, so a compressed KV cache can in principle keep
everything needed; it is not a copy task (the prompt holds
no line of the answer). A first version (code words for divisibility by 3, 5
and 7) was beyond Qwen2.5-Coder-0.5B even with full KV (2 of 40 items, CPU);
this one is a lookup it can do.

Checked on CPU with Qwen2.5-Coder-0.5B and full KV (transformers, greedy, 60 items, 1.2k-token
prompts): 60 of 60 items right on one prompt; on another it stopped after 10 lines (end of
sequence), so generate with `ignore_eos` and `max_tokens = answer_tokens(task, tokenizer)`.

Scored per item (line i is right iff it is exactly the rule's output for i), and
against full KV on the same prompt: the greedy-agreement curve (the share of
prompts whose compressed output still equals the full-KV output up to position
t, for t along the generated length).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

DIGITS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 0)  # stated in this order: item n's name follows the list
WORDS = (
    "KOVAR LIMES TORAN BELUX QUIRT ZANDO MIRFE HOLAK SEVRO DUNIK PALOR VEXIM "
    "RUTAN GOLBE NIVEX CAROM FELTA JORIN WASKO YELMU"
).split()
_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")


@dataclass
class LongOutputTask:
    rules: dict[int, str]  # digit -> code word
    num_items: int
    prompt: str  # the user message (rules inside filler text, then the instruction)
    index: int = 0
    meta: dict = field(default_factory=dict)

    def expected(self, n: int) -> str:
        """Line n of a correct answer: n and the code word of its last digit."""
        return f"{n}: {self.rules[n % 10]}"

    def score(self, output: str) -> list[bool]:
        """Per item 1..N: is the answer's line for it exactly right (missing lines are wrong)."""
        got: dict[int, str] = {}
        for line in output.splitlines():
            match = _LINE.match(line)
            if match and int(match.group(1)) not in got:
                got[int(match.group(1))] = f"{int(match.group(1))}: {match.group(2)}"
        return [got.get(n) == self.expected(n) for n in range(1, self.num_items + 1)]


def make_task(seed: int, num_items: int = 800, filler: list[str] | None = None, index: int = 0) -> LongOutputTask:
    """One prompt: random code words for the ten digits, stated once early in `filler` sentences."""
    rng = random.Random(f"long-output-{seed}-{index}")
    words = rng.sample(WORDS, len(DIGITS))
    rules = dict(zip(DIGITS, words))
    statement = " ".join(f"The digit {d} is called {w}." for d, w in rules.items())
    sentences = list(filler or [])
    cut = max(1, len(sentences) // 10)  # the rules come early, then more text
    document = " ".join(sentences[:cut] + [statement] + sentences[cut:])
    instruction = (
        f"Using the digit names defined in the text above, write one line for every number from 1 to {num_items}, "
        "in order, in the form `n: NAME` where NAME is the name of the last digit of n. Write only these lines."
    )
    prompt = f"<text>\n{document}\n</text>\n\n{instruction}"
    return LongOutputTask(rules, num_items, prompt, index, {"seed": seed})


def expected_answer(task: LongOutputTask) -> str:
    """The whole correct answer, one line per item."""
    return "\n".join(task.expected(n) for n in range(1, task.num_items + 1))


def answer_tokens(task: LongOutputTask, tokenizer=None, margin: float = 1.15) -> int:
    """A generation length that holds a whole answer: the correct answer's token count (by `tokenizer`,
    whose splitting of numbers and code words sets it: Qwen2.5 spends about 11 tokens on "734: HOLAK"),
    plus `margin` for spacing the model may add. Without a tokenizer, 12 tokens per line.

    The first GPU run used 6 tokens per line: every answer was cut at about half its items."""
    if tokenizer is None:
        return int(task.num_items * 12 * margin) + 32
    return int(len(tokenizer.encode(expected_answer(task), add_special_tokens=False)) * margin) + 32


def item_accuracy(tasks: list[LongOutputTask], outputs: list[str], last_items: int | None = None) -> float:
    """Mean share of right items over prompts (`last_items`: only the last that many of each answer)."""
    shares = prompt_accuracies(tasks, outputs, last_items)
    return sum(shares) / len(shares)


def prompt_accuracies(tasks: list[LongOutputTask], outputs: list[str], last_items: int | None = None) -> list[float]:
    """Per prompt, the share of right items (the pairs of a paired interval against full KV)."""
    shares = []
    for task, output in zip(tasks, outputs, strict=True):
        right = task.score(output)
        right = right[-last_items:] if last_items else right
        shares.append(sum(right) / len(right))
    return shares


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
