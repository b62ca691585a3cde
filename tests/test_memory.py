"""The CPU peak-memory method against allocations of known sizes."""

import torch

from lowrank_optim.memory import peak_extra_memory


def test_peak_counts_simultaneously_live_tensors_only() -> None:
    x = torch.randn(256, 256)  # pre-existing: not counted
    nbytes = x.numel() * x.element_size()

    def work() -> None:
        y = x @ x  # +1 block
        z = y + 1  # +1 block: two alive
        del y
        w = z * 2  # +1 block, one freed: still two alive
        del z, w

    # Plus a few bytes for the wrapped Python scalars (0-dim tensors) of `+ 1` and `* 2`.
    assert 2 * nbytes <= peak_extra_memory(work) < 2 * nbytes + 64


def test_peak_sees_in_place_work_as_free() -> None:
    x = torch.randn(128, 128)

    def work() -> None:
        x.mul_(2).add_(1)

    assert peak_extra_memory(work) < x.numel() * x.element_size()
