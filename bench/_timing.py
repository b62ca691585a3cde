"""Timing shared by the benchmark scripts (run as ``python bench/<script>.py``, so this folder is on the path)."""

from __future__ import annotations

import time
from typing import Callable


def best_time(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``run``, in seconds: the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
