"""GaLoreAdamW against the fp64 reference, across implementations, through checkpoints and bad input."""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch
from reference import GaLoreReference
from torch import nn

from lowrank_optim import GaLoreAdamW, optimizer_state_bytes, param_groups

SHAPES = {"tall": (12, 8), "wide": (8, 12), "square": (10, 10)}
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def gradient_sequence(shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


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
) -> tuple[list[torch.Tensor], list[GaLoreReference]]:
    """Step a projected matrix and a full-rank vector with GaLoreAdamW and with the references."""
    generator = torch.Generator().manual_seed(1)
    weight = nn.Parameter(torch.randn(shape, generator=generator))
    bias = nn.Parameter(torch.randn(shape[0], generator=generator))
    hyper = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay)
    optimizer = GaLoreAdamW(
        [
            {"params": [bias]},
            {"params": [weight], "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": proj_type},
        ],
        foreach=foreach,
        fused=fused,
        moment_policy=moment_policy,
        **hyper,
    )
    ref_weight = GaLoreReference(
        weight, rank=rank, update_proj_gap=gap, scale=0.25, proj_type=proj_type, moment_policy=moment_policy, **hyper
    )
    ref_bias = GaLoreReference(bias, **hyper)
    for g_weight, g_bias in zip(gradient_sequence(shape, steps, 2), gradient_sequence(shape[:1], steps, 3)):
        weight.grad, bias.grad = g_weight.clone(), g_bias.clone()
        optimizer.step()
        ref_weight.update(g_weight)
        ref_bias.update(g_bias)
    return [weight.detach(), bias.detach()], [ref_weight, ref_bias]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["nowd", "wd"])
@pytest.mark.parametrize("shape_kind", list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_fp64_reference(proj_type: str, shape_kind: str, weight_decay: float, foreach: bool) -> None:
    """7 steps with gap 3: refreshes at steps 1, 4 and 7, moments carried across them."""
    (weight, bias), (ref_weight, ref_bias) = run_pair(
        SHAPES[shape_kind], proj_type=proj_type, weight_decay=weight_decay, foreach=foreach
    )
    # A full projection of the gradient it was computed from is diagonal (the singular values); its
    # off-diagonal entries are fp32 rounding noise of size ~eps, which Adam's normalization turns into
    # O(1) values. fp32 and fp64 disagree on that noise, hence the looser bound for "full".
    atol = 5e-5 if proj_type == "full" else 2e-6
    torch.testing.assert_close(weight.double(), ref_weight.weight, atol=atol, rtol=1e-5)
    torch.testing.assert_close(bias.double(), ref_bias.weight, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape_kind", list(SHAPES))
def test_moment_policy_reset_matches_reference(shape_kind: str) -> None:
    (weight, _), (ref_weight, _) = run_pair(SHAPES[shape_kind], moment_policy="reset")
    torch.testing.assert_close(weight.double(), ref_weight.weight, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_foreach_equals_single_tensor_bitwise(proj_type: str) -> None:
    # fused=False: the reference single-tensor loop (the kernels are within ulps, test_fused.py).
    single, _ = run_pair((9, 6), proj_type=proj_type, weight_decay=0.1, foreach=False, fused=False)
    multi, _ = run_pair((9, 6), proj_type=proj_type, weight_decay=0.1, foreach=True)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def test_refresh_timing_is_steps_1_gap_plus_1() -> None:
    weight = nn.Parameter(torch.randn(6, 4))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 3}], lr=0.01)
    refreshed_at = []
    previous = None
    for step, grad in enumerate(gradient_sequence((6, 4), 8, 0), start=1):
        weight.grad = grad
        optimizer.step()
        basis = optimizer.state[weight]["basis_right"].clone()
        if previous is None or not torch.equal(basis, previous):
            refreshed_at.append(step)
        previous = basis
    assert refreshed_at == [1, 4, 7]


@pytest.mark.filterwarnings("ignore:rank 8 in param group 1 exceeds")
def test_reverse_std_with_square_lowrank_tensor() -> None:
    """The reference crashes here (64x256 at rank 128 gives a square 64x64 projected gradient)."""
    (weight, _), (ref_weight, _) = run_pair((4, 16), rank=8, proj_type="reverse_std")
    torch.testing.assert_close(weight.double(), ref_weight.weight, atol=2e-6, rtol=1e-5)


def test_rank_above_min_dim_is_clamped_with_one_warning() -> None:
    a, b = nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(2, 7))
    with pytest.warns(UserWarning, match=re.escape("rank 5 in param group 0 exceeds min(m, n) of 2 param(s)")) as record:
        optimizer = GaLoreAdamW([{"params": [a, b], "rank": 5}])
    assert len(record) == 1
    a.grad, b.grad = torch.randn(6, 3), torch.randn(2, 7)
    optimizer.step()
    assert optimizer.state[a]["basis_right"].shape == (3, 3)
    assert optimizer.state[b]["basis_left"].shape == (2, 2)
    assert optimizer.state[b]["exp_avg"].shape == (2, 7)


def test_params_without_grad_are_skipped() -> None:
    used, unused = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(5, 4))
    before = unused.detach().clone()
    optimizer = GaLoreAdamW([{"params": [used, unused], "rank": 2}], lr=0.1)
    used.grad = torch.randn(5, 4)
    optimizer.step()
    assert torch.equal(unused, before)
    assert unused not in optimizer.state
    assert int(optimizer.state[used]["step"]) == 1


def test_state_holds_only_tensors_under_fixed_keys() -> None:
    (weight,) = [nn.Parameter(torch.randn(6, 4))]
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2, "proj_type": "full"}])
    weight.grad = torch.randn(6, 4)
    optimizer.step()
    state = optimizer.state[weight]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "basis_left", "basis_right"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["exp_avg"].shape == (2, 2)
    assert optimizer_state_bytes(optimizer) == 4 * (1 + 2 * 4 + 6 * 2 + 2 * 4)


def _checkpoint_roundtrip(dtype: torch.dtype, moment_dtype: torch.dtype | None, foreach: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 6)).to(dtype)
    groups = [
        {"params": [model[0].bias, model[1].bias]},
        {"params": [model[0].weight, model[1].weight], "rank": 3, "update_proj_gap": 2, "scale": 0.5},
    ]
    kwargs = dict(lr=0.01, weight_decay=0.01, moment_dtype=moment_dtype, foreach=foreach)
    optimizer = GaLoreAdamW(groups, **kwargs)
    grads = [[torch.randn(p.shape).to(dtype) for p in model.parameters()] for _ in range(8)]

    def step(opt: GaLoreAdamW, params: list[nn.Parameter], grad_list: list[torch.Tensor]) -> None:
        for p, g in zip(params, grad_list):
            p.grad = g.clone()
        opt.step()

    for grad_list in grads[:3]:
        step(optimizer, list(model.parameters()), grad_list)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 6)).to(dtype)
    resumed.load_state_dict(checkpoint["model"])
    resumed_groups = [
        {"params": [resumed[0].bias, resumed[1].bias]},
        {"params": [resumed[0].weight, resumed[1].weight], "rank": 3, "update_proj_gap": 2, "scale": 0.5},
    ]
    resumed_optimizer = GaLoreAdamW(resumed_groups, **kwargs)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    expected_moment_dtype = moment_dtype or dtype
    for p in resumed.parameters():
        assert resumed_optimizer.state[p]["exp_avg"].dtype == expected_moment_dtype
    assert resumed_optimizer.state[resumed[0].weight]["basis_right"].dtype == dtype

    for grad_list in grads[3:]:
        step(optimizer, list(model.parameters()), grad_list)
        step(resumed_optimizer, list(resumed.parameters()), grad_list)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "dtype,moment_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-fp32moments"],
)
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_checkpoint_roundtrip_weights_only_continues_bit_identically(
    dtype: torch.dtype, moment_dtype: torch.dtype | None, foreach: bool
) -> None:
    _checkpoint_roundtrip(dtype, moment_dtype, foreach)


@pytest.mark.parametrize("moment_dtype", [None, torch.float32], ids=["bf16-moments", "fp32-moments"])
def test_bf16_weights_track_reference(moment_dtype: torch.dtype | None) -> None:
    weight32 = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    weight = nn.Parameter(weight32.bfloat16())
    optimizer = GaLoreAdamW(
        [{"params": [weight], "rank": 4, "update_proj_gap": 3}], lr=0.01, moment_dtype=moment_dtype
    )
    reference = GaLoreReference(weight.detach().float(), rank=4, update_proj_gap=3, lr=0.01)
    for grad in gradient_sequence((16, 8), 5, 5):
        weight.grad = grad.bfloat16()
        optimizer.step()
        reference.update(grad.bfloat16().float())
    state = optimizer.state[weight]
    assert state["exp_avg"].dtype == (moment_dtype or torch.bfloat16)
    assert state["basis_right"].dtype == torch.bfloat16
    assert weight.dtype == torch.bfloat16
    # 5 steps of size ~lr: the bf16 trajectory stays within a few bf16 ulps (2^-8 relative) of fp64.
    torch.testing.assert_close(weight.double(), reference.weight, atol=0.02, rtol=0.02)


def test_nonfinite_gradient_at_refresh_keeps_previous_projector() -> None:
    weight = nn.Parameter(torch.randn(6, 4))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 2}], lr=0.01)
    grads = gradient_sequence((6, 4), 4, 0)
    bad = grads[0].clone()
    bad[0, 0] = float("nan")

    # Step 1 has no previous projector: the update is skipped and the refresh deferred.
    weight.grad = bad
    before = weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="NaN/Inf arrived at a projector refresh"):
        optimizer.step()
    assert torch.equal(weight, before)
    assert int(optimizer.state[weight]["step"]) == 0

    for grad in grads[:2]:  # the deferred refresh happens now, then a normal step
        weight.grad = grad
        optimizer.step()
    basis = optimizer.state[weight]["basis_right"].clone()
    assert torch.isfinite(basis).all()

    bad = grads[2].clone()
    bad[1, 1] = float("inf")
    weight.grad = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already said once: no second warning
        optimizer.step()
    assert torch.equal(optimizer.state[weight]["basis_right"], basis)


def test_svd_not_converging_in_fp32_is_retried_in_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    real_svd = torch.linalg.svd
    seen_dtypes = []

    def flaky_svd(matrix: torch.Tensor, *args: object, **kwargs: object):
        seen_dtypes.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    weight = nn.Parameter(torch.randn(6, 4))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.01)
    weight.grad = torch.randn(6, 4)
    optimizer.step()
    assert seen_dtypes == [torch.float32, torch.float64]
    basis = optimizer.state[weight]["basis_right"]
    assert basis.dtype == torch.float32
    torch.testing.assert_close(basis @ basis.T, torch.eye(2))


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 8)
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8, bias=False), "o_proj": nn.Linear(8, 8)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(8, 16, bias=False)})
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 10, bias=False)


def test_param_groups_selects_target_linear_weights() -> None:
    model = TinyBlock()
    full_rank, projected = param_groups(model, rank=4, update_proj_gap=50, scale=0.5, moment_policy="reset")
    low = {id(p) for p in projected["params"]}
    assert low == {id(model.attn.q_proj.weight), id(model.attn.o_proj.weight), id(model.mlp.up_proj.weight)}
    assert {id(p) for p in full_rank["params"]} == {id(p) for p in model.parameters()} - low
    assert projected | {"params": None} == {
        "params": None,
        "rank": 4,
        "update_proj_gap": 50,
        "scale": 0.5,
        "proj_type": "std",
        "moment_policy": "reset",
    }
    GaLoreAdamW([full_rank, projected])  # and the optimizer accepts them


def test_param_groups_refuses_patterns_that_match_nothing() -> None:
    # One rule for param_groups, convert_to_sltrain and the plugin (lowrank_optim.targets).
    with pytest.raises(ValueError, match=re.escape("target_modules pattern 'block' matches no module name of TinyBlock")):
        param_groups(TinyBlock(), rank=4, target_modules=("block",))
    with pytest.raises(
        ValueError,
        match=re.escape("target_modules pattern 'norm' matches no linear layer with a trainable weight: it matches 'norm' ("),
    ):
        param_groups(TinyBlock(), rank=4, target_modules=("attn", "norm"))
    with pytest.raises(TypeError, match=re.escape("not the string 'attn'")):
        param_groups(TinyBlock(), rank=4, target_modules="attn")


def _bad(group_update: dict, **kwargs: object) -> None:
    weight = nn.Parameter(torch.randn(4, 3))
    GaLoreAdamW([{"params": [weight], "rank": 2, **group_update}], **kwargs)


@pytest.mark.parametrize(
    "group_update,kwargs,message",
    [
        ({}, {"lr": -1.0}, "Invalid learning rate: -1.0. Must be >= 0.0."),
        ({}, {"eps": -1e-8}, "Invalid epsilon value: -1e-08. Must be >= 0.0."),
        ({}, {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0. Must be in [0, 1)."),
        ({}, {"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1. Must be in [0, 1)."),
        ({}, {"weight_decay": -0.1}, "Invalid weight_decay value: -0.1. Must be >= 0.0."),
        ({}, {"moment_policy": "turn"}, "Invalid moment_policy: 'turn'. Must be one of keep, reset, rotate."),
        ({}, {"moment_dtype": torch.int8}, "Invalid moment_dtype: torch.int8. Must be None or a floating torch.dtype."),
        ({"lr": -0.5}, {}, "Invalid learning rate in param group 0: -0.5. Must be >= 0.0."),
        ({"rank": 0}, {}, "Invalid rank in param group 0: 0. Must be a positive integer."),
        ({"rank": 2.5}, {}, "Invalid rank in param group 0: 2.5. Must be a positive integer."),
        ({"update_proj_gap": 0}, {}, "Invalid update_proj_gap in param group 0: 0. Must be a positive integer."),
        (
            {"proj_type": "diag"},
            {},
            "Invalid proj_type in param group 0: 'diag'. Must be one of std, reverse_std, left, right, full.",
        ),
        ({"scale": float("nan")}, {}, "Invalid scale in param group 0: nan. Must be a finite number."),
    ],
)
def test_bad_arguments_are_refused_at_construction(group_update: dict, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad(group_update, **kwargs)


def test_non_2d_param_in_projected_group_names_group_and_shape() -> None:
    weight, bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    optimizer = GaLoreAdamW([weight])
    with pytest.raises(ValueError, match=re.escape("Param 1 of param group 1 has shape (4,): only 2-D tensors")):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(2, 2)), bias], "rank": 2})
    assert len(optimizer.param_groups) == 1  # the refused group was not kept


def test_duplicate_params_are_refused() -> None:
    weight = nn.Parameter(torch.randn(4, 3))
    message = "Param 1 of param group 0 (shape (4, 3)) appears more than once in the optimizer."
    with pytest.raises(ValueError, match=re.escape(message)):
        GaLoreAdamW([weight, weight])
    message = "Param 0 of param group 1 (shape (4, 3)) appears more than once in the optimizer."
    with pytest.raises(ValueError, match=re.escape(message)):
        GaLoreAdamW([{"params": [weight]}, {"params": [weight], "rank": 2}])


@pytest.mark.parametrize("name", ["GaLoreAdamW", "FiraAdamW", "DCTAdamW", "APOLLOAdamW"])
def test_reference_call_sites_with_no_deprecation_warning_run(name: str) -> None:
    """galore-torch's and Fira's GaLoreAdamW/FiraAdamW take ``no_deprecation_warning`` as the 7th positional
    argument (after correct_bias), apollo-torch's by keyword: their call sites run unchanged here."""
    import lowrank_optim

    cls = getattr(lowrank_optim, name)
    w = torch.nn.Parameter(torch.randn(6, 4))
    group = [{"params": [w], "rank": 2, "update_proj_gap": 2}]
    if name != "APOLLOAdamW":
        cls(group, 1e-3, (0.9, 0.999), 1e-6, 0.0, True, True)
    optimizer = cls(group, lr=1e-3, no_deprecation_warning=True)
    w.grad = torch.randn(6, 4)
    optimizer.step()
    assert "no_deprecation_warning" not in optimizer.param_groups[0]
    with pytest.raises(ValueError, match=re.escape("Invalid no_deprecation_warning: 'yes'. Must be True or False.")):
        cls(group, lr=1e-3, no_deprecation_warning="yes")
