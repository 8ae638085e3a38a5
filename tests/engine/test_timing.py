"""engine/timing.py: the eviction timer's host share and the profiler ranges bench/step_profile.py reads."""

import contextlib

import torch

from vllm_kvcomp.engine.timing import EvictionTimer, profiled


def _range_names(prof) -> set[str]:
    return {event.key for event in prof.key_averages() if event.key.startswith("kvcomp::")}


def test_ranges_show_in_a_profile_and_cost_nothing_without_one():
    assert isinstance(profiled("kvcomp::begin_step"), contextlib.nullcontext)  # no profiler running
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with profiled("kvcomp::end_step"):
            torch.ones(4).add_(1)
    assert _range_names(prof) == {"kvcomp::end_step"}


def test_the_host_share_is_taken_once_per_stopped_batch():
    timer = EvictionTimer()
    batch = timer.start(requests=4)
    timer.stop(batch)
    host = timer.host()
    assert len(host) == 4 and len(set(host)) == 1 and host[0] >= 0
    assert timer.host() == []  # taken
    gpu = timer.completed()  # on the CPU the host clock times both: one entry per request as well
    assert len(gpu) == 4 and gpu[0] >= 0


def test_waiting_for_the_gpu_is_not_host_work():
    import time

    timer = EvictionTimer()
    batch = timer.start(requests=2)
    with timer.waiting(batch):
        time.sleep(0.05)  # as a read-back waiting for the step's forward
    timer.stop(batch)
    host = timer.host()
    assert len(host) == 2 and 0 <= host[0] < 0.01  # per request, without the 50 ms wait
    assert batch.waited >= 0.05
    assert timer.completed()[0] >= 0.025  # the device's (here the host clock's) time still holds it
