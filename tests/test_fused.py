"""The optimizers' ``fused`` flag: compiled kernels vs the pure-PyTorch reference, and how the choice is made.

Trajectory tolerances, fused vs reference, after 7 steps (refreshes at steps 1, 4, 7) of a 24 x 40 or
40 x 24 matrix (rank 6) and a full-rank vector with lr 0.01:

- fp32: ``rtol = atol = 1e-5``. The kernels' ``N`` differs from the default kernel's by up to 2 ulp
  (ATen's vectorized ``sqrt`` is not correctly rounded) and the limiter's norm is accumulated in
  double; all of it enters the weights scaled by ``lr``.
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
from lowrank_optim.ops import _extension, _library, kernel_load_error, kernels_available

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "galore": lambda groups, **kw: GaLoreAdamW(groups, lr=0.01, weight_decay=0.1, **kw),
    # fold_residual=False: the explicit residual is what the compiled fira_residual_ kernel computes (the
    # folded update of fp32 weights is addmm/addcmul, no kernel of ours; tests/test_fira_fold.py).
    "fira": lambda groups, **kw: FiraAdamW(groups, lr=0.01, alpha=0.5, weight_decay=0.1, fold_residual=False, **kw),
    "fira_paper": lambda groups, **kw: FiraAdamW(
        groups, lr=0.01, alpha=0.5, residual="paper", fold_residual=False, **kw
    ),
    "fira_folded": lambda groups, **kw: FiraAdamW(groups, lr=0.01, alpha=0.5, weight_decay=0.1, **kw),
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


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Record every ``(op, fused)`` the step hands to the ops' one decision point (``ops._library.run``)."""
    calls: list[tuple[str, bool]] = []
    run = _library.run

    def recorded(name: str, fused: bool, *args: Any) -> Any:
        calls.append((name, fused))
        return run(name, fused, *args)

    monkeypatch.setattr(_library, "run", recorded)
    return calls


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "missing"])
@pytest.mark.parametrize("name", ["galore", "fira", "fira_folded", "dct"])
def test_fused_none_picks_by_what_loaded(monkeypatch: pytest.MonkeyPatch, loaded: bool, name: str) -> None:
    """Independent of this build: the loader's state decides whether the step goes through the dispatcher
    (which picks the compiled kernel) or runs the ops' default kernels; the step calls the same ops."""
    monkeypatch.setattr(_extension, "_loaded", {"cpu"} if loaded else set())
    calls = _recording(monkeypatch)
    _trajectory(name, (24, 40), torch.float32, steps=2)
    expected = {"lowrank_adam_"} | {"fira": {"fira_residual_"}, "fira_folded": {"fira_folded_"}, "dct": {"dct_topk"}}.get(
        name, set()
    )
    assert {op for op, _ in calls} == expected
    assert {fused for _, fused in calls} == {loaded}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_false_and_foreach_use_the_default_kernels(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(_extension, "_loaded", {"cpu"})
    calls = _recording(monkeypatch)
    _trajectory(name, (24, 40), torch.float32, steps=2, fused=False)
    _trajectory(name, (24, 40), torch.float32, steps=2, foreach=True)
    assert calls and not any(fused for _, fused in calls)


@pytest.mark.parametrize("name", ["galore", "fira", "fira_folded", "dct"])
def test_fused_false_runs_the_registered_default_kernels(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``fused=False`` means the ops' registered default kernels (the ones the dispatcher falls back to),
    not a second copy of their arithmetic elsewhere: counting calls into them counts every op call."""
    expected = _trajectory(name, (24, 40), torch.float32, steps=2, fused=False)
    counts: dict[str, int] = {}
    for op, default in list(_library._DEFAULT_KERNELS.items()):

        def counted(*args: Any, op: str = op, default: Any = default) -> Any:
            counts[op] = counts.get(op, 0) + 1
            return default(*args)

        monkeypatch.setitem(_library._DEFAULT_KERNELS, op, counted)
    got = _trajectory(name, (24, 40), torch.float32, steps=2, fused=False)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # 2 steps x (1 projected + 1 full-rank tensor) moment updates; Fira's residual each step; DCT's
    # matmul scoring at the refresh (step 1: the gap is 3).
    assert counts.pop("lowrank_adam_") == 4
    assert counts == {"fira": {"fira_residual_": 2}, "fira_folded": {"fira_folded_": 2}, "dct": {"dct_topk": 1}}.get(
        name, {}
    )


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
