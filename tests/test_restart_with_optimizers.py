"""Momentum reset (the high-rank-restart helper) on the package's own optimizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_optim import DCTAdamW, FiraAdamW, GaLoreAdamW
from lowrank_optim.nn import reset_momentum_


@pytest.mark.parametrize("optimizer_class", [GaLoreAdamW, FiraAdamW, DCTAdamW])
def test_reset_zeroes_moments_and_step_then_next_step_refreshes(optimizer_class: type) -> None:
    generator = torch.Generator().manual_seed(0)
    weight, other = nn.Parameter(torch.randn(12, 8, generator=generator)), nn.Parameter(torch.randn(6, 4))
    optimizer = optimizer_class(
        [{"params": [other]}, {"params": [weight], "rank": 4, "update_proj_gap": 100}], lr=0.01
    )
    for _ in range(3):
        weight.grad = torch.randn(12, 8, generator=generator)
        other.grad = torch.randn(6, 4, generator=generator)
        optimizer.step()
    projection_keys = [k for k in optimizer.state[weight] if k.startswith(("basis", "dct_indices"))]
    projection_before = {k: optimizer.state[weight][k].clone() for k in projection_keys}
    other_before = {k: v.clone() for k, v in optimizer.state[other].items()}

    assert reset_momentum_(optimizer, [weight]) == [weight]
    state = optimizer.state[weight]
    assert int(state["step"]) == 0
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    for key, value in projection_before.items():  # the projection is not momentum
        assert torch.equal(state[key], value)
    for key, value in other_before.items():  # parameters not named are untouched
        assert torch.equal(optimizer.state[other][key], value)

    weight.grad = torch.randn(12, 8, generator=generator) * 10  # a different gradient subspace
    optimizer.step()  # step 0 again: the projector is recomputed from this gradient
    assert int(state["step"]) == 1
    assert any(not torch.equal(state[k], v) for k, v in projection_before.items())
