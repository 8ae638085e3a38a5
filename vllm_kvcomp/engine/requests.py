"""The worker's view of one request (one per running request, per worker)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vllm_kvcomp.config import CompressionConfig


@dataclass
class WindowRows:
    """A request's capture slot: where its observation-window queries are kept.

    Row r of the slot holds the query of prompt position `prompt_len - window + r`;
    `captured[r]` says whether the forward pass actually wrote it (rows that ran
    inside a FULL CUDA graph are not captured).
    """

    slot: int
    window: int
    captured: np.ndarray = field(repr=False)  # bool [window]
    failed: bool = False  # a capture of this request raised (it is then served uncompressed)

    def extent(self, prompt_len: int) -> tuple[int, int]:
        """(rows, scored length): the last contiguous run of captured rows, and the
        prompt length up to (and including) its last query."""
        last = int(np.flatnonzero(self.captured)[-1])
        first = last
        while first > 0 and self.captured[first - 1]:
            first -= 1
        return last - first + 1, prompt_len - self.window + last + 1


@dataclass
class TrackedRequest:
    req_id: str
    index: int  # vLLM V2 runner's request slot (row of the per-request state)
    block_ids: list[int]
    prompt_len: int
    compress: bool
    config: CompressionConfig | None = None  # per-request method/budget (None: the server's)
    rows: WindowRows | None = None  # set while its window is being captured
    finished: bool = False  # compressed, skipped, or nothing to do

    def window_captured(self) -> bool:
        return self.rows is not None and bool(self.rows.captured.any())
