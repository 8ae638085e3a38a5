"""Observation-window capture: the post-RoPE queries of each prompt's last
`window` positions, and their softmax LSE, copied out of FlashAttention's
prefill call into persistent per-slot buffers.

Per step: `plan_step` (host) decides which token of the batch goes to which
buffer row; attention calls `capture` per layer with that plan; after the
step `mark_executed` records which rows were really written. A request holds
a slot from its first window row until it is compressed, skipped or removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_kvcomp.engine.requests import TrackedRequest, WindowRows
from vllm_kvcomp.engine.staging import to_device

logger = logging.getLogger("vllm.kvcomp")


@dataclass
class CapturePlan:
    """Where this step's window queries go: flat token index -> capture row."""

    src: torch.Tensor  # int64 [n] token index in the batch
    dst: torch.Tensor  # int64 [n] slot * window + row
    rows: list[tuple[WindowRows, np.ndarray]]  # host copy, to mark rows captured
    executed: bool = False


@dataclass
class StepWindows:
    """What `plan_step` found: the capture plan, the requests whose prompt
    completes this step, and those that found no free slot."""

    plan: CapturePlan | None = None
    ready: list[TrackedRequest] = field(default_factory=list)
    no_slot: list[TrackedRequest] = field(default_factory=list)


class WindowCapture:
    def __init__(self, *, num_layers: int, slots: int, window: int, num_heads: int, head_size: int, dtype, device):
        self.window = window
        self.num_heads = num_heads
        self.head_size = head_size
        self.device = device
        self.queries = torch.zeros(num_layers, slots, window, num_heads, head_size, dtype=dtype, device=device)
        self.lse = torch.zeros(num_layers, slots, window, num_heads, dtype=torch.float32, device=device)
        self.free_slots = list(range(slots))

    @property
    def nbytes(self) -> int:
        return self.queries.numel() * self.queries.element_size() + self.lse.numel() * 4

    # ------------------------------------------------------------ per step
    def plan_step(self, input_batch, requests: dict[str, TrackedRequest]) -> StepWindows:
        """Plan this step's capture (host side, prefill rows only)."""
        step = StepWindows()
        prefilling = np.flatnonzero(input_batch.is_prefilling_np)
        qsl = input_batch.query_start_loc_np
        src: list[np.ndarray] = []
        dst: list[np.ndarray] = []
        rows: list[tuple[WindowRows, np.ndarray]] = []
        for r in prefilling:
            req = requests.get(input_batch.req_ids[r])
            if req is None or not req.compress or req.finished:
                continue
            computed = int(input_batch.num_computed_tokens_np[r])
            scheduled = int(input_batch.num_scheduled_tokens[r])
            window = min(self.window, req.prompt_len)
            start = max(computed, req.prompt_len - window)
            end = min(computed + scheduled, req.prompt_len)
            if start < end:
                if req.rows is None and not self._take_slot(req, window):
                    step.no_slot.append(req)
                    continue
                assert req.rows is not None
                positions = np.arange(start, end)
                window_rows = positions - (req.prompt_len - window)
                src.append(qsl[r] + positions - computed)
                dst.append(req.rows.slot * self.window + window_rows)
                rows.append((req.rows, window_rows))
            if computed + scheduled >= req.prompt_len:
                step.ready.append(req)
        if rows:
            step.plan = CapturePlan(src=self._to_device(src), dst=self._to_device(dst), rows=rows)
        return step

    def capture(self, layer: int, query: torch.Tensor, lse: torch.Tensor, plan: CapturePlan) -> None:
        """Copy this step's window rows of one layer (query [T, H, D], lse [H, T]).

        Runs inside the model's forward: an error here must not propagate (it
        would end the step for every request); the plan's requests are then
        served uncompressed.
        """
        try:
            q_rows = self.queries[layer].view(-1, self.num_heads, self.head_size)
            q_rows.index_copy_(0, plan.dst, query.index_select(0, plan.src))
            lse_rows = self.lse[layer].view(-1, self.num_heads)
            lse_rows.index_copy_(0, plan.dst, lse.index_select(1, plan.src).t().float())
            plan.executed = True
        except Exception as exc:  # contained, see above
            logger.error("vllm-kvcomp: window capture failed (%s: %s)", type(exc).__name__, str(exc)[:200])
            for rows, _ in plan.rows:
                rows.failed = True
            # The forward did reach attention: every TP rank marks the rows the
            # same way, and the failure is agreed on in the eviction's collective.
            plan.executed = True

    @staticmethod
    def mark_executed(plan: CapturePlan | None) -> None:
        """After the step: rows of an executed plan were written (no layer ran
        when the whole step replayed a FULL CUDA graph)."""
        if plan is not None and plan.executed:
            for rows, window_rows in plan.rows:
                rows.captured[window_rows] = True

    # ------------------------------------------------------------- slots
    def _take_slot(self, req: TrackedRequest, window: int) -> bool:
        if not self.free_slots:
            return False
        req.rows = WindowRows(self.free_slots.pop(), window, np.zeros(window, dtype=bool))
        return True

    def release(self, req: TrackedRequest) -> None:
        if req.rows is not None:
            self.free_slots.append(req.rows.slot)
            req.rows = None

    # ---------------------------------------------------------- scoring
    def gather(self, reqs: list[TrackedRequest]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Window queries [L, R, W, H, D] and LSE [L, R, W, H] of captured requests,
        each request's captured run moved to rows 0.., plus (rows, scored length) each."""
        captured = [req.rows for req in reqs]
        assert all(rows is not None for rows in captured), "gather() takes requests holding a capture slot"
        windows = [rows for rows in captured if rows is not None]
        extents = [rows.extent(req.prompt_len) for rows, req in zip(windows, reqs)]
        slots = torch.tensor([rows.slot for rows in windows], dtype=torch.long, device=self.device)
        queries, lse = self.queries[:, slots], self.lse[:, slots]
        # Rows are stored right-aligned at the end of the window; with a shortened
        # window (rows missing at the end) shift each request's run to start at 0.
        first_rows = [
            rows.window - n - (req.prompt_len - scored) for rows, req, (n, scored) in zip(windows, reqs, extents)
        ]
        if any(first_rows):
            R = len(reqs)
            shift = torch.tensor(first_rows, dtype=torch.long, device=self.device).view(R, 1)
            rows_idx = (torch.arange(self.window, device=self.device).view(1, -1) + shift) % self.window
            req_idx = torch.arange(R, device=self.device).view(R, 1)
            queries = queries[:, req_idx, rows_idx]
            lse = lse[:, req_idx, rows_idx]
        return queries, lse, extents

    def _to_device(self, parts: list[np.ndarray]) -> torch.Tensor:
        return to_device(np.concatenate(parts).astype(np.int64), self.device)
