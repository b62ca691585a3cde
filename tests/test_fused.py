"""The optimizers' ``fused`` flag: compiled kernels vs the pure-PyTorch reference, and how the choice is made.

Trajectory tolerances, fused vs reference, after 7 steps (refreshes at steps 1, 4, 7) of a 24 x 40 or
40 x 24 matrix (rank 6) and a full-rank vector with lr 0.01:

- fp32: ``rtol = atol = 1e-5``. The kernels' ``N`` differs from the reference by up to 2 ulp (ATen's
  vectorized ``sqrt`` is not correctly rounded), Fira's residual is formed as ``G - a·back(R)`` by one
  fused add instead of inside ``addmm_``, and the limiter's norm is accumulated in double; all of it
  enters the weights scaled by ``lr``.
- bf16 (weights, gradients and moments): ``atol = 2e-2``, ``rtol = 2**-6``: a few-ulp difference in
  ``N`` or ``phi`` can round a weight to the neighbouring bf16 value (one ulp is ``2**-7`` relative).

DCT runs with ``scoring="matmul"``, the scoring the ``dct_topk`` kernel replaces (FFT scoring sums row
blocks as it goes and stays the reference).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from devices import DEVICES
from torch import nn

from lowrank_optim import DCTAdamW, FiraAdamW, GaLoreAdamW
from lowrank_optim.ops import _extension, kernel_load_error, kernels_available
from lowrank_optim.optim import galore

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "galore": lambda groups, **kw: GaLoreAdamW(groups, lr=0.01, weight_decay=0.1, **kw),
    "fira": lambda groups, **kw: FiraAdamW(groups, lr=0.01, alpha=0.5, weight_decay=0.1, **kw),
    "fira_paper": lambda groups, **kw: FiraAdamW(groups, lr=0.01, alpha=0.5, residual="paper", **kw),
    "dct": lambda groups, **kw: DCTAdamW(groups, lr=0.01, scoring="matmul", **kw),
}

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-6, atol=2e-2)}

needs_kernels = pytest.mark.skipif(
    not kernels_available("cpu"), reason=f"CPU kernels not loaded: {kernel_load_error('cpu')}"
)


def _trajectory(
    name: str, shape: tuple[int, int], dtype: torch.dtype, steps: int = 7, device: str = "cpu", **kwargs: Any
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)  # on the CPU: the same numbers for every device
    weight = nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype))
    bias = nn.Parameter(torch.randn(shape[0], generator=generator).to(device, dtype))
    optimizer = OPTIMIZERS[name](
        [{"params": [bias]}, {"params": [weight], "rank": 6, "update_proj_gap": 3}], **kwargs
    )
    for _ in range(steps):
        weight.grad = torch.randn(shape, generator=generator).to(device, dtype)
        bias.grad = torch.randn(shape[0], generator=generator).to(device, dtype)
        optimizer.step()
    return [weight.detach().cpu().clone(), bias.detach().cpu().clone()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["right", "left"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_trajectory_matches_reference(
    name: str, shape: tuple[int, int], dtype: torch.dtype, device: str
) -> None:
    """On CUDA the reference side runs ``foreach`` (``fused=False`` with ``foreach=None`` picks it there)."""
    if not kernels_available(device):
        pytest.skip(f"no compiled kernels for {device}: {kernel_load_error(device)}")
    fused = _trajectory(name, shape, dtype, device=device, fused=True)
    reference = _trajectory(name, shape, dtype, device=device, fused=False)
    start = _trajectory(name, shape, dtype, steps=0)
    for got, expected, initial in zip(fused, reference, start):
        torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
        assert not torch.equal(got, initial), "the parameters did not move"


@needs_kernels
def test_fused_with_fp32_moments_of_bf16_weights() -> None:
    fused = _trajectory("fira", (24, 40), torch.bfloat16, fused=True, moment_dtype=torch.float32)
    reference = _trajectory("fira", (24, 40), torch.bfloat16, fused=False, moment_dtype=torch.float32)
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.bfloat16])


@needs_kernels
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_none_uses_the_loaded_kernels(name: str) -> None:
    default = _trajectory(name, (24, 40), torch.float32)
    fused = _trajectory(name, (24, 40), torch.float32, fused=True)
    for got, expected in zip(default, fused):
        assert torch.equal(got, expected)


def _recording(kernels: galore._Kernels, calls: list[str]) -> galore._Kernels:
    def wrap(field: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any) -> Any:
            calls.append(field)
            return function(*args)

        return recorded

    return galore._Kernels(*(wrap(field, function) for field, function in zip(kernels._fields, kernels)))


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "missing"])
@pytest.mark.parametrize("name", ["galore", "fira", "dct"])
def test_fused_none_picks_by_what_loaded(monkeypatch: pytest.MonkeyPatch, loaded: bool, name: str) -> None:
    """Independent of this build: the loader's state decides which functions the step uses."""
    monkeypatch.setattr(_extension, "_loaded", {"cpu"} if loaded else set())
    fused_calls: list[str] = []
    reference_calls: list[str] = []
    monkeypatch.setattr(galore, "_FUSED", _recording(galore._FUSED, fused_calls))
    monkeypatch.setattr(galore, "_REFERENCE", _recording(galore._REFERENCE, reference_calls))
    _trajectory(name, (24, 40), torch.float32, steps=2)
    expected = {"moments"} | {"fira": {"fira_residual"}, "dct": {"select_dct"}}.get(name, set())
    assert set(fused_calls if loaded else reference_calls) == expected
    assert not (reference_calls if loaded else fused_calls)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_false_and_foreach_use_the_reference(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(_extension, "_loaded", {"cpu"})
    calls: list[str] = []
    monkeypatch.setattr(galore, "_FUSED", _recording(galore._FUSED, calls))
    _trajectory(name, (24, 40), torch.float32, steps=2, fused=False)
    _trajectory(name, (24, 40), torch.float32, steps=2, foreach=True)
    assert not calls


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_true_without_kernels_raises_the_load_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(_extension, "_loaded", set())
    monkeypatch.setitem(_extension._errors, "cpu", "_C_cpu.so: undefined symbol: _ZN2at6simulatedEv")
    weight = nn.Parameter(torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="undefined symbol: _ZN2at6simulatedEv") as info:
        OPTIMIZERS[name]([{"params": [weight], "rank": 2}], fused=True)
    assert "Invalid fused in param group 0: True" in str(info.value) and "fused=False" in str(info.value)
    OPTIMIZERS[name]([{"params": [weight], "rank": 2}], fused=None)  # falls back silently
    OPTIMIZERS[name]([{"params": [weight], "rank": 2}], fused=False)


def test_fused_true_in_one_group_without_kernels_is_refused_and_not_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_extension, "_loaded", set())
    optimizer = GaLoreAdamW([nn.Parameter(torch.randn(3))], fused=False)
    with pytest.raises(RuntimeError, match="Invalid fused in param group 1: True"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(4, 6))], "rank": 2, "fused": True})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_and_foreach_together_are_refused(name: str) -> None:
    weight = nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"^`fused` and `foreach` cannot be `True` together\.$"):
        OPTIMIZERS[name]([{"params": [weight], "rank": 2}], fused=True, foreach=True)


def test_fused_must_be_none_or_bool() -> None:
    with pytest.raises(ValueError, match=r"Invalid fused: 'yes'\. Must be None, True or False\."):
        GaLoreAdamW([nn.Parameter(torch.randn(3))], fused="yes")
