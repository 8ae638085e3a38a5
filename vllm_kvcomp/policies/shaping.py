"""Robustness transforms of real-valued layer budgets (issue #13), used by `zigzag`.

Both keep the total L * B_avg and run before `allocate` (which then applies the
engine's bounds [sinks + recent, P] and rounds to integers, as for every method).
"""

from __future__ import annotations

import numpy as np


def shrink_to_average(raw: np.ndarray, avg: float, shrink: float) -> np.ndarray:
    """B_l = (1 - shrink) * B_avg + shrink * raw_l: 0 gives uniform budgets, 1 leaves `raw` as is."""
    return (1.0 - shrink) * avg + shrink * np.asarray(raw, dtype=np.float64)


def raise_to_floor(raw: np.ndarray, avg: float, floor: float) -> np.ndarray:
    """No layer below F = floor * B_avg, the total L * B_avg kept.

    Layers under F are raised to F; the deficit is taken from the layers above F
    in proportion to their excess over F: x_l = F + c * (raw_l - F) with one c in
    [0, 1] solving sum(x) = L * B_avg. That is exact in one step and cannot push
    a layer below F (c >= 0 because F <= B_avg). floor 1 gives uniform budgets.
    """
    raw = np.asarray(raw, dtype=np.float64)
    n = len(raw)
    lowest = floor * avg
    if floor <= 0 or n == 0:
        return raw
    excess = np.maximum(raw - lowest, 0.0)
    spare = n * avg - n * lowest  # what the layers may hold above F in total (>= 0)
    if excess.sum() <= 0 or spare <= 0:
        return np.full(n, float(avg))
    return lowest + excess * min(1.0, spare / excess.sum())
