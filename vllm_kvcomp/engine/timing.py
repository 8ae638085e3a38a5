"""Eviction time, measured on the GPU without synchronizing it.

Each eviction batch records a CUDA event before and after its kernels; the
elapsed time is read at a later step, once the end event has completed, so the
metric costs no device synchronization on the serving path. On CPU (tests) the
host clock is the device clock.

The host's own share is timed beside it (`host_seconds`: the wall time from
`start` to `stop`, planning plus enqueueing the kernels, less the time spent
inside `waiting`: a read-back that waits for the GPU, such as the prefill's
statistics, which waits for the step's whole forward). While the host plans,
the GPU runs out of work and waits, so the GPU time includes the host time;
the difference is the kernels' time beyond what the host overlapped.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch


@dataclass
class _Batch:
    requests: int
    start: torch.cuda.Event | float
    end: torch.cuda.Event | float | None = None
    host_start: float = 0.0
    waited: float = 0.0  # seconds the host spent waiting for the GPU (`EvictionTimer.waiting`)


class EvictionTimer:
    def __init__(self, on_cuda: bool = False) -> None:
        self.on_cuda = on_cuda
        self._pending: list[_Batch] = []
        self._host_seconds: list[float] = []  # per request of every stopped batch, not yet taken

    def start(self, requests: int) -> _Batch:
        now = time.perf_counter()
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return _Batch(requests, event, host_start=now)
        return _Batch(requests, now, host_start=now)

    @contextlib.contextmanager
    def waiting(self, batch: _Batch):
        """A read-back that waits for the GPU: its time is not the host's own work."""
        start = time.perf_counter()
        try:
            yield
        finally:
            batch.waited += time.perf_counter() - start

    def stop(self, batch: _Batch) -> None:
        host = time.perf_counter() - batch.host_start - batch.waited
        self._host_seconds.extend([host / batch.requests] * batch.requests)
        if isinstance(batch.start, float):
            batch.end = time.perf_counter()
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            batch.end = end
        self._pending.append(batch)

    def completed(self) -> list[float]:
        """Seconds per request of every batch whose kernels have finished (one entry per request)."""
        done, waiting = [], []
        for batch in self._pending:
            if isinstance(batch.start, float) and isinstance(batch.end, float):
                done.extend([(batch.end - batch.start) / batch.requests] * batch.requests)
            elif isinstance(batch.end, torch.cuda.Event) and batch.end.query():
                seconds = batch.start.elapsed_time(batch.end) / 1000  # type: ignore[union-attr]
                done.extend([seconds / batch.requests] * batch.requests)
            else:
                waiting.append(batch)
        self._pending = waiting
        return done

    def host(self) -> list[float]:
        """Host seconds per request of every batch stopped since the last call (one entry per request)."""
        seconds, self._host_seconds = self._host_seconds, []
        return seconds


def profiled(name: str):
    """A named range in torch.profiler traces (bench/step_profile.py reports the `kvcomp::` ones);
    free when no profiler runs (a range costs several µs even then, the check a fraction of one)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
