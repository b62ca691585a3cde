"""Checkpoint round trip shared by the optimizer test files: save after 3 steps, load with
``torch.load(weights_only=True)`` into a fresh model and optimizer, and continue both for 5 steps."""

from __future__ import annotations

import io
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer


def _model(dtype: torch.dtype) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 6)).to(dtype)


def _groups(model: nn.Sequential, projected: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"params": [model[0].bias, model[1].bias]},
        {"params": [model[0].weight, model[1].weight], "rank": 3, "update_proj_gap": 2, **projected},
    ]


def checkpoint_roundtrip(
    make: Callable[[list[dict[str, Any]]], Optimizer], projected: dict[str, Any], dtype: torch.dtype
) -> tuple[Optimizer, nn.Sequential]:
    """Assert that the resumed run is bit-identical; return the resumed optimizer and model."""
    torch.manual_seed(0)
    model = _model(dtype)
    optimizer = make(_groups(model, projected))
    grads = [[torch.randn(p.shape).to(dtype) for p in model.parameters()] for _ in range(8)]

    def step(opt: Optimizer, params: list[nn.Parameter], grad_list: list[torch.Tensor]) -> None:
        for p, g in zip(params, grad_list):
            p.grad = g.clone()
        opt.step()

    for grad_list in grads[:3]:
        step(optimizer, list(model.parameters()), grad_list)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = _model(dtype)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = make(_groups(resumed, projected))
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for grad_list in grads[3:]:
        step(optimizer, list(model.parameters()), grad_list)
        step(resumed_optimizer, list(resumed.parameters()), grad_list)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed.parameters()):
        original, loaded = optimizer.state[p], resumed_optimizer.state[q]
        assert set(original) == set(loaded)
        for key, value in original.items():
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    return resumed_optimizer, resumed
