"""Where an engine's host time goes, from py-spy's sampled stacks (no tracer in the process).

The 1B decode step is host-bound, and vLLM's torch profiler runs Python several times slower than
without it (bench/results/lifetime/h200_paired_suite/): its ranges say where the plugin's host time
goes, not how much. py-spy samples the engine processes from outside (`--nonblocking`: never paused),
so the shares of the samples are the shares of the main loop's time:

    py-spy record --subprocesses --nonblocking -r 1000 -f raw -o stacks.txt -- python3 -P -m bench.throughput ...
    python -m bench.stack_profile stacks.txt --out stack_profile.json

py-spy's raw format is one line per distinct stack, `frame;frame;...;frame COUNT`, outermost first,
where a process of the tree is a frame `process PID:"command"` and a Python frame is
`function (file:line)`. Idle threads (blocked in a wait, GIL released) are left out by py-spy.
Per engine process (those that ran vLLM's `run_busy_loop`), counted over its busy-loop samples only
(startup, compilation and graph capture are not in the loop): the inclusive share of every function
(`function (file)`), the self share of the innermost ones, and the shares of a few named phases of
a step. An engine whose frames include `vllm_kvcomp/` is labelled "plugin", else "stock".
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from bench.offline import write_json

PROCESS = re.compile(r'^process (\d+):"?')
FRAME = re.compile(r"^(?P<function>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")
BUSY_LOOP = "run_busy_loop"
# The parts of an engine step, by the function that runs them and its file (vLLM 0.25.1 and the plugin).
# py-spy names methods `Class.method`: a phase matches `method` or any `Class.method` in that file.
PHASES = {
    "schedule": ("schedule", "vllm/v1/core/sched/scheduler.py"),
    "update_from_output": ("update_from_output", "vllm/v1/core/sched/scheduler.py"),
    "execute_model": ("execute_model", "vllm/v1/worker/gpu/model_runner.py"),
    "sample_tokens": ("sample_tokens", "vllm/v1/worker/gpu/model_runner.py"),
    "kvcomp_begin_step": ("begin_step", "vllm_kvcomp/engine/runtime.py"),
    "kvcomp_layer_tables": ("layer_tables", "vllm_kvcomp/engine/runtime.py"),
    "kvcomp_end_step": ("end_step", "vllm_kvcomp/engine/runtime.py"),
    "kvcomp_decode_evictions": ("evict", "vllm_kvcomp/engine/decode_eviction.py"),
    "kvcomp_plan_ahead": ("plan_ahead", "vllm_kvcomp/engine/decode_planning.py"),
    "kvcomp_scheduler_report": ("apply_compression_report", "vllm_kvcomp/engine/scheduler.py"),
}


def is_function(key: str, function: str, file: str | None = None) -> bool:
    """Whether a frame key (`frame_key`) is `function`, or a method of that name, in `file` (any file
    if None)."""
    name, _, rest = key.partition(" (")
    if name != function and not name.endswith("." + function):
        return False
    return file is None or rest == file + ")"


def frame_key(frame: str) -> str:
    """`function (file)` with the file from its package root on (`vllm/...`, `vllm_kvcomp/...`) and
    no line number: one key per function, wherever it was sampled."""
    match = FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for root in ("vllm_kvcomp/", "vllm/", "bench/", "torch/", "triton/"):
        at = path.rfind(root)
        if at >= 0:
            path = path[at:]
            break
    return f"{match['function']} ({path})"


def parse(text: str) -> dict[int, list[tuple[list[str], int]]]:
    """Stacks per process id (the innermost `process` frame of each line), frames outermost first."""
    stacks: dict[int, list[tuple[list[str], int]]] = {}
    for line in text.splitlines():
        body, _, count = line.rstrip().rpartition(" ")
        if not body or not count.isdigit():
            continue
        pid, frames = None, []
        for frame in _split_frames(body):
            match = PROCESS.match(frame)
            if match:
                pid, frames = int(match[1]), []  # frames of an outer process are not this one's
            else:
                frames.append(frame)
        if pid is not None:
            stacks.setdefault(pid, []).append((frames, int(count)))
    return stacks


def _split_frames(body: str) -> list[str]:
    """Split on `;` outside the quoted command of a process frame (commands may hold `;`)."""
    frames: list[str] = []
    current: list[str] = []
    quoted = False
    for char in body:
        if char == '"':
            quoted = not quoted
        if char == ";" and not quoted:
            frames.append("".join(current))
            current = []
        else:
            current.append(char)
    frames.append("".join(current))
    return frames


def summarize_process(stacks: list[tuple[list[str], int]], top: int = 60) -> dict | None:
    """Shares of an engine process's busy-loop samples; None if it never ran the busy loop."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    busy_stacks: list[tuple[set[str], int]] = []
    busy, plugin = 0, False
    for frames, count in stacks:
        keys = [frame_key(frame) for frame in frames]
        plugin = plugin or any("vllm_kvcomp/" in key for key in keys)
        if not any(is_function(key, BUSY_LOOP) for key in keys):
            continue
        busy += count
        busy_stacks.append((set(keys), count))
        for key in busy_stacks[-1][0]:
            inclusive[key] += count
        if keys:
            own[keys[-1]] += count
    if not busy:
        return None
    share = {key: count / busy for key, count in inclusive.most_common(top)}
    phases = {}
    for phase, (function, file) in PHASES.items():
        # a sample counts once per phase, even where two matching frames are nested (a subclass's
        # method calling its base's: the plugin's update_from_output calls vLLM's)
        keys = {key for key in inclusive if is_function(key, function, file)}
        if keys:
            phases[phase] = sum(count for frames, count in busy_stacks if keys & frames) / busy
    return {
        "label": "plugin" if plugin else "stock",
        "busy_loop_samples": busy,
        "phases": phases,
        "inclusive": share,
        "self": {key: count / busy for key, count in own.most_common(top)},
    }


def callees(stacks: list[tuple[list[str], int]], function: str, file: str | None = None) -> dict[str, int]:
    """Busy-loop samples under `function` (its outermost frame), by the frame it called (`<self>`: none)."""
    counts: Counter[str] = Counter()
    for frames, count in stacks:
        keys = [frame_key(frame) for frame in frames]
        if not any(is_function(key, BUSY_LOOP) for key in keys):
            continue
        at = next((i for i, key in enumerate(keys) if is_function(key, function, file)), None)
        if at is not None:
            counts[keys[at + 1] if at + 1 < len(keys) else "<self>"] += count
    return dict(counts.most_common())


def summarize(text: str, top: int = 60, expand: list[str] = ()) -> dict:
    """Per engine process: `summarize_process`, plus `callees` of each `function` or `function@file`
    of `expand`."""
    engines = {}
    for pid, stacks in sorted(parse(text).items()):
        summary = summarize_process(stacks, top)
        if summary is not None:
            targets = [name.partition("@") for name in expand]
            summary["callees"] = {
                name: callees(stacks, fn, file or None) for name, (fn, _, file) in zip(expand, targets)
            }
            engines[str(pid)] = summary
    return {"engines": engines}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stack_profile", description=__doc__.split("\n")[0])
    parser.add_argument("raw", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=60, help="functions listed per engine")
    parser.add_argument(
        "--expand", default="", help="comma-separated functions (`name` or `name@file`) whose callees are listed"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    expand = [name for name in args.expand.split(",") if name]
    write_json(summarize(args.raw.read_text(errors="replace"), args.top, expand), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
