"""CPU seconds per thread of this process's descendants over a run (Linux /proc, no profiler).

A decode step that is host-bound shows as a thread near 100% of the run's wall time; a thread
that spins beside it (busy-waits) shows too. `bench.offline` records the busiest threads of the
engine processes for each workload (`cpu` in its result): what a profiler's per-op times cannot
say, since a slowed host makes every op slower. `host_snapshot` / `host_usage` add the whole host over
the same window (`cpu["host"]`): its busy cores and the busiest processes outside the run, so that a
process left running beside a timed run (another job, an engine that did not exit) shows by name.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(path: Path) -> tuple[str, int, int, int] | None:
    """(comm, parent pid, utime + stime ticks, CPU it last ran on) of a /proc/<pid>[/task/<tid>]/stat file."""
    try:
        text = path.read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[36])


def _processes() -> dict[int, tuple[str, int, int, int]]:
    """pid -> `_stat` of every process on the host."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry / "stat")) is not None:
            found[int(entry.name)] = stat
    return found


def descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for pid, stat in _processes().items():
        parents.setdefault(stat[1], []).append(pid)
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


def snapshot(root: int | None = None) -> dict[tuple[int, int], tuple[str, str, int, int]]:
    """(pid, tid) -> (process comm, thread comm, CPU ticks, CPU it last ran on) for root and its descendants."""
    root = os.getpid() if root is None else root
    threads = {}
    for pid in [root, *descendants(root)]:
        process = _stat(Path(f"/proc/{pid}/stat"))
        if process is None:
            continue
        for task in Path(f"/proc/{pid}/task").glob("*"):
            if (stat := _stat(task / "stat")) is not None:
                threads[(pid, int(task.name))] = (process[0], stat[0], stat[2], stat[3])
    return threads


def busiest(before: dict, after: dict, wall_s: float, top: int = 8) -> dict:
    """The threads that used the most CPU between two snapshots, and each process's total. `last_cpu`:
    the core a thread ran on last (two busy threads on one core, or on two of its hyperthreads, slow
    each other down)."""
    rows, processes = [], {}
    for key, (process, thread, ticks, last_cpu) in after.items():
        seconds = (ticks - before.get(key, (process, thread, 0, 0))[2]) / TICKS
        if seconds <= 0:
            continue
        rows.append({"pid": key[0], "process": process, "thread": thread, "cpu_s": seconds, "last_cpu": last_cpu})
        name = f"{key[0]}:{process}"
        processes[name] = processes.get(name, 0.0) + seconds
    rows.sort(key=lambda row: -row["cpu_s"])
    return {"wall_s": wall_s, "threads": rows[:top], "processes": processes}


def host_snapshot() -> tuple[int, dict[int, tuple[str, int]]]:
    """(busy CPU ticks of the whole host, from /proc/stat; pid -> (comm, CPU ticks) of every process)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    return busy, {pid: (stat[0], stat[2]) for pid, stat in _processes().items()}


def host_usage(before: tuple, after: tuple, wall_s: float, exclude, top: int = 5) -> dict:
    """The host's busy cores between two `host_snapshot`s and the processes outside `exclude` (pids)
    that used the most CPU meanwhile (a process that started in the window counts from zero)."""
    excluded = set(exclude)
    others = []
    for pid, (comm, ticks) in after[1].items():
        seconds = (ticks - before[1].get(pid, (comm, 0))[1]) / TICKS
        if pid not in excluded and seconds > 0:
            others.append({"pid": pid, "process": comm, "cpu_s": seconds})
    others.sort(key=lambda row: -row["cpu_s"])
    busy_cores = (after[0] - before[0]) / TICKS / wall_s if wall_s > 0 else 0.0
    return {"busy_cores": busy_cores, "cores": os.cpu_count(), "other_processes": others[:top]}
