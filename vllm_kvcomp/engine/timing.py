"""Eviction time, measured on the GPU without synchronizing it.

Each eviction batch records a CUDA event before and after its kernels; the
elapsed time is read at a later step, once the end event has completed, so the
metric costs no device synchronization on the serving path. On CPU (tests) the
host clock is the device clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class _Batch:
    requests: int
    start: torch.cuda.Event | float
    end: torch.cuda.Event | float | None = None


class EvictionTimer:
    def __init__(self, on_cuda: bool = False) -> None:
        self.on_cuda = on_cuda
        self._pending: list[_Batch] = []

    def start(self, requests: int) -> _Batch:
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return _Batch(requests, event)
        return _Batch(requests, time.perf_counter())

    def stop(self, batch: _Batch) -> None:
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
