"""Stock and the plugin up side by side, their passes alternated (`python -m bench.throughput --paired`).

The host's speed drifts by more than the effects measured here: on one idle H200 host, stock's same-batch
run read 14,699-18,618 tok/s over four invocations 4 minutes apart, and stock's three passes on one
engine spanned 14% (bench/results/lifetime/h200_same_batch_ab/). Run one after the other, each engine
meets another host. Here both engines start first (on the same GPU; an idle engine blocks on its input
queue, and each workload's host view, `cpu.host`, would name it if it used a core meanwhile), then
pass k runs stock's workloads and the plugin's back to back, stock first in odd passes and the plugin
first in even ones (ABBA), so that a drift that is linear over two passes cancels in their mean, and
pass k's ratio compares two runs seconds apart.

Each engine lives in its own process (`bench/offline.py --serve`), driven a workload at a time: a JSON
workload line on its stdin, its result as a JSON line on a pipe of its own (vLLM's logs keep stdout).
Both start with `gpu_memory_utilization` PAIRED_GPU_MEMORY_UTILIZATION: with `kv_cache_memory_bytes`
set, vLLM 0.25.1 uses it only to check free memory at start-up (`request_memory`), which the second
engine would fail at the default 0.9 beside the first.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

PAIRED_GPU_MEMORY_UTILIZATION = 0.4
OFFLINE = Path(__file__).resolve().with_name("offline.py")


class EngineFailed(RuntimeError):
    pass


class EngineProcess:
    """One engine in its own process, run a workload at a time; `result` collects what it measured
    (the header of `bench.offline.run`'s result, and `workloads`)."""

    def __init__(self, spec: dict, workdir: Path, deadline: float, command: list[str] | None = None) -> None:
        self.name = spec.get("name", "engine")
        self.deadline = deadline  # time.monotonic() after which the engine is given up
        self.log_path = workdir / f"{self.name}.log"
        spec_path = workdir / f"{self.name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        read_fd, write_fd = os.pipe()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*(command or [sys.executable, str(OFFLINE)]), "--serve", str(spec_path), str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                cwd=workdir,  # never import a source checkout from the cwd (as run_in_subprocess)
                env={**os.environ, "PYTHONSAFEPATH": "1"},
                text=True,
            )
        os.close(write_fd)  # the child holds the only write end: its exit closes the pipe
        self._results = os.fdopen(read_fd)
        self.result = self._receive("start-up")
        self.result["workloads"] = []

    def run(self, workload: dict) -> dict:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(workload) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the process is gone: _receive says so, with its log
        measured = self._receive(workload.get("label", "a workload"))
        self.result["workloads"].append(measured)
        return measured

    def close(self) -> None:
        """Shut the engine down (it finishes nothing more); killed if it has not exited in 120 s."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._results.close()

    def _receive(self, what: str) -> dict:
        while True:  # 1 s slices: a process that died without closing the pipe is noticed too
            left = self.deadline - time.monotonic()
            ready = select.select([self._results], [], [], max(0.0, min(1.0, left)))[0]
            line = self._results.readline() if ready else ""
            if line:
                return json.loads(line)
            if ready or self.proc.poll() is not None or left <= 0:  # end of pipe, exit, or time is up
                try:  # a process that closed its pipe is exiting: its own status, unless it hangs
                    self.proc.wait(timeout=5 if left > 0 else 0.1)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                tail = self.log_path.read_text(errors="replace")[-4000:]
                raise EngineFailed(f"{self.name} failed during {what} (exit {self.proc.returncode}); log tail:\n{tail}")


def alternate(specs: dict[str, dict], workdir: Path, timeout: float, partial_ok: bool = False, command=None) -> dict:
    """{run: result} for the runs of `specs` ("stock" and "plugin", each a `bench.offline` spec whose
    workloads carry `repeat`), both engines up at once and pass k of each run back to back, the order
    reversed every pass. `partial_ok`: if an engine fails, return what was measured (each result marked
    `"partial": true`) instead of raising."""
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    runs = list(specs)
    engines: dict[str, EngineProcess] = {}
    try:
        for run in runs:  # one after the other: start-up (compilation, graph capture) is not shared
            spec = {**specs[run], "gpu_memory_utilization": PAIRED_GPU_MEMORY_UTILIZATION}
            engines[run] = EngineProcess(spec, workdir, deadline, command)
        for k, order in enumerate(pass_orders(runs, _passes(specs)), start=1):
            for run in order:
                for workload in specs[run]["workloads"]:
                    if workload.get("repeat", 1) == k:
                        engines[run].run(workload)
    except EngineFailed:
        if not partial_ok or not engines:
            raise
        for engine in engines.values():
            engine.result["partial"] = True
    finally:
        for engine in engines.values():
            engine.close()
    return {run: engine.result for run, engine in engines.items()}


def pass_orders(runs: list[str], passes: int) -> list[list[str]]:
    """The runs' order in each pass: as given in odd passes, reversed in even ones (ABBA)."""
    return [list(runs) if k % 2 else list(reversed(runs)) for k in range(1, passes + 1)]


def _passes(specs: dict[str, dict]) -> int:
    return max((w.get("repeat", 1) for spec in specs.values() for w in spec["workloads"]), default=0)
