"""State dicts written before the reliability options existed still load and continue bit for bit.

``data/<name>-8ebfe8e.pt`` hold the state dicts of the three optimizers after 3 steps as commit 8ebfe8e
wrote them (no ``nonfinite`` key in their groups), and the weights that code reached 2 steps later; made
by ``data/make_state_fixtures.py`` run with that commit's package.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_optim import DCTAdamW, FiraAdamW, GaLoreAdamW

DATA = Path(__file__).parent / "data"
CLASSES = {"galore": GaLoreAdamW, "fira": FiraAdamW, "dct": DCTAdamW}


def _continue(name: str, saved: dict, state_dict: dict) -> tuple[torch.Tensor, torch.Tensor, GaLoreAdamW]:
    w, b = nn.Parameter(saved["w"].clone()), nn.Parameter(saved["b"].clone())
    optimizer = CLASSES[name]([{"params": [b]}, {"params": [w], "rank": 3, "update_proj_gap": 2}], lr=0.01, weight_decay=0.1)
    optimizer.load_state_dict(state_dict)
    later = torch.Generator().manual_seed(1)
    for _ in range(2):
        w.grad, b.grad = torch.randn(12, 8, generator=later), torch.randn(12, generator=later)
        optimizer.step()
    return w.detach(), b.detach(), optimizer


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_state_dict_from_before_loads_and_continues_bitwise(name: str) -> None:
    saved = torch.load(DATA / f"{name}-8ebfe8e.pt", weights_only=True)
    assert all("nonfinite" not in group for group in saved["optimizer"]["param_groups"])
    # A deep copy each: a loaded state may alias the dict's tensors (torch's loader keeps same-dtype tensors).
    w, b, optimizer = _continue(name, saved, copy.deepcopy(saved["optimizer"]))
    assert all(group["nonfinite"] == "skip" for group in optimizer.param_groups)
    # Bit for bit what the same state continues to with the options spelled out at the values that
    # reproduce the old arithmetic (nonfinite skip; Fira's explicit residual, fold_residual=False).
    explicit = copy.deepcopy(saved["optimizer"])
    for group in explicit["param_groups"]:
        group["nonfinite"] = "skip"
        if name == "fira":
            group["fold_residual"] = False
    w_explicit, b_explicit, _ = _continue(name, saved, explicit)
    assert torch.equal(w, w_explicit) and torch.equal(b, b_explicit)
    # And what commit 8ebfe8e computed: bit for bit on the machine type that wrote the fixture (the CI's), to
    # rounding on a CPU whose GEMM kernels round otherwise (seen on AVX-512 + AMX: up to 4.8e-7 apart).
    assert (w - saved["w_after"]).abs().max() <= 1e-6 and (b - saved["b_after"]).abs().max() <= 1e-6
    if _fixture_machine():
        assert torch.equal(w, saved["w_after"]) and torch.equal(b, saved["b_after"])


def _fixture_machine() -> bool:
    """Whether this CPU lacks AVX-512, as the machines that wrote the fixtures and run CI do."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" not in flags


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_deepcopy_gives_a_working_independent_optimizer(name: str) -> None:
    w = nn.Parameter(torch.randn(12, 8))
    optimizer = CLASSES[name]([{"params": [w], "rank": 3, "update_proj_gap": 2, "projector": "dct"}], lr=0.01)
    w.grad = torch.randn(12, 8)
    optimizer.step()
    twin = copy.deepcopy(optimizer)
    twin_w = twin.param_groups[0]["params"][0]
    for param in (w, twin_w):
        param.grad = torch.ones(12, 8)
    optimizer.step()
    twin.step()
    assert torch.equal(w, twin_w) and twin.state[twin_w]["dct_indices_right"].dtype == torch.int64
    twin.load_state_dict(optimizer.state_dict())  # the dtype keeper is in place again: indices stay int64
    assert twin.state[twin_w]["dct_indices_right"].dtype == torch.int64
