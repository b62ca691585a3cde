"""fira_folded_update_: Fira's residual and limiter folded into the back-projection (arXiv 2410.01623).

Checked against (1) the explicit path of galore.py's Fira branch for a whole matrix (``_fira_residual``
then ``param -= step · add_project_back_(S, N, alpha=scale)``), run on copies of the same tensors, and
(2) an independent fp64 reference written from the formulas of :mod:`lowrank_optim.projection.fira`.

Tolerances: fp64 agrees to 1e-12 relative to the update (rounding order only); fp32 to
``2e-6 · max|ΔW| + 2 ulp(max|W|)``: the two paths round ``W -= step · (...)`` in different orders, and
the folded ``||S||`` comes from norms (see the function's docstring), which moves ``lim`` by about
``ulp · ||G||² / ||S||²`` relative.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from host_reads import recorded_host_reads

from lowrank_optim.optim.galore import FiraTerm, _fira_residual
from lowrank_optim.projection import Side, Subspace, add_project_back_
from lowrank_optim.projection.fira import FIRA_GAMMA, fira_folded_update_, norm_growth_limiter_

SHAPE, RANK, STEP = (48, 36), 8, 0.01

# (subtract, scale, residual_scale): code form (alpha=0.25), paper form (alpha=0.25), and one with all
# three different (subtract > 2 makes 2s - s² negative: no cancellation, the other sign of the identity).
FORMS = {"code": (0.25, 0.25, 1.0), "paper": (1.0, 0.25, 0.25), "mixed": (0.7, 1.3, 0.6), "sub2.5": (2.5, 0.5, 0.8)}


class Case(NamedTuple):
    weight: torch.Tensor
    grad: torch.Tensor
    lowrank: torch.Tensor
    normalized: torch.Tensor
    subspace: Subspace


def make_case(side: Side, dtype: torch.dtype, seed: int = 0, shape: tuple[int, int] = SHAPE) -> Case:
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    # A basis from the gradient's own SVD, as a refresh makes it: G then lies largely, not wholly, in it.
    u, _, vh = torch.linalg.svd(grad + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64))
    if side is Side.RIGHT:
        subspace = Subspace(side, None, vh[:RANK].to(dtype).contiguous())
    else:
        subspace = Subspace(side, u[:, :RANK].to(dtype).contiguous(), None)
    grad = grad.to(dtype)
    lowrank = grad @ subspace.right.T if side is Side.RIGHT else subspace.left.T @ grad
    normalized = torch.randn(lowrank.shape, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return Case(weight, grad, lowrank, normalized, subspace)


def explicit(
    case: Case, prev: torch.Tensor, form: tuple[float, float, float], *, first: bool, skip: torch.Tensor | None
) -> torch.Tensor:
    """What galore.py's Fira branch does for a whole matrix, on copies; returns the new weight."""
    subtract, scale, residual_scale = form
    weight = case.weight.clone()
    term = FiraTerm([prev], subtract, residual_scale, FIRA_GAMMA)
    residual = _fira_residual(
        case.grad, case.lowrank, case.normalized, case.subspace, prev, term, first=first, skip=skip, fused=False
    )
    weight.add_(add_project_back_(residual, case.normalized, case.subspace, alpha=scale), alpha=-STEP)
    return weight


def folded(
    case: Case, prev: torch.Tensor, form: tuple[float, float, float], *, first: bool, skip: torch.Tensor | None, **kwargs
) -> torch.Tensor:
    subtract, scale, residual_scale = form
    weight = case.weight.clone()
    out = fira_folded_update_(
        weight, case.grad, case.lowrank, case.normalized, case.subspace, prev,
        subtract=subtract, scale=scale, residual_scale=residual_scale, gamma=FIRA_GAMMA, first=first,
        step_size=STEP, skip=skip, **kwargs,
    )
    assert out is weight
    return weight


def reference(case: Case, prev: float, form: tuple[float, float, float], *, first: bool) -> tuple[torch.Tensor, float]:
    """fp64, from the formulas, with host arithmetic for the limiter: (new weight, new prev)."""
    subtract, scale, residual_scale = form
    w, g, r, nrm = (t.double() for t in (case.weight, case.grad, case.lowrank, case.normalized))
    if case.subspace.side is Side.RIGHT:
        p = case.subspace.right.double()
        back = lambda x: x @ p  # noqa: E731
        phi = nrm.norm(dim=1, keepdim=True) / (r.norm(dim=1, keepdim=True) + 1e-8)
    else:
        p = case.subspace.left.double()
        back = lambda x: p @ x  # noqa: E731
        phi = nrm.norm(dim=0, keepdim=True) / (r.norm(dim=0, keepdim=True) + 1e-8)
    s = (g - subtract * back(r)) * phi
    norm = s.norm().item()
    if first or prev == 0.0:
        lim, new_prev = 1.0, norm
    else:
        lim = max(norm / (prev + 1e-8), FIRA_GAMMA) / FIRA_GAMMA
        new_prev = norm / lim
    if norm == 0.0:
        new_prev = prev
    return w - STEP * (scale * back(nrm) + residual_scale * s / lim), new_prev


def first_norm(case: Case, form: tuple[float, float, float]) -> float:
    return reference(case, 0.0, form, first=True)[1]


def assert_update_close(actual: torch.Tensor, expected: torch.Tensor, before: torch.Tensor) -> None:
    delta = (expected.double() - before.double()).abs().max().item()
    if actual.dtype == torch.float64:
        bound = 1e-12 * delta
    else:
        bound = 2e-6 * delta + 2 * torch.finfo(actual.dtype).eps * before.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= bound, (diff, bound, delta)


# prev as a multiple of the first-step norm ||S||: 0.1 grows 10x (limiter active, lim ≈ 9.9);
# 10 shrinks (lim = 1); 0 is "no history" (stored unlimited).
HISTORY = {"first": None, "growth": 0.1, "shrink": 10.0, "nohistory": 0.0}


@pytest.mark.parametrize("skip", [None, False], ids=["noskip", "skipfalse"])
@pytest.mark.parametrize("history", list(HISTORY))
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("side", [Side.RIGHT, Side.LEFT], ids=["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_explicit_path_and_reference(dtype: torch.dtype, side: Side, form: str, history: str, skip: bool | None) -> None:
    case = make_case(side, dtype, seed=3)
    coefficients = FORMS[form]
    first = HISTORY[history] is None
    start = 0.0 if first else HISTORY[history] * first_norm(case, coefficients)
    # fp64 weights keep an fp64 limiter state here so that 1e-12 is reachable (the optimizer's is fp32).
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    prev_explicit = torch.tensor(start, dtype=state_dtype)
    prev_folded = prev_explicit.clone()
    flag = None if skip is None else torch.tensor(skip)

    expected = explicit(case, prev_explicit, coefficients, first=first, skip=flag)
    actual = folded(case, prev_folded, coefficients, first=first, skip=flag)
    assert_update_close(actual, expected, case.weight)
    ref_weight, ref_prev = reference(case, start, coefficients, first=first)
    assert_update_close(actual, ref_weight, case.weight)

    rel = 1e-12 if dtype == torch.float64 else 1e-5
    assert prev_folded.item() == pytest.approx(prev_explicit.item(), rel=rel)
    assert prev_folded.item() == pytest.approx(ref_prev, rel=rel)
    if history == "growth":  # the limiter cut the growth to exactly gamma (over prev + 1e-8)
        assert prev_folded.item() == pytest.approx(FIRA_GAMMA * (start + 1e-8), rel=rel)


@pytest.mark.parametrize("side", [Side.RIGHT, Side.LEFT], ids=["right", "left"])
def test_skip_false_has_the_bits_of_no_skip(side: Side) -> None:
    case = make_case(side, torch.float32, seed=4)
    prev_a, prev_b = torch.tensor(1.0), torch.tensor(1.0)
    a = folded(case, prev_a, FORMS["mixed"], first=False, skip=None)
    b = folded(case, prev_b, FORMS["mixed"], first=False, skip=torch.tensor(False))
    assert torch.equal(a, b) and torch.equal(prev_a, prev_b)


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan-inf"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
@pytest.mark.parametrize("side", [Side.RIGHT, Side.LEFT], ids=["right", "left"])
def test_skipped_update_leaves_weight_and_state_unchanged(side: Side, first: bool, nonfinite: bool) -> None:
    case = make_case(side, torch.float32, seed=5)
    if nonfinite:  # the case that sets the flag: G (hence R) holds NaN/Inf
        grad = case.grad.clone()
        grad[1, 2], grad[3, 4] = float("nan"), float("inf")
        lowrank = grad @ case.subspace.right.T if side is Side.RIGHT else case.subspace.left.T @ grad
        case = case._replace(grad=grad, lowrank=lowrank)
    # N as the Adam op leaves it when skipped (zero), and also a non-zero one: the folded update ignores it.
    for normalized in (torch.zeros_like(case.normalized), case.normalized):
        step_case = case._replace(normalized=normalized)
        prev = torch.tensor(2.5)
        weight = folded(step_case, prev, FORMS["code"], first=first, skip=torch.tensor(True))
        assert torch.equal(weight, case.weight)
        assert prev.item() == 2.5
    # The explicit path agrees where it is defined (N zero).
    prev = torch.tensor(2.5)
    weight = explicit(
        case._replace(normalized=torch.zeros_like(case.normalized)), prev, FORMS["code"], first=first, skip=torch.tensor(True)
    )
    assert torch.equal(weight, case.weight) and prev.item() == 2.5


def test_nonfinite_gradient_without_skip_propagates() -> None:
    """nonfinite='propagate' semantics: no skip flag, and NaN reaches the weight as on the explicit path."""
    case = make_case(Side.RIGHT, torch.float32, seed=6)
    grad = case.grad.clone()
    grad[0, 0] = float("nan")
    case = case._replace(grad=grad, lowrank=grad @ case.subspace.right.T)
    assert folded(case, torch.tensor(1.0), FORMS["code"], first=False, skip=None).isnan().any()


def test_full_side_is_refused() -> None:
    case = make_case(Side.RIGHT, torch.float32)
    full = Subspace(Side.FULL, torch.eye(SHAPE[0], RANK), case.subspace.right)
    with pytest.raises(ValueError, match="one-sided"):
        folded(case._replace(subspace=full), torch.tensor(0.0), FORMS["code"], first=True, skip=None)


@pytest.mark.parametrize("side", [Side.RIGHT, Side.LEFT], ids=["right", "left"])
def test_no_host_reads(side: Side, monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case(side, torch.float32, seed=7)
    prev = torch.tensor(1.0)
    with recorded_host_reads(monkeypatch) as read:
        for first, skip in ((True, None), (False, None), (False, torch.tensor(False)), (False, torch.tensor(True))):
            folded(case, prev, FORMS["mixed"], first=first, skip=skip)
    assert read == []


@pytest.mark.parametrize("side", [Side.RIGHT, Side.LEFT], ids=["right", "left"])
def test_gradient_inside_the_subspace_clamps_to_zero(side: Side) -> None:
    """G = back(R) exactly (up to rounding): the explicit ||S|| is rounding noise, the folded one is
    clamped at 0 or tiny; both updates agree to the fp32 tolerance and nothing is NaN."""
    case = make_case(side, torch.float32, seed=8)
    p = case.subspace.right if side is Side.RIGHT else case.subspace.left
    grad = case.lowrank @ p if side is Side.RIGHT else p @ case.lowrank
    lowrank = grad @ p.T if side is Side.RIGHT else p.T @ grad
    case = case._replace(grad=grad, lowrank=lowrank)
    prev_e, prev_f = torch.tensor(1.0), torch.tensor(1.0)
    expected = explicit(case, prev_e, FORMS["paper"], first=False, skip=None)
    actual = folded(case, prev_f, FORMS["paper"], first=False, skip=None)
    assert not actual.isnan().any()
    assert_update_close(actual, expected, case.weight)


@pytest.mark.parametrize("side", [Side.RIGHT, Side.LEFT], ids=["right", "left"])
@pytest.mark.parametrize("outside", [1e-1, 1e-2])
def test_cancellation_accuracy_of_the_norm(side: Side, outside: float) -> None:
    """G almost in the subspace (||G - back(R)|| / ||G|| = outside): the folded fp32 ||S|| (read off the
    stored limiter state on a first step) stays within ``50 · eps / outside²`` of the fp64 value, and
    norm_dtype=float64 does no worse."""
    case = make_case(side, torch.float64, seed=9, shape=(256, 192))
    p = case.subspace.right if side is Side.RIGHT else case.subspace.left
    inside = case.lowrank @ p if side is Side.RIGHT else p @ case.lowrank
    noise = case.grad - inside  # orthogonal to the subspace
    grad64 = inside + noise * (outside * inside.norm() / noise.norm())
    truth = None
    errors = {}
    for name, dtype, norm_dtype in (
        ("fp64", torch.float64, None),
        ("fp32", torch.float32, None),
        ("fp32/64", torch.float32, torch.float64),
    ):
        basis = p.to(dtype)
        grad = grad64.to(dtype)
        lowrank = grad @ basis.T if side is Side.RIGHT else basis.T @ grad
        sub = Subspace(side, None, basis) if side is Side.RIGHT else Subspace(side, basis, None)
        step_case = Case(case.weight.to(dtype), grad, lowrank, case.normalized.to(dtype), sub)
        prev = torch.tensor(0.0, dtype=torch.float64)
        folded(step_case, prev, FORMS["paper"], first=True, skip=None, norm_dtype=norm_dtype)
        if truth is None:
            truth = prev.item()
        errors[name] = abs(prev.item() - truth) / truth
    bound = 50 * torch.finfo(torch.float32).eps / outside**2
    assert errors["fp32"] <= bound, errors
    assert errors["fp32/64"] <= bound, errors
    assert errors["fp64"] == 0.0


def test_limiter_factor_matches_limit_norm_growth() -> None:
    """norm_growth_limiter_ is the state half of limit_norm_growth_: same state, residual / lim."""
    from lowrank_optim.projection import limit_norm_growth_

    residual = torch.randn(5, 7)
    norm = residual.norm()
    for start in (0.0, 0.1, 100.0):
        for skip in (None, torch.tensor(False), torch.tensor(True)):
            prev_a, prev_b = torch.tensor(start), torch.tensor(start)
            limited = limit_norm_growth_(residual.clone(), prev_a, gamma=FIRA_GAMMA, first=False, skip=skip)
            lim = norm_growth_limiter_(norm, prev_b, gamma=FIRA_GAMMA, first=False, skip=skip)
            assert torch.equal(prev_a, prev_b)
            assert torch.equal(limited, residual / lim)


@pytest.mark.parametrize("side", [Side.RIGHT, Side.LEFT], ids=["right", "left"])
def test_no_matrix_sized_temporary_without_skip(side: Side) -> None:
    """skip=None allocates nothing near m x n (the profiler's allocation records; the LEFT side's fixed
    256 KiB square-sum buffer is a tenth of this matrix); a skip flag costs one m x n temporary."""
    from torch.profiler import ProfilerActivity, profile

    case = make_case(side, torch.float32, seed=10, shape=(1376, 512) if side is Side.RIGHT else (512, 1376))
    matrix_bytes = case.weight.numel() * case.weight.element_size()
    for skip, limit in ((None, matrix_bytes // 4), (torch.tensor(False), matrix_bytes)):
        weight, prev = case.weight.clone(), torch.tensor(1.0)  # the copy outside the profiled region
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fira_folded_update_(
                weight, case.grad, case.lowrank, case.normalized, case.subspace, prev, subtract=0.25, scale=0.25,
                residual_scale=1.0, gamma=FIRA_GAMMA, first=False, step_size=STEP, skip=skip,
            )
        largest = max(event.cpu_memory_usage for event in prof.events())
        assert largest <= limit, (skip, largest, matrix_bytes)
