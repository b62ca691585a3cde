"""DCT projector: basis, both scoring paths, selection, GaLore arithmetic, moment carry-over, state, errors."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.fft
import torch
from reference import GaLoreReference, dct2_matrix, dct_top_indices
from roundtrip import checkpoint_roundtrip
from torch import nn

from lowrank_optim import DCTAdamW, GaLoreAdamW, optimizer_state_bytes
from lowrank_optim.projection import (
    FFT_SCORING_MIN_SIZE,
    Side,
    carry_moment_,
    dct_ii,
    dct_matrix,
    dct_scores,
    select_dct_indices,
)

SHAPES = {"tall": (12, 8), "wide": (8, 12), "square": (10, 10)}
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
CPU = torch.device("cpu")


def gradient_sequence(shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize("size", [1, 2, 7, 8, 33])
def test_basis_is_orthonormal_dct_ii_like_scipy(size: int) -> None:
    q = dct_matrix(size, torch.float64, CPU)
    # Column j of scipy's matrix is the DCT of e_j, so row k is frequency k: the same orientation.
    expected = scipy.fft.dct(np.eye(size), type=2, norm="ortho", axis=0)
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-14, rtol=0)
    torch.testing.assert_close(q @ q.T, torch.eye(size, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(q, dct2_matrix(size), atol=1e-14, rtol=0)
    q32 = dct_matrix(size, torch.float32, CPU)
    assert q32.dtype == torch.float32 and q32 is dct_matrix(size, torch.float32, CPU)  # cached per key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (16, 10), (5, 1), (3, 2)])
def test_fft_scoring_equals_matmul_scoring(shape: tuple[int, int], dtype: torch.dtype) -> None:
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = grad.double().numpy()
    np.testing.assert_allclose(
        dct_ii(grad).double().numpy(), scipy.fft.dct(x, type=2, norm="ortho", axis=1), atol=1e-5, rtol=1e-5
    )
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    for side in (Side.LEFT, Side.RIGHT):
        fft = dct_scores(grad, side, "fft")
        matmul = dct_scores(grad, side, "matmul")
        assert fft.dtype == dtype
        torch.testing.assert_close(fft, matmul, atol=atol, rtol=atol)
        torch.testing.assert_close(dct_scores(grad, side, "auto"), matmul, atol=atol, rtol=atol)


def test_fft_scoring_in_several_row_blocks_equals_matmul() -> None:
    grad = torch.randn(33000, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(dct_scores(grad, Side.RIGHT, "fft"), dct_scores(grad, Side.RIGHT, "matmul"))


def test_auto_scoring_switches_to_fft_at_the_measured_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import lowrank_optim.projection.dct as dct_module

    calls = []
    real = dct_module._dct_ii_halves
    monkeypatch.setattr(dct_module, "_dct_ii_halves", lambda x: calls.append(x.shape) or real(x))
    dct_scores(torch.randn(4, FFT_SCORING_MIN_SIZE - 1), Side.RIGHT, "auto")
    assert calls == []
    dct_scores(torch.randn(4, FFT_SCORING_MIN_SIZE), Side.RIGHT, "auto")
    assert calls == [(4, FFT_SCORING_MIN_SIZE)]


@pytest.mark.parametrize("scoring", ["matmul", "fft"])
def test_selected_indices_are_sorted_top_r_of_the_formula(scoring: str) -> None:
    for shape, side in (((20, 11), Side.RIGHT), ((11, 20), Side.LEFT)):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        indices = select_dct_indices(grad, 4, side, scoring)
        assert indices.dtype == torch.int64
        assert indices.tolist() == dct_top_indices(grad, 4, side.value)


def test_bf16_gradients_are_scored_in_fp32() -> None:
    grad = torch.randn(12, 9, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert dct_scores(grad, Side.RIGHT, "fft").dtype == torch.float32
    assert select_dct_indices(grad, 3, Side.RIGHT).tolist() == dct_top_indices(grad.float(), 3, "right")


def run_pair(
    shape: tuple[int, int],
    *,
    steps: int = 7,
    rank: int = 4,
    gap: int = 3,
    proj_type: str = "std",
    weight_decay: float = 0.0,
    foreach: bool = False,
    fused: bool | None = None,
    moment_policy: str = "keep",
    grads: list[torch.Tensor] | None = None,
    scoring: str = "auto",
) -> tuple[list[torch.Tensor], list[GaLoreReference], DCTAdamW]:
    generator = torch.Generator().manual_seed(1)
    weight = nn.Parameter(torch.randn(shape, generator=generator))
    bias = nn.Parameter(torch.randn(shape[0], generator=generator))
    hyper = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay)
    projected = dict(rank=rank, update_proj_gap=gap, scale=0.25, proj_type=proj_type)
    optimizer = DCTAdamW(
        [{"params": [bias]}, {"params": [weight], **projected}],
        foreach=foreach,
        fused=fused,
        moment_policy=moment_policy,
        scoring=scoring,
        **hyper,
    )
    ref_weight = GaLoreReference(weight, projector="dct", moment_policy=moment_policy, **projected, **hyper)
    ref_bias = GaLoreReference(bias, **hyper)
    grads = grads or gradient_sequence(shape, steps, 2)
    for g_weight, g_bias in zip(grads, gradient_sequence(shape[:1], len(grads), 3)):
        weight.grad, bias.grad = g_weight.clone(), g_bias.clone()
        optimizer.step()
        ref_weight.update(g_weight)
        ref_bias.update(g_bias)
    return [weight.detach(), bias.detach()], [ref_weight, ref_bias], optimizer


def test_first_step_is_galore_formula_on_selected_frequencies() -> None:
    """ΔW = -lr · sqrt(1-b2)/(1-b1) · scale · N Q[idx] with idx = top-r(||G Qᵀ||₁), N = M/(sqrt(V)+eps)."""
    grad = torch.randn(12, 8, generator=torch.Generator().manual_seed(5))
    weight = nn.Parameter(torch.zeros(12, 8))
    optimizer = DCTAdamW([{"params": [weight], "rank": 3, "scale": 0.25}], lr=0.01, betas=(0.9, 0.99))
    weight.grad = grad
    optimizer.step()
    idx = dct_top_indices(grad, 3, "right")
    basis = dct2_matrix(8)[idx]
    r_grad = grad.double() @ basis.T
    n = (0.1 * r_grad) / ((0.01 * r_grad**2).sqrt() + 1e-6)
    expected = -0.01 * (0.01**0.5 / 0.1) * 0.25 * n @ basis
    torch.testing.assert_close(weight.double(), expected, atol=1e-7, rtol=1e-6)
    assert optimizer.state[weight]["dct_indices_right"].tolist() == idx


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["nowd", "wd"])
@pytest.mark.parametrize("shape_kind", list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_fp64_reference(proj_type: str, shape_kind: str, weight_decay: float, foreach: bool) -> None:
    """7 steps with gap 3: re-selections at steps 1, 4 and 7 move the moments with their frequencies."""
    (weight, bias), (ref_weight, ref_bias), _ = run_pair(
        SHAPES[shape_kind], proj_type=proj_type, weight_decay=weight_decay, foreach=foreach
    )
    torch.testing.assert_close(weight.double(), ref_weight.weight, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(bias.double(), ref_bias.weight, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("scoring", ["matmul", "fft"])
def test_moment_policy_reset_and_scorings_match_reference(scoring: str) -> None:
    for policy in ("keep", "reset"):
        (weight, _), (ref_weight, _), _ = run_pair((10, 9), moment_policy=policy, scoring=scoring)
        torch.testing.assert_close(weight.double(), ref_weight.weight, atol=2e-6, rtol=1e-5)


def test_foreach_equals_single_tensor_bitwise() -> None:
    for proj_type in ("std", "full"):
        # fused=False: the reference single-tensor loop (the kernels are within ulps, test_fused.py).
        single, _, _ = run_pair((9, 6), proj_type=proj_type, weight_decay=0.1, foreach=False, fused=False)
        multi, _, _ = run_pair((9, 6), proj_type=proj_type, weight_decay=0.1, foreach=True)
        for a, b in zip(single, multi):
            assert torch.equal(a, b)


def test_carry_moment_moves_kept_frequencies_and_zeroes_new_ones() -> None:
    moment = torch.arange(1.0, 13.0).view(4, 3)  # columns belong to frequencies 1, 3, 5
    carry_moment_(moment, torch.tensor([1, 3, 5]), torch.tensor([0, 3, 5]), dim=1)
    assert moment.tolist() == [[0, 2, 3], [0, 5, 6], [0, 8, 9], [0, 11, 12]]
    moment = torch.arange(1.0, 7.0).view(3, 2)  # rows belong to frequencies 2, 4, 6
    carry_moment_(moment, torch.tensor([2, 4, 6]), torch.tensor([4, 6, 7]), dim=0)
    assert moment.tolist() == [[3, 4], [5, 6], [0, 0]]


def test_moments_follow_frequencies_across_a_refresh_that_changes_some() -> None:
    """Gradients built from frequencies {1, 3, 5} for 2 steps, then {1, 4, 5} at the refresh (step 3)."""
    q = dct2_matrix(8).float()
    generator = torch.Generator().manual_seed(0)

    def built(frequencies: list[int]) -> torch.Tensor:
        return (3 + torch.rand(10, 3, generator=generator)) @ q[frequencies]

    grads = [built([1, 3, 5]), built([1, 3, 5]), built([1, 4, 5]), built([1, 4, 5])]
    _, (ref_weight, _), optimizer = run_pair((10, 8), rank=3, gap=2, grads=grads[:2])
    param = optimizer.param_groups[1]["params"][0]
    state = optimizer.state[param]
    assert state["dct_indices_right"].tolist() == [1, 3, 5]
    exp_avg, exp_avg_sq = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    param.grad = grads[2].clone()
    optimizer.step()
    ref_weight.update(grads[2])
    assert state["dct_indices_right"].tolist() == [1, 4, 5]
    r_grad = grads[2] @ q[[1, 4, 5]].T
    # Frequencies 1 and 5 kept their columns (positions 0 and 2); 4 is new and starts from zero.
    torch.testing.assert_close(state["exp_avg"][:, [0, 2]], 0.9 * exp_avg[:, [0, 2]] + 0.1 * r_grad[:, [0, 2]])
    torch.testing.assert_close(state["exp_avg"][:, 1], 0.1 * r_grad[:, 1])
    torch.testing.assert_close(state["exp_avg_sq"][:, 1], 0.01 * r_grad[:, 1] ** 2)
    kept_sq = 0.99 * exp_avg_sq[:, [0, 2]] + 0.01 * r_grad[:, [0, 2]] ** 2
    torch.testing.assert_close(state["exp_avg_sq"][:, [0, 2]], kept_sq)
    torch.testing.assert_close(param.detach().double(), ref_weight.weight, atol=2e-6, rtol=1e-5)


def test_state_holds_indices_only() -> None:
    a, b = nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(8, 6))
    optimizer = DCTAdamW([{"params": [a], "rank": 3}, {"params": [b], "rank": 2, "proj_type": "full"}])
    a.grad, b.grad = torch.randn(12, 8), torch.randn(8, 6)
    optimizer.step()
    assert set(optimizer.state[a]) == {"step", "exp_avg", "exp_avg_sq", "dct_indices_right"}
    assert set(optimizer.state[b]) == {"step", "exp_avg", "exp_avg_sq", "dct_indices_left", "dct_indices_right"}
    for key in ("dct_indices_left", "dct_indices_right"):
        indices = optimizer.state[b][key]
        assert indices.dtype == torch.int64 and indices.shape == (2,)
        assert torch.equal(indices, indices.sort().values)
    assert optimizer.state[b]["exp_avg"].shape == (2, 2)
    # step counters, moments (12x3 and 2x2, twice) and 3 + 2 + 2 int64 indices: no basis anywhere.
    assert optimizer_state_bytes(optimizer) == 4 * 2 + 4 * 2 * (12 * 3 + 2 * 2) + 8 * (3 + 2 + 2)


def test_galore_accepts_dct_projector_per_group() -> None:
    a, b = nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(12, 8))
    optimizer = GaLoreAdamW([{"params": [a], "rank": 3}, {"params": [b], "rank": 3, "projector": "dct"}])
    a.grad, b.grad = torch.randn(12, 8), torch.randn(12, 8)
    optimizer.step()
    assert "basis_right" in optimizer.state[a] and "dct_indices_right" in optimizer.state[b]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_checkpoint_roundtrip_weights_only_continues_bit_identically(dtype: torch.dtype, foreach: bool) -> None:
    resumed, model = checkpoint_roundtrip(
        lambda groups: DCTAdamW(groups, lr=0.01, weight_decay=0.01, foreach=foreach),
        {"scale": 0.5, "proj_type": "full"},
        dtype,
    )
    assert resumed.state[model[0].weight]["dct_indices_left"].dtype == torch.int64


def test_bf16_weights_track_reference() -> None:
    weight32 = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    weight = nn.Parameter(weight32.bfloat16())
    optimizer = DCTAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 3}], lr=0.01)
    reference = GaLoreReference(weight.detach().float(), rank=4, update_proj_gap=3, projector="dct", lr=0.01)
    for grad in gradient_sequence((16, 8), 5, 5):
        weight.grad = grad.bfloat16()
        optimizer.step()
        reference.update(grad.bfloat16().float())
    assert weight.dtype == torch.bfloat16 and optimizer.state[weight]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(weight.double(), reference.weight, atol=0.02, rtol=0.02)


def test_nonfinite_gradient_at_refresh_keeps_previous_indices() -> None:
    weight = nn.Parameter(torch.randn(6, 4))
    optimizer = DCTAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 2}], lr=0.01)
    grads = gradient_sequence((6, 4), 4, 0)
    bad = grads[0].clone()
    bad[0, 0] = float("nan")
    weight.grad = bad
    before = weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=re.escape("DCTAdamW: a gradient with NaN/Inf arrived")):
        optimizer.step()
    assert torch.equal(weight, before) and int(optimizer.state[weight]["step"]) == 0
    for grad in grads[:2]:
        weight.grad = grad
        optimizer.step()
    indices = optimizer.state[weight]["dct_indices_right"].clone()
    bad = grads[2].clone()
    bad[1, 1] = float("inf")
    weight.grad = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert torch.equal(optimizer.state[weight]["dct_indices_right"], indices)


@pytest.mark.parametrize(
    "group_update,kwargs,message",
    [
        ({}, {"projector": "qr"}, "Invalid projector: 'qr'. Must be one of svd, "),
        ({}, {"scoring": "dft"}, "Invalid scoring: 'dft'. Must be one of auto, matmul, fft."),
        ({"projector": "qr"}, {}, "Invalid projector in param group 0: 'qr'. Must be one of svd, "),
        ({"scoring": None}, {}, "Invalid scoring in param group 0: None. Must be one of auto, matmul, fft."),
        ({"rank": 0}, {}, "Invalid rank in param group 0: 0. Must be a positive integer."),
        ({"scale": float("nan")}, {}, "Invalid scale in param group 0: nan. Must be a finite number."),
    ],
)
def test_bad_arguments_are_refused_at_construction(group_update: dict, kwargs: dict, message: str) -> None:
    weight = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=re.escape(message)):
        DCTAdamW([{"params": [weight], "rank": 2, **group_update}], **kwargs)


def test_unknown_scoring_in_the_pure_function_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("Invalid scoring: 'dft'. Must be one of auto, matmul, fft.")):
        dct_scores(torch.randn(4, 3), Side.RIGHT, "dft")
