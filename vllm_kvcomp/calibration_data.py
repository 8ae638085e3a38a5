"""Sample documents: RULER-style synthetic long-context tasks, generated offline and deterministically.

`vllm-kvcomp calibrate` measures the layers on these prompts by default
(`sample_prompts`), or on the user's own (`load_prompts`, a JSONL file); the
evaluation harness (`evaluation/`, run from a checkout) scores the same tasks.
Each sample is a document (the part that gets compressed), a question asked after
it, and the accepted answers. Tasks (after RULER, Hsieh et al. 2024):

  niah_noise    one needle ("One of the special magic numbers for <key> is: <7 digits>.")
                in repeated filler sentences
  niah_text     the same needle in natural text (Python's standard-library docstrings)
  niah_multikey four needles with different keys in text; the question asks for one
  vt            variable tracking: a chain VAR A = 12345, VAR B = VAR A, ... in filler;
                name every variable holding the value

Lengths are in tokens of the model's tokenizer; needles sit at evenly spread depths.
"""

from __future__ import annotations

import importlib
import json
import pydoc
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASKS = ("niah_noise", "niah_text", "niah_multikey", "vt")
STDLIB = (
    "argparse asyncio collections csv datetime decimal email functools http.client itertools json logging "
    "pathlib random re shutil socket sqlite3 statistics string subprocess tarfile textwrap threading "
    "unittest urllib.request uuid zipfile"
).split()


@dataclass(frozen=True)
class Sample:
    task: str
    context_len: int
    depth: float
    document: str
    question: str
    answers: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    def score(self, output: str) -> float:
        """Exact match: the share of expected answers present in the output."""
        return sum(a in output for a in self.answers) / len(self.answers)


def _stdlib_text() -> str:
    texts = []
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        texts.append(pydoc.getdoc(mod))
        for attr in sorted(dir(mod)):
            doc = getattr(getattr(mod, attr), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200 and not attr.startswith("_"):
                texts.append(doc)
    return re.sub(r"\s+", " ", " ".join(texts))


class TaskGenerator:
    """Builds samples whose documents fill `context_len` tokens of `tokenizer`."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        self._text_ids: list[int] | None = None  # the stdlib text, tokenized once

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _filler(self, kind: str, num_tokens: int) -> list[str]:
        """Filler split into sentences, about `num_tokens` tokens in total."""
        if kind == "noise":
            per = self._count(NOISE)
            return [NOISE] * max(1, num_tokens // per)
        if self._text_ids is None:
            self._text_ids = self.tokenizer(_stdlib_text(), add_special_tokens=False)["input_ids"]
        ids = self._text_ids[:num_tokens]
        text = self.tokenizer.decode(ids)
        return [s + " " for s in re.split(r"(?<=[.!?]) ", text)]

    @staticmethod
    def _insert(sentences: list[str], items: list[str], depths: list[float]) -> str:
        out = list(sentences)
        for item, depth in sorted(zip(items, depths, strict=True), key=lambda x: -x[1]):
            out.insert(int(len(out) * depth), item + " ")
        return "".join(out)

    def sample(self, task: str, context_len: int, depth: float, index: int = 0) -> Sample:
        rng = random.Random(f"{self.seed}-{task}-{context_len}-{depth}-{index}")
        words = ["apple", "river", "violet", "copper", "falcon", "meadow", "lantern", "harbor", "ember", "quartz"]
        if task in ("niah_noise", "niah_text", "niah_multikey"):
            keys = rng.sample(words, 4 if task == "niah_multikey" else 1)
            values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
            needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
            budget = context_len - sum(self._count(n) for n in needles) - 16
            filler = self._filler("noise" if task == "niah_noise" else "text", budget)
            depths = [depth] + [rng.uniform(0.05, 0.95) for _ in needles[1:]]
            document = self._insert(filler, needles, depths)
            question = (
                f"What is the special magic number for {keys[0]} mentioned in the document? "
                "Answer with the number only."
            )
            return Sample(task, context_len, depth, document, question, (values[0],), {"keys": keys, "index": index})
        if task == "vt":
            value = str(rng.randrange(10_000, 100_000))
            names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
            chain = [f"VAR {names[0]} = {value}."] + [
                f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)
            ]
            budget = context_len - sum(self._count(c) for c in chain) - 16
            filler = self._filler("noise", budget)
            depths = [depth + (1 - depth) * i / (2 * len(chain)) for i in range(len(chain))]
            document = self._insert(filler, chain, depths)
            question = (
                f"Find all variables that are assigned the value {value} in the document, directly or through "
                "other variables. Answer with the variable names only."
            )
            return Sample(task, context_len, depth, document, question, tuple(names), {"value": value, "index": index})
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")

    def suite(self, tasks, lengths, depths, per_cell: int = 1) -> list[Sample]:
        return [
            self.sample(task, length, depth, i)
            for task in tasks
            for length in lengths
            for depth in depths
            for i in range(per_cell)
        ]


def chat_prompt(tokenizer, sample: Sample) -> tuple[str, str]:
    """(document part, question part) of the chat-formatted prompt.

    The document part is what query-agnostic compression sees; the question part
    (question + assistant header) comes after compression (kvpress' protocol).
    """
    marker = "\x00QUESTION\x00"
    content = f"Read the document and answer the question.\n\n<document>\n{sample.document}\n</document>\n\n{marker}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(marker)
    return head, sample.question + tail


# --- the prompts `vllm-kvcomp calibrate` measures on


def sample_prompts(tokenizer, tasks, lengths, samples: int, seed: int = 0) -> list[tuple[str, int, str]]:
    """(task, context length, chat prompt) for `samples` prompts: tasks and lengths
    cycle, needle depths spread evenly over (0, 1)."""
    gen = TaskGenerator(tokenizer, seed=seed)
    prompts = []
    for i in range(samples):
        task = tasks[i % len(tasks)]
        length = lengths[(i // len(tasks)) % len(lengths)]
        depth = round((i + 0.5) / samples, 4)
        sample = gen.sample(task, length, depth, index=i)
        head, question = chat_prompt(tokenizer, sample)
        prompts.append((task, length, head + question))
    return prompts


class PromptsFileError(ValueError):
    """A `--prompts` file that cannot be read (one line naming the file and line)."""


def load_prompts(path: str | Path, tokenizer) -> list[tuple[str, int, str]]:
    """Your own workload: a JSONL file, one object per line, with "prompt" (raw text,
    used as is) or "messages" (OpenAI chat messages; the model's chat template is
    applied), and optionally "task" (a label for the per-task stability; default: the
    file name)."""
    path = Path(path)
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptsFileError(f"--prompts: {path}:{number}: not JSON ({exc.msg})") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            text = item["prompt"]
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            text = tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False)
        else:
            raise PromptsFileError(f'--prompts: {path}:{number}: expected an object with "prompt" or "messages"')
        prompts.append((str(item.get("task", path.stem)), 0, text))
    if not prompts:
        raise PromptsFileError(f"--prompts: {path} holds no prompts")
    return prompts
