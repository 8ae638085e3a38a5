"""bench.thread_cpu: CPU seconds per thread of a process and its children, from /proc."""

import os
import subprocess
import sys
import threading
import time

import pytest

from bench.thread_cpu import busiest, host_snapshot, host_usage, snapshot

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_spinning_thread_is_the_busiest_and_an_idle_one_is_left_out():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    before = snapshot()
    spinner.start()
    time.sleep(0.6)
    after = snapshot()
    stop.set()
    spinner.join()
    report = busiest(before, after, wall_s=0.6)
    assert report["threads"][0]["cpu_s"] >= 0.2  # 0.6 s of wall time, shared with this thread at most
    assert report["wall_s"] == 0.6
    assert 0 <= report["threads"][0]["last_cpu"] < os.cpu_count()
    total = sum(report["processes"].values())
    assert total == pytest.approx(sum(row["cpu_s"] for row in report["threads"]), abs=0.05)


def test_a_child_process_counts_with_its_own_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 0.8: pass"])
    try:
        before = snapshot()
        time.sleep(0.6)
        after = snapshot()
    finally:
        child.wait()
    report = busiest(before, after, wall_s=0.6)
    assert any(row["pid"] == child.pid and row["cpu_s"] >= 0.2 for row in report["threads"])
    assert any(name.startswith(f"{child.pid}:") for name in report["processes"])


def test_a_process_outside_the_run_shows_in_the_host_view():
    """A spinning process outside the run is named and the host's busy cores count it; once its pid is
    excluded (a process of the run), it is not listed."""
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 0.9: pass"])
    try:
        time.sleep(0.1)  # the interpreter has started
        before = host_snapshot()
        time.sleep(0.6)
        after = host_snapshot()
    finally:
        child.wait()
    report = host_usage(before, after, wall_s=0.6, exclude=set())
    assert report["busy_cores"] >= 0.3
    assert any(row["pid"] == child.pid and row["cpu_s"] >= 0.2 for row in report["other_processes"])
    left_out = host_usage(before, after, wall_s=0.6, exclude={child.pid})
    assert all(row["pid"] != child.pid for row in left_out["other_processes"])
