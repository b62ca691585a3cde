"""Peak memory of a piece of work, from the allocator's own accounting, on CPU and CUDA.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the papers' "actual memory").
CPU: torch keeps no peak statistic for its CPU allocator, so the work runs under the profiler with
``profile_memory=True`` and the peak is replayed from its memory timeline: every tensor allocation
(+bytes) and free (-bytes) recorded by the allocator hooks, in time order. Tensors that existed before
the work started are not counted, so the result is the *extra* memory the work needed at its peak.
This is exact for tensor storage (what the allocator hands out) and blind to non-tensor heap use
(Python objects, library workspaces allocated outside torch's allocator, e.g. LAPACK's).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Callable

import torch

__all__ = ["peak_extra_memory"]


def peak_extra_memory(work: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Run ``work()`` once and return the peak bytes it allocated above what was live when it started."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    # Imported here: the memory profiler is a private torch module, needed only for CPU measurements.
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
    # Some torch builds print a "profiler_start"/"profiler_stop" trace line to stderr at each start and
    # stop; silence only those two moments, never the work itself.
    with _quiet_stderr():
        prof.__enter__()
    try:
        work()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
            peak = max(peak, live)
        elif action == Action.DESTROY:
            live -= size
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (C++ code writes there, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
