"""FiraAdamW against the fp64 reference: residual scaling, limiter, implementations, checkpoints, bad input."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from host_reads import recorded_host_reads
from reference import FiraReference
from roundtrip import checkpoint_roundtrip
from torch import nn

from lowrank_optim import FiraAdamW, GaLoreAdamW, optimizer_state_bytes
from lowrank_optim.projection import Side, Subspace, fira_residual, fira_scaling, limit_norm_growth_

SHAPES = {"tall": (12, 8), "wide": (8, 12), "square": (10, 10)}
ONE_SIDED = ("std", "reverse_std", "left", "right")


def gradient_sequence(shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def run_pair(
    shape: tuple[int, int],
    *,
    steps: int = 7,
    rank: int = 4,
    gap: int = 3,
    alpha: float = 0.25,
    foreach: bool = False,
    fused: bool | None = None,
    grads: list[torch.Tensor] | None = None,
    **options: Any,
) -> tuple[list[torch.Tensor], list[FiraReference], FiraAdamW]:
    """Step a projected matrix and a full-rank vector with FiraAdamW and with the fp64 references."""
    generator = torch.Generator().manual_seed(1)
    weight = nn.Parameter(torch.randn(shape, generator=generator))
    bias = nn.Parameter(torch.randn(shape[0], generator=generator))
    hyper = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=options.pop("weight_decay", 0.0))
    fold = {"fold_residual": options.pop("fold_residual")} if "fold_residual" in options else {}
    projected = dict(rank=rank, update_proj_gap=gap, alpha=alpha, **options)
    optimizer = FiraAdamW(
        [{"params": [bias]}, {"params": [weight], **projected}], foreach=foreach, fused=fused, **hyper, **fold
    )
    projected["scale"] = projected.pop("alpha")
    ref_weight = FiraReference(weight, **projected, **hyper)
    ref_bias = FiraReference(bias, **hyper)
    grads = grads or gradient_sequence(shape, steps, 2)
    for g_weight, g_bias in zip(grads, gradient_sequence(shape[:1], len(grads), 3)):
        weight.grad, bias.grad = g_weight.clone(), g_bias.clone()
        optimizer.step()
        ref_weight.update(g_weight)
        ref_bias.update(g_bias)
    return [weight.detach(), bias.detach()], [ref_weight, ref_bias], optimizer


@pytest.mark.parametrize("fold_residual", [True, False], ids=["folded", "explicit"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["nowd", "wd"])
@pytest.mark.parametrize("shape_kind", list(SHAPES))
@pytest.mark.parametrize("proj_type", ONE_SIDED)
def test_matches_fp64_reference(proj_type: str, shape_kind: str, weight_decay: float, foreach: bool, fold_residual: bool) -> None:
    """7 steps with gap 3: refreshes at steps 1, 4 and 7, the limiter active from step 2."""
    (weight, bias), (ref_weight, ref_bias), optimizer = run_pair(
        SHAPES[shape_kind], proj_type=proj_type, weight_decay=weight_decay, foreach=foreach, fold_residual=fold_residual
    )
    torch.testing.assert_close(weight.double(), ref_weight.weight, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(bias.double(), ref_bias.weight, atol=2e-6, rtol=1e-5)
    stored = optimizer.state[optimizer.param_groups[1]["params"][0]]["residual_norm"]
    assert stored.dtype == torch.float32 and stored.dim() == 0
    assert stored.item() == pytest.approx(ref_weight.norms[-1], rel=1e-5)


@pytest.mark.parametrize("projector", ["svd", "dct"])
@pytest.mark.parametrize("shape_kind", ["tall", "wide"])
def test_paper_residual_and_dct_projector_match_reference(projector: str, shape_kind: str) -> None:
    for residual in ("code", "paper"):
        for fold_residual in (True, False):
            (weight, _), (ref_weight, _), _ = run_pair(
                SHAPES[shape_kind], projector=projector, residual=residual, fold_residual=fold_residual
            )
            torch.testing.assert_close(weight.double(), ref_weight.weight, atol=2e-6, rtol=1e-5)


def test_alpha_one_paper_and_code_forms_agree() -> None:
    (code, _), _, _ = run_pair((12, 8), alpha=1.0, residual="code")
    (paper, _), _, _ = run_pair((12, 8), alpha=1.0, residual="paper")
    torch.testing.assert_close(code, paper, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side,shape", [(Side.RIGHT, (9, 5)), (Side.LEFT, (5, 9))], ids=["tall-rows", "wide-columns"])
def test_scaling_factor_per_row_of_tall_and_per_column_of_wide(side: Side, shape: tuple[int, int]) -> None:
    """phi runs over the unprojected (larger) dimension: one factor per row (tall) or column (wide)."""
    generator = torch.Generator().manual_seed(0)
    m, n = shape
    low_shape = (m, 3) if side is Side.RIGHT else (3, n)
    normalized, lowrank = torch.randn(low_shape, generator=generator), torch.randn(low_shape, generator=generator)
    phi = fira_scaling(normalized, lowrank, side)
    if side is Side.RIGHT:
        assert phi.shape == (m, 1)
        expected = [normalized[i].norm() / (lowrank[i].norm() + 1e-8) for i in range(m)]
        torch.testing.assert_close(phi[:, 0], torch.stack(expected))
    else:
        assert phi.shape == (1, n)
        expected = [normalized[:, j].norm() / (lowrank[:, j].norm() + 1e-8) for j in range(n)]
        torch.testing.assert_close(phi[0], torch.stack(expected))


def limiter_gradients(scales: list[float]) -> list[torch.Tensor]:
    """``A + c_t B``: a strong fixed part in columns 0-1 (the rank-2 subspace picked at step 1) and a
    residual part ``B`` (columns 2-7) scaled by ``c_t``, so the residual norm follows ``c_t``."""
    generator = torch.Generator().manual_seed(7)
    a = torch.zeros(12, 8)
    a[:, :2] = 10 * torch.randn(12, 2, generator=generator)
    b = torch.zeros(12, 8)
    b[:, 2:] = torch.randn(12, 6, generator=generator)
    return [a + c * b for c in scales]


def folded_norm_bounds(grads: list[torch.Tensor], rank: int) -> list[float]:
    """The folded update's documented relative error of ``||S||`` per step, ``ulp · ||G||² / ||G⊥||²``
    (times 8 for the few roundings it sums), ``G⊥`` being ``G`` outside the rank-``rank`` subspace of the
    first gradient's right singular vectors (the limiter test's basis: gap 100, one refresh)."""
    basis = torch.linalg.svd(grads[0].double(), full_matrices=False)[2][:rank]
    bounds = []
    for grad in grads:
        g = grad.double()
        outside = g - g @ basis.T @ basis
        bounds.append(8 * torch.finfo(torch.float32).eps * (g.norm() / outside.norm()).item() ** 2)
    return bounds


@pytest.mark.parametrize("fold_residual", [False, True], ids=["explicit", "folded"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_limiter_caps_growth_at_exactly_gamma_and_passes_shrinking(foreach: bool, fold_residual: bool) -> None:
    """The residual's part of ``G`` shrinks to 2 % of it in the last steps: the explicit form's stored norm
    is the reference's to 1e-5, the folded one's within its documented ``ulp · ||G||² / ||G⊥||²``."""
    scales = [1.0, 2.0, 4.0, 8.0, 0.25, 0.125]
    grads = limiter_gradients(scales)
    generator = torch.Generator().manual_seed(1)
    weight = nn.Parameter(torch.randn(12, 8, generator=generator))
    optimizer = FiraAdamW(
        [{"params": [weight], "rank": 2, "update_proj_gap": 100}], lr=0.01, foreach=foreach, fold_residual=fold_residual
    )
    reference = FiraReference(weight, rank=2, update_proj_gap=100, lr=0.01)
    stored = []
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
        reference.update(grad)
        stored.append(optimizer.state[weight]["residual_norm"].item())
    if fold_residual:
        bounds = folded_norm_bounds(grads, rank=2)
        assert max(bounds) < 1e-3  # the bound itself is small here, so the check below means something
        for got, expected, bound in zip(stored, reference.norms, bounds):
            assert got == pytest.approx(expected, rel=max(bound, 1e-5))
    else:
        assert stored == pytest.approx(reference.norms, rel=1e-5)
    ratios = [after / before for before, after in zip(stored, stored[1:])]
    assert ratios[:3] == pytest.approx([1.01] * 3, rel=1e-6)  # doubling residual: capped at gamma
    assert all(ratio < 1.0 for ratio in ratios[3:])  # shrinking: passed through
    torch.testing.assert_close(weight.double(), reference.weight, atol=2e-6, rtol=1e-5)


def test_limiter_first_step_stores_norm_without_limiting() -> None:
    residual = torch.full((3, 4), 2.0)
    previous = torch.tensor(123.0)
    limit_norm_growth_(residual, previous, gamma=1.01, first=True)
    assert torch.equal(residual, torch.full((3, 4), 2.0))
    assert previous.item() == pytest.approx(2.0 * 12**0.5)


def test_limiter_and_residual_need_no_host_values() -> None:
    """On the meta device any read of a value (``.item()``, ``bool()``) raises: these must not need one."""
    residual = torch.empty(6, 4, device="meta")
    previous = torch.empty((), device="meta")
    limit_norm_growth_(residual, previous, gamma=1.01, first=False)
    limit_norm_growth_(residual, previous, gamma=1.01, first=True)
    subspace = Subspace(Side.RIGHT, None, torch.empty(2, 4, device="meta"))
    lowrank = torch.empty(6, 2, device="meta")
    assert fira_residual(residual, lowrank, lowrank, subspace, subtract=0.25).shape == (6, 4)


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_no_host_sync_between_refreshes(projector: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between refreshes, the only tensors read on the host are the CPU ``step`` counters."""
    weights = [nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(8, 12))]
    optimizer = FiraAdamW([{"params": weights, "rank": 3, "update_proj_gap": 4, "projector": projector}], lr=0.01)
    for step in range(1, 8):
        for w in weights:
            w.grad = torch.randn(w.shape)
        if step % 4 == 1:  # refresh steps (1, 5) check the gradient for NaN/Inf on the host
            optimizer.step()
            continue
        with recorded_host_reads(monkeypatch) as read:
            optimizer.step()
        steps = [optimizer.state[w]["step"] for w in weights]
        assert read and all(any(t is s for s in steps) for t in read)


def test_foreach_equals_single_tensor_bitwise() -> None:
    for projector in ("svd", "dct"):
        # fused=False: the reference single-tensor loop (the kernels are within ulps, test_fused.py).
        single, _, _ = run_pair((9, 6), weight_decay=0.1, projector=projector, foreach=False, fused=False)
        multi, _, _ = run_pair((9, 6), weight_decay=0.1, projector=projector, foreach=True)
        for a, b in zip(single, multi):
            assert torch.equal(a, b)


def test_full_rank_projection_leaves_no_residual_and_equals_galore() -> None:
    """rank = min(m, n) with alpha = 1: P Pᵀ G = G, so S ~ 0 and Fira is GaLore."""
    grads = gradient_sequence((8, 5), 4, 0)
    results = []
    for cls, key in ((FiraAdamW, "alpha"), (GaLoreAdamW, "scale")):
        weight = nn.Parameter(torch.ones(8, 5))
        optimizer = cls([{"params": [weight], "rank": 5, key: 1.0}], lr=0.01)
        for grad in grads:
            weight.grad = grad
            optimizer.step()
        results.append(weight.detach())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)


def test_state_adds_one_fp32_scalar_per_projected_matrix() -> None:
    weight, bias = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
    optimizer = FiraAdamW([{"params": [bias]}, {"params": [weight], "rank": 2}])
    weight.grad, bias.grad = torch.randn(6, 4), torch.randn(6)
    optimizer.step()
    assert set(optimizer.state[weight]) == {"step", "exp_avg", "exp_avg_sq", "basis_right", "residual_norm"}
    assert "residual_norm" not in optimizer.state[bias]
    assert optimizer_state_bytes(optimizer) == 4 * (1 + 2 * 6 * 2 + 2 * 4 + 1) + 4 * (1 + 2 * 6)


@pytest.mark.parametrize("projector", ["svd", "dct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_checkpoint_roundtrip_weights_only_continues_bit_identically(
    projector: str, dtype: torch.dtype, foreach: bool
) -> None:
    resumed, model = checkpoint_roundtrip(
        lambda groups: FiraAdamW(groups, lr=0.01, weight_decay=0.01, foreach=foreach),
        {"alpha": 0.5, "projector": projector},
        dtype,
    )
    assert resumed.state[model[0].weight]["residual_norm"].dtype == torch.float32


def test_bf16_weights_track_reference() -> None:
    weight32 = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    weight = nn.Parameter(weight32.bfloat16())
    optimizer = FiraAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 3, "alpha": 0.25}], lr=0.01)
    reference = FiraReference(weight.detach().float(), rank=4, update_proj_gap=3, scale=0.25, lr=0.01)
    for grad in gradient_sequence((16, 8), 5, 5):
        weight.grad = grad.bfloat16()
        optimizer.step()
        reference.update(grad.bfloat16().float())
    assert weight.dtype == torch.bfloat16
    assert optimizer.state[weight]["residual_norm"].dtype == torch.float32
    torch.testing.assert_close(weight.double(), reference.weight, atol=0.02, rtol=0.02)


def test_nonfinite_gradient_at_refresh_keeps_projector_and_limiter() -> None:
    weight = nn.Parameter(torch.randn(6, 4))
    optimizer = FiraAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 2}], lr=0.01)
    grads = gradient_sequence((6, 4), 4, 0)
    bad = grads[0].clone()
    bad[0, 0] = float("nan")
    weight.grad = bad
    before = weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=re.escape("FiraAdamW: a gradient with NaN/Inf arrived")):
        optimizer.step()
    assert torch.equal(weight, before) and int(optimizer.state[weight]["step"]) == 0
    for grad in grads[:2]:  # the deferred first refresh (the limiter's first step), then a normal step
        weight.grad = grad
        optimizer.step()
    basis = optimizer.state[weight]["basis_right"].clone()
    bad = grads[2].clone()
    bad[1, 1] = float("inf")
    weight.grad = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert torch.equal(optimizer.state[weight]["basis_right"], basis)


def test_scale_is_an_alias_of_alpha() -> None:
    weight = nn.Parameter(torch.randn(4, 3))
    optimizer = FiraAdamW([{"params": [weight], "rank": 2, "scale": 0.5}])
    group = optimizer.param_groups[0]
    assert group["alpha"] == 0.5 and "scale" not in group
    FiraAdamW([{"params": [nn.Parameter(torch.randn(4, 3))], "rank": 2, "scale": 0.5, "alpha": 0.5}])


@pytest.mark.parametrize(
    "group_update,kwargs,message",
    [
        ({}, {"alpha": float("inf")}, "Invalid alpha: inf. Must be a finite number."),
        ({}, {"residual": "both"}, "Invalid residual: 'both'. Must be one of code, paper."),
        ({}, {"gamma": 0.99}, "Invalid gamma: 0.99. Must be a finite number >= 1.0."),
        ({"alpha": "1"}, {}, "Invalid alpha in param group 0: '1'. Must be a finite number."),
        ({"gamma": float("nan")}, {}, "Invalid gamma in param group 0: nan. Must be a finite number >= 1.0."),
        ({}, {"fold_residual": 1}, "Invalid fold_residual: 1. Must be True or False."),
        ({"fold_residual": None}, {}, "Invalid fold_residual in param group 0: None. Must be True or False."),
        (
            {"proj_type": "full"},
            {},
            "Invalid proj_type in param group 0: 'full'. FiraAdamW supports std, reverse_std, left, right",
        ),
        (
            {"alpha": 0.25, "scale": 0.5},
            {},
            "Param group 0 sets alpha=0.25 and scale=0.5: for Fira they are the same setting",
        ),
        ({"projector": "qr"}, {}, "Invalid projector in param group 0: 'qr'. Must be one of svd, "),
        ({}, {"lr": -1.0}, "Invalid learning rate: -1.0. Must be >= 0.0."),
    ],
)
def test_bad_arguments_are_refused_at_construction(group_update: dict, kwargs: dict, message: str) -> None:
    weight = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=re.escape(message)):
        FiraAdamW([{"params": [weight], "rank": 2, **group_update}], **kwargs)


@pytest.mark.parametrize(
    "dtype,fold_residual,folds",
    [(torch.float32, True, True), (torch.float64, True, True), (torch.float32, False, False), (torch.bfloat16, True, False)],
    ids=["fp32", "fp64", "fp32-explicit", "bf16"],
)
def test_which_matrices_take_the_folded_update(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, fold_residual: bool, folds: bool
) -> None:
    """fp32/fp64 whole matrices fold (the default); fold_residual=False and bf16 weights (a basis orthonormal
    only to ~1e-2) form the residual explicitly. Counted at the step's call of each form."""
    from lowrank_optim.optim import galore

    calls = {"folded": 0, "explicit": 0}
    for name, key in (("_fira_folded", "folded"), ("_fira_residual", "explicit")):
        original = getattr(galore, name)

        def counted(*args: Any, _original: Any = original, _key: str = key, **kwargs: Any) -> Any:
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(galore, name, counted)
    weight = nn.Parameter(torch.randn(12, 8, dtype=dtype))
    optimizer = FiraAdamW([{"params": [weight], "rank": 2}], lr=0.01, fold_residual=fold_residual)
    for _ in range(3):
        weight.grad = torch.randn(12, 8, dtype=dtype)
        optimizer.step()
    assert calls == ({"folded": 3, "explicit": 0} if folds else {"folded": 0, "explicit": 3})


def test_state_dict_from_before_fold_residual_continues_explicitly() -> None:
    """A group saved before ``fold_residual`` existed was stepped by the explicit form and loads with
    ``False`` (so it continues bit-identically, tests/reliability/test_state_compat.py); a state dict saved
    now keeps what it says."""
    weight = nn.Parameter(torch.randn(12, 8))
    optimizer = FiraAdamW([{"params": [weight], "rank": 2}], lr=0.01)
    weight.grad = torch.randn(12, 8)
    optimizer.step()
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["fold_residual"] is True
    fresh = FiraAdamW([{"params": [weight], "rank": 2}], lr=0.01)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["fold_residual"] is True
    del saved["param_groups"][0]["fold_residual"]
    older = FiraAdamW([{"params": [weight], "rank": 2}], lr=0.01)
    older.load_state_dict(saved)
    assert older.param_groups[0]["fold_residual"] is False
