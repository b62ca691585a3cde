"""Randomized subspace-iteration refresh (lowrank_optim.projection.rsvd): accuracy and contract."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lowrank_optim.projection import Side, svd_basis
from lowrank_optim.projection.rsvd import captured_energy, optimal_energy, randomized_basis

SIDES = [Side.LEFT, Side.RIGHT, Side.FULL]


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spectrum_matrix(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``U diag(sigma) Vᵀ`` with random orthonormal ``U`` (m x len), ``V`` (n x len)."""
    generator = _seeded(seed)
    u = torch.linalg.qr(torch.randn(m, len(sigma), generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(sigma), generator=generator, dtype=torch.float64)).Q
    return ((u * sigma.double()) @ v.T).float()


def _decaying(m: int, n: int, decay: float, seed: int = 0) -> torch.Tensor:
    return _spectrum_matrix(m, n, torch.arange(1, min(m, n) + 1, dtype=torch.float64).pow(-decay), seed)


@pytest.mark.parametrize("shape", [(80, 50), (50, 80)])
@pytest.mark.parametrize("side", SIDES)
def test_planted_low_rank_is_recovered_exactly(shape, side):
    rank = 6
    grad = _spectrum_matrix(*shape, torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0, 1.0]), seed=1)
    left, right = randomized_basis(grad, rank, side, generator=_seeded())
    assert captured_energy(grad, left, right) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("decay", [0.5, 1.0])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_decaying_spectrum_reaches_995_permille_of_optimal_with_defaults(decay, shape):
    rank = 24
    grad = _decaying(*shape, decay, seed=2)
    side = Side.RIGHT if shape[0] >= shape[1] else Side.LEFT
    left, right = randomized_basis(grad, rank, side, generator=_seeded())
    assert captured_energy(grad, left, right) >= 0.995 * optimal_energy(grad, rank)


@pytest.mark.parametrize("shape", [(90, 40), (40, 90)])
def test_bases_are_orthonormal(shape):
    grad = _decaying(*shape, 1.0, seed=3)
    left, right = randomized_basis(grad, 10, Side.FULL, generator=_seeded())
    eye = torch.eye(10)
    torch.testing.assert_close(left.T @ left, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(right @ right.T, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [4, 200])  # 200 > min(m, n): both clamp to min(m, n)
@pytest.mark.parametrize("shape", [(70, 30), (30, 70)])
@pytest.mark.parametrize("side", SIDES)
def test_shapes_and_dtypes_match_svd_basis(side, shape, rank):
    grad = torch.randn(shape, generator=_seeded(4))
    expected = svd_basis(grad, rank, side)
    got = randomized_basis(grad, rank, side, generator=_seeded())
    for want, have in zip(expected, got):
        if want is None:
            assert have is None
        else:
            assert have.shape == want.shape
            assert have.dtype == want.dtype == torch.float32
            assert have.device == want.device


def test_ordered_by_singular_value_like_svd_basis():
    # Well-separated singular values: the directions match svd_basis's one by one, up to sign.
    grad = _spectrum_matrix(60, 40, torch.tensor([10.0, 6.0, 3.0, 1.5, 0.7, 0.3, 0.1]), seed=5)
    left, right = randomized_basis(grad, 4, Side.FULL, generator=_seeded())
    svd_left, svd_right = svd_basis(grad, 4, Side.FULL)
    torch.testing.assert_close((left * svd_left).sum(0).abs(), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close((right * svd_right).sum(1).abs(), torch.ones(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", SIDES)
def test_fixed_seed_is_deterministic(side):
    grad = _decaying(64, 48, 0.5, seed=6)
    first = randomized_basis(grad, 8, side, generator=_seeded(7))
    second = randomized_basis(grad, 8, side, generator=_seeded(7))
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("side", SIDES)
def test_warm_start_from_exact_basis_converges_in_one_iteration(side):
    rank = 12
    # Slow decay: a cold start with one iteration falls short here, so the warm start is what helps.
    grad = _decaying(200, 150, 0.5, seed=8)
    exact = svd_basis(grad, rank, side)
    optimum = optimal_energy(grad, rank)
    warm = randomized_basis(grad, rank, side, exact, oversample=4, iterations=1, generator=_seeded())
    cold = randomized_basis(grad, rank, side, oversample=4, iterations=1, generator=_seeded())
    assert captured_energy(grad, *warm) == pytest.approx(optimum, rel=1e-5)
    assert captured_energy(grad, *cold) < captured_energy(grad, *warm)


def test_warm_start_from_a_perturbed_gradient():
    rank = 16
    earlier = _decaying(240, 160, 0.5, seed=9)
    noise = torch.randn(earlier.shape, generator=_seeded(10))
    grad = earlier + 0.3 * earlier.norm() / noise.norm() * noise
    previous = svd_basis(earlier, rank, Side.RIGHT)
    left, right = randomized_basis(grad, rank, Side.RIGHT, previous, generator=_seeded())
    assert captured_energy(grad, left, right) >= 0.995 * optimal_energy(grad, rank)


def test_warm_start_accepts_fewer_previous_directions():
    grad = _decaying(100, 60, 1.0, seed=11)
    previous = svd_basis(grad, 5, Side.RIGHT)
    left, right = randomized_basis(grad, 10, Side.RIGHT, previous, generator=_seeded())
    assert left is None and right.shape == (10, 60)
    assert captured_energy(grad, left, right) >= 0.995 * optimal_energy(grad, 10)


def test_bf16_input_is_computed_in_fp32():
    grad = _decaying(96, 64, 1.0, seed=12).bfloat16()
    left, right = randomized_basis(grad, 8, Side.FULL, generator=_seeded())
    assert left.dtype == right.dtype == torch.float32
    assert captured_energy(grad, None, right) >= 0.995 * optimal_energy(grad, 8)
    assert captured_energy(grad, left, None) >= 0.995 * optimal_energy(grad, 8)


@pytest.mark.parametrize("name", ["oversample", "iterations"])
@pytest.mark.parametrize("value", [-1, -3])
def test_negative_knobs_are_rejected_with_the_value(name, value):
    grad = torch.randn(20, 10, generator=_seeded())
    message = f"Invalid {name}: {value}. Must be an int >= 0."
    with pytest.raises(ValueError, match=re.escape(message)):
        randomized_basis(grad, 4, Side.RIGHT, **{name: value})


def test_bad_previous_and_rank_are_rejected():
    grad = torch.randn(20, 10, generator=_seeded())
    with pytest.raises(ValueError, match=re.escape("Invalid previous right basis: shape (4, 11)")):
        randomized_basis(grad, 4, Side.RIGHT, (None, torch.randn(4, 11)))
    with pytest.raises(ValueError, match=re.escape("Invalid previous: no basis for side 'left'")):
        randomized_basis(grad, 4, Side.LEFT, (None, torch.randn(4, 10)))
    with pytest.raises(ValueError, match=re.escape("Invalid rank: 0. Must be an int >= 1.")):
        randomized_basis(grad, 0, Side.RIGHT)


def test_energy_helpers():
    grad = _spectrum_matrix(30, 20, torch.tensor([3.0, 2.0, 1.0]), seed=13)
    assert optimal_energy(grad, 1) == pytest.approx(9 / 14, rel=1e-6)
    left, right = svd_basis(grad, 2, Side.FULL)
    assert captured_energy(grad, left, None) == pytest.approx(13 / 14, rel=1e-5)
    assert captured_energy(grad, None, right) == pytest.approx(13 / 14, rel=1e-5)
    assert captured_energy(grad, left, right) == pytest.approx(13 / 14, rel=1e-5)


def test_range_basis_uses_cholesky_qr_only_while_it_is_accurate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Intermediate blocks: Cholesky-QR for a well-conditioned block, Householder QR past the
    condition threshold; both return an orthonormal basis of the block's range."""
    from lowrank_optim.projection import rsvd

    householder = []
    original = rsvd._orthonormalize
    monkeypatch.setattr(rsvd, "_orthonormalize", lambda block: householder.append(1) or original(block))
    generator = torch.Generator().manual_seed(4)
    u = torch.linalg.qr(torch.randn(200, 6, generator=generator)).Q
    for spread, used in ((10.0, 0), (10 * rsvd._CHOLESKY_QR_MAX_RATIO, 1)):
        block = u * torch.logspace(0, -math.log10(spread), 6)
        basis = rsvd._range_basis(block)
        assert len(householder) == used
        torch.testing.assert_close(basis.T @ basis, torch.eye(6), atol=1e-4, rtol=0)
        torch.testing.assert_close(basis @ (basis.T @ u), u, atol=1e-3, rtol=0)  # the same range
