"""What the worker tells the scheduler after a step (plain data: it is pickled
onto `ModelRunnerOutput.kvcomp_report` and crosses process boundaries)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvictionRecord:
    """What one eviction of one request did: after its prefill, or at decode time
    (`evict_every`; a request then has several, each freeing blocks it still holds)."""

    req_id: str
    freed_block_ids: list[int]
    prompt_len: int  # the context evicted from: the prompt ("prefill"), prompt + generated ("decode")
    kept_tokens: list[int]  # per layer, right after the eviction
    verify: dict[str, Any] | None = None  # the self-check's result (engine/verify.py), when on
    phase: str = "prefill"  # or "decode"
    evicted_tokens: list[int] | None = None  # per layer, decode only (prefill: prompt_len - kept)


@dataclass
class SkipRecord:
    """A request served uncompressed although compression is on, and why."""

    req_id: str
    reason: str


@dataclass
class CompressionReport:
    evictions: list[EvictionRecord] = field(default_factory=list)
    # Served uncompressed (their KV is intact).
    skips: list[SkipRecord] = field(default_factory=list)
    # Eviction failed after their KV was rewritten: the scheduler finishes them with an error.
    failures: list[SkipRecord] = field(default_factory=list)
    # GPU seconds per request of eviction batches that completed since the last report.
    eviction_seconds: list[float] = field(default_factory=list)
    # Host seconds per request (planning and enqueueing) of the batches timed since the last report.
    eviction_host_seconds: list[float] = field(default_factory=list)
    # Decode-time evictions that failed before rewriting anything: the request keeps its
    # layout and is evicted again later (engine/decode_eviction.py).
    deferred: list[SkipRecord] = field(default_factory=list)

    def extend(self, other: CompressionReport) -> None:
        self.evictions.extend(other.evictions)
        self.skips.extend(other.skips)
        self.failures.extend(other.failures)
        self.eviction_seconds.extend(other.eviction_seconds)
        self.eviction_host_seconds.extend(other.eviction_host_seconds)
        self.deferred.extend(other.deferred)

    def __bool__(self) -> bool:
        timed = self.eviction_seconds or self.eviction_host_seconds
        return bool(self.evictions or self.skips or self.failures or timed or self.deferred)
