"""Non-finite gradients never poison the state for good, and Fira's limiter recovers from a zero gradient.

The policy (``nonfinite=``): ``skip`` (default) leaves a parameter with a NaN/Inf gradient and all its
state as they were; between refreshes that is decided on the device and the step counter advances, at a
refresh it is decided on the host and the counter stays (the refresh is retried). ``propagate`` behaves
like ``torch.optim.AdamW``. Every optimizer, every implementation (compiled kernels, the pure-PyTorch
reference, foreach), projected and full-rank parameters.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import pytest
import torch
from host_reads import recorded_host_reads
from torch import nn

from lowrank_optim import APOLLOAdamW, DCTAdamW, FiraAdamW, GaLoreAdamW
from lowrank_optim.ops import kernel_load_error, kernels_available
from lowrank_optim.ops.adam import _adam_default
from lowrank_optim.ops.fira import _fira_default
from lowrank_optim.optim.galore import _decay_
from lowrank_optim.optim.moments import Blockwise8bit
from lowrank_optim.projection import limit_norm_growth_

OPS = torch.ops.lowrank_optim
GAP = 3  # refreshes at steps 1, 4, 7 (counter 0, 3, 6)

_EIGHT_BIT = Blockwise8bit(block_size=4, min_size=0)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "galore": lambda groups, **kw: GaLoreAdamW(groups, lr=0.01, weight_decay=0.1, **kw),
    "galore_full": lambda groups, **kw: GaLoreAdamW(groups, lr=0.01, proj_type="full", **kw),
    "fira": lambda groups, **kw: FiraAdamW(groups, lr=0.01, alpha=0.5, weight_decay=0.1, **kw),
    "fira_paper": lambda groups, **kw: FiraAdamW(groups, lr=0.01, alpha=0.5, residual="paper", **kw),
    "dct": lambda groups, **kw: DCTAdamW(groups, lr=0.01, scoring="matmul", **kw),
    # Every projector and moment policy meets the same non-finite gradients.
    "rsvd": lambda groups, **kw: GaLoreAdamW(groups, lr=0.01, projector="rsvd", **kw),
    "galore_rotate": lambda groups, **kw: GaLoreAdamW(groups, lr=0.01, moment_policy="rotate", **kw),
    "dct_rotate": lambda groups, **kw: DCTAdamW(groups, lr=0.01, scoring="matmul", moment_policy="rotate", **kw),
    "random": lambda groups, **kw: GaLoreAdamW(groups, lr=0.01, projector="random", **kw),
    "apollo": lambda groups, **kw: APOLLOAdamW(groups, lr=0.01, weight_decay=0.1, **kw),
    "apollo_mini": lambda groups, **kw: APOLLOAdamW(groups, lr=0.01, scale_type="tensor", scale=128.0, **kw),
    # 8-bit moments (blocks of 4, every tensor quantized): the same skips, refreshes and counters.
    "galore_8bit": lambda groups, **kw: GaLoreAdamW(groups, lr=0.01, weight_decay=0.1, moment_format=_EIGHT_BIT, **kw),
    "fira_8bit": lambda groups, **kw: FiraAdamW(groups, lr=0.01, alpha=0.5, moment_format=_EIGHT_BIT, **kw),
    "dct_rotate_8bit": lambda groups, **kw: DCTAdamW(
        groups, lr=0.01, scoring="matmul", moment_policy="rotate", moment_format=_EIGHT_BIT, **kw
    ),
    "apollo_8bit": lambda groups, **kw: APOLLOAdamW(groups, lr=0.01, moment_format=_EIGHT_BIT, **kw),
}


def _implementations() -> list:
    needs = pytest.mark.skipif(not kernels_available("cpu"), reason=f"no CPU kernels: {kernel_load_error('cpu')}")
    return [
        pytest.param({"fused": True}, id="fused", marks=needs),
        pytest.param({"fused": False}, id="reference"),
        pytest.param({"foreach": True}, id="foreach"),
    ]


def _setup(name: str, shape: tuple[int, int], **kwargs: Any) -> tuple[torch.optim.Optimizer, nn.Parameter, nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(shape, generator=generator))
    bias = nn.Parameter(torch.randn(shape[0], generator=generator))
    optimizer = OPTIMIZERS[name]([{"params": [bias]}, {"params": [weight], "rank": 3, "update_proj_gap": GAP}], **kwargs)
    return optimizer, weight, bias


def _grads(shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape[0], generator=generator)


def _snapshot(optimizer: torch.optim.Optimizer, *params: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [
        {"param": p.detach().clone(), **{k: v.clone() for k, v in optimizer.state[p].items() if k != "step"}}
        for p in params
    ]


def _assert_same(before: list[dict[str, torch.Tensor]], after: list[dict[str, torch.Tensor]]) -> None:
    for one, two in zip(before, after):
        assert one.keys() == two.keys()
        for key in one:
            assert torch.equal(one[key], two[key]), key


def _poison(grad: torch.Tensor, value: float, where: tuple[int, ...]) -> torch.Tensor:
    bad = grad.clone()
    bad[where] = value
    return bad


@pytest.mark.parametrize("implementation", _implementations())
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["right", "left"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_one_bad_element_between_refreshes_skips_only_that_parameter(
    name: str, shape: tuple[int, int], value: float, implementation: dict[str, Any]
) -> None:
    optimizer, weight, bias = _setup(name, shape, **implementation)
    for seed in range(2):  # step 1 refreshes; step 2 is a normal one
        weight.grad, bias.grad = _grads(shape, seed)
        optimizer.step()
    before = _snapshot(optimizer, weight)
    g_weight, g_bias = _grads(shape, 2)
    weight.grad, bias.grad = _poison(g_weight, value, (shape[0] - 1, 3)), g_bias  # step 3: no refresh
    bias_before = bias.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided on the device: nothing to warn about at this step
        optimizer.step()
    _assert_same(before, _snapshot(optimizer, weight))
    assert not torch.equal(bias, bias_before), "the other parameter must still be updated"
    assert int(optimizer.state[weight]["step"]) == 3  # the counter advances (no host read to stop it)
    assert optimizer.skipped_updates() == {(1, 0): 1}
    for seed in range(3, 8):  # later steps, through refreshes at 4 and 7, stay finite and move
        weight.grad, bias.grad = _grads(shape, seed)
        optimizer.step()
    assert torch.isfinite(weight).all() and not torch.equal(weight, before[0]["param"])
    for value in optimizer.state[weight].values():
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("implementation", _implementations())
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bad_full_rank_gradient_is_skipped(name: str, implementation: dict[str, Any]) -> None:
    optimizer, weight, bias = _setup(name, (12, 8), **implementation)
    for seed in range(2):
        weight.grad, bias.grad = _grads((12, 8), seed)
        optimizer.step()
    before = _snapshot(optimizer, bias)
    g_weight, g_bias = _grads((12, 8), 2)
    weight.grad, bias.grad = g_weight, _poison(g_bias, float("nan"), (5,))
    optimizer.step()
    _assert_same(before, _snapshot(optimizer, bias))
    assert optimizer.skipped_updates() == {(0, 0): 1}


@pytest.mark.parametrize("implementation", _implementations())
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bad_gradient_at_a_refresh_keeps_everything_and_retries_the_refresh(
    name: str, implementation: dict[str, Any]
) -> None:
    optimizer, weight, bias = _setup(name, (12, 8), **implementation)
    for seed in range(3):
        weight.grad, bias.grad = _grads((12, 8), seed)
        optimizer.step()
    before = _snapshot(optimizer, weight)
    g_weight, g_bias = _grads((12, 8), 3)
    weight.grad, bias.grad = _poison(g_weight, float("nan"), (0, 0)), g_bias  # step 4 is a refresh
    expected = (
        f"{type(optimizer).__name__}: a gradient with NaN/Inf arrived at a projector refresh of param 0 in param "
        "group 1 (shape (12, 8)) at step 4: its update was skipped, its moments and projector are kept, and the "
        "refresh is retried at the next step."
    )
    with pytest.warns(RuntimeWarning, match=re.escape(expected)):
        optimizer.step()
    _assert_same(before, _snapshot(optimizer, weight))
    assert int(optimizer.state[weight]["step"]) == 3  # not advanced: the next step refreshes
    weight.grad, bias.grad = _grads((12, 8), 4)
    optimizer.step()
    assert int(optimizer.state[weight]["step"]) == 4
    projector = [k for k in before[0] if k.startswith(("basis", "dct", "projection"))]
    assert any(not torch.equal(before[0][k], optimizer.state[weight][k]) for k in projector), "no refresh happened"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_propagate_behaves_like_torch_adamw(name: str) -> None:
    optimizer, weight, bias = _setup(name, (12, 8), nonfinite="propagate")
    reference = torch.optim.AdamW([nn.Parameter(bias.detach().clone())], lr=0.01)
    for seed in range(2):
        weight.grad, bias.grad = _grads((12, 8), seed)
        optimizer.step()
    g_weight, g_bias = _grads((12, 8), 2)
    weight.grad, bias.grad = _poison(g_weight, float("nan"), (2, 2)), _poison(g_bias, float("nan"), (1,))
    reference.param_groups[0]["params"][0].grad = bias.grad.clone()
    reference.step()
    optimizer.step()
    assert torch.isnan(weight).any() and torch.isnan(bias[1])
    assert torch.isnan(reference.param_groups[0]["params"][0][1])
    assert optimizer.skipped_updates() == {}


def test_propagate_at_a_refresh_says_the_update_was_applied() -> None:
    optimizer, weight, bias = _setup("galore", (12, 8), nonfinite="propagate")
    for seed in range(3):
        weight.grad, bias.grad = _grads((12, 8), seed)
        optimizer.step()
    basis = optimizer.state[weight]["basis_right"].clone()
    weight.grad = _poison(_grads((12, 8), 3)[0], float("inf"), (0, 0))
    with pytest.warns(RuntimeWarning, match=re.escape("the previous projector is kept and the non-finite update was applied")):
        optimizer.step()
    assert torch.equal(optimizer.state[weight]["basis_right"], basis) and not torch.isfinite(weight).all()


def test_the_first_refresh_is_deferred_under_both_policies() -> None:
    for policy in ("skip", "propagate"):
        optimizer, weight, _ = _setup("galore", (12, 8), nonfinite=policy)
        weight.grad = _poison(_grads((12, 8), 0)[0], float("nan"), (0, 0))
        start = weight.detach().clone()
        with pytest.warns(RuntimeWarning, match=re.escape("it has no projector yet, so its update was skipped")):
            optimizer.step()
        assert torch.equal(weight, start) and int(optimizer.state[weight]["step"]) == 0


@pytest.mark.parametrize("name", ["fira", "fira_paper"])
def test_fira_residual_norm_is_never_nan_after_a_bad_gradient(name: str) -> None:
    """The old code stored a NaN limiter state, after which every residual stayed NaN."""
    optimizer, weight, bias = _setup(name, (12, 8))
    for seed in range(2):
        weight.grad, bias.grad = _grads((12, 8), seed)
        optimizer.step()
    norm = optimizer.state[weight]["residual_norm"].clone()
    weight.grad = _poison(_grads((12, 8), 2)[0], float("nan"), (3, 3))
    optimizer.step()
    assert torch.equal(optimizer.state[weight]["residual_norm"], norm)


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("Invalid nonfinite: 'ignore'. Must be one of skip, propagate.")):
        GaLoreAdamW([nn.Parameter(torch.randn(3))], nonfinite="ignore")
    with pytest.raises(ValueError, match=re.escape("Invalid nonfinite in param group 0: 'zero'.")):
        FiraAdamW([{"params": [nn.Parameter(torch.randn(3))], "nonfinite": "zero"}])


def test_skipping_adds_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN between refreshes is handled without reading any device value on the host."""
    optimizer, weight, bias = _setup("fira", (12, 8))
    for seed in range(2):
        weight.grad, bias.grad = _grads((12, 8), seed)
        optimizer.step()
    steps = [optimizer.state[p]["step"] for p in (weight, bias)]
    weight.grad, bias.grad = _poison(_grads((12, 8), 2)[0], float("nan"), (0, 0)), _grads((12, 8), 2)[1]
    with recorded_host_reads(monkeypatch) as read:
        optimizer.step()
    assert read and all(any(t is s for s in steps) for t in read)


# --- the ops' skip argument, compiled against default --------------------------------------------------


def _kernel_pairs() -> list:
    needs = pytest.mark.skipif(not kernels_available("cpu"), reason=f"no CPU kernels: {kernel_load_error('cpu')}")
    return [pytest.param("default", id="default"), pytest.param("compiled", id="compiled", marks=needs)]


@pytest.mark.parametrize("kernel", _kernel_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adam_op_skip_keeps_moments_and_zeroes_n(kernel: str, dtype: torch.dtype) -> None:
    adam = OPS.lowrank_adam_ if kernel == "compiled" else _adam_default
    lowrank = torch.full((5, 3), float("nan"), dtype=dtype)
    exp_avg, exp_avg_sq = torch.randn(5, 3).to(dtype), torch.rand(5, 3).to(dtype)
    before = exp_avg.clone(), exp_avg_sq.clone()
    normalized = torch.full((5, 3), 7.0, dtype=dtype)
    adam(lowrank, exp_avg, exp_avg_sq, normalized, 0.9, 0.999, 1e-6, torch.tensor(True))
    assert torch.equal(exp_avg, before[0]) and torch.equal(exp_avg_sq, before[1])
    assert torch.equal(normalized, torch.zeros_like(normalized))
    lowrank = torch.randn(5, 3).to(dtype)
    one = [t.clone() for t in (exp_avg, exp_avg_sq)]
    two = [t.clone() for t in (exp_avg, exp_avg_sq)]
    n_one, n_two = torch.empty_like(lowrank), torch.empty_like(lowrank)
    adam(lowrank, *one, n_one, 0.9, 0.999, 1e-6, torch.tensor(False))
    adam(lowrank, *two, n_two, 0.9, 0.999, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(one + [n_one], two + [n_two]))


@pytest.mark.parametrize("kernel", _kernel_pairs())
def test_fira_op_skip_zeroes_the_residual_and_keeps_the_limiter(kernel: str) -> None:
    fira = OPS.fira_residual_ if kernel == "compiled" else _fira_default
    grad = torch.randn(6, 4)
    grad[0, 0] = float("nan")
    back, normalized, lowrank = torch.randn(6, 4), torch.randn(6, 2), torch.randn(6, 2)
    state = torch.tensor(3.0)
    fira(grad, back, normalized, lowrank, state, 1, 0.5, 1.01, False, 1.0, torch.tensor(True))
    assert torch.equal(back, torch.zeros(6, 4)) and float(state) == 3.0


@pytest.mark.parametrize("op", ["adam", "fira"])
def test_skip_argument_is_validated(op: str) -> None:
    lowrank = torch.randn(4, 2)
    bad = torch.tensor([True, False])
    message = re.escape("skip is a 1-dim torch.bool tensor on cpu; allowed: None or a 0-dim torch.bool tensor on cpu")
    with pytest.raises(ValueError, match=message):
        if op == "adam":
            _adam_default(lowrank, torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), 0.9, 0.99, 1e-6, bad)
        else:
            _fira_default(
                torch.randn(4, 5), torch.randn(4, 5), lowrank, lowrank, torch.tensor(1.0), 1, 1.0, 1.01, False, 1.0, bad
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_weight_decay_rounds_like_add(dtype: torch.dtype) -> None:
    weight = torch.randn(10_003, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = weight.clone().add_(weight, alpha=-0.01 * 0.1)
    kept = weight.clone()
    _decay_(kept, 0.01, 0.1, torch.tensor(True))
    assert torch.equal(kept, weight)
    decayed = weight.clone()
    _decay_(decayed, 0.01, 0.1, torch.tensor(False))
    assert torch.equal(decayed, expected)


# --- Fira's limiter history rules ----------------------------------------------------------------------


def _limiter_kernels() -> list:
    needs = pytest.mark.skipif(not kernels_available("cpu"), reason=f"no CPU kernels: {kernel_load_error('cpu')}")
    return [pytest.param("reference", id="reference"), pytest.param("compiled", id="compiled", marks=needs)]


def _limit(kernel: str, residual: torch.Tensor, state: torch.Tensor, first: bool) -> torch.Tensor:
    """The limiter alone: phi = 1 (N = R), subtract 0, so the op's S is the gradient itself."""
    rows = residual.shape[0]
    ones = torch.ones(rows, 1)
    if kernel == "compiled":
        back = torch.zeros_like(residual)
        OPS.fira_residual_(residual, back, ones, ones, state, 1, 0.0, 1.01, first, 1.0)
        return back
    return limit_norm_growth_(residual.clone(), state, gamma=1.01, first=first)


@pytest.mark.parametrize("kernel", _limiter_kernels())
def test_zero_gradient_at_the_first_step_does_not_clamp_later_residuals(kernel: str) -> None:
    state = torch.zeros(())
    _limit(kernel, torch.zeros(4, 3), state, first=True)
    assert float(state) == 0.0  # no history yet
    residual = torch.full((4, 3), 0.5)
    out = _limit(kernel, residual, state, first=False)
    assert torch.equal(out, residual)  # stored, not limited (the reference cut it to ~1e-8)
    assert float(state) == pytest.approx(float(residual.norm()))


@pytest.mark.parametrize("kernel", _limiter_kernels())
def test_zero_gradient_mid_training_keeps_the_history(kernel: str) -> None:
    state = torch.zeros(())
    _limit(kernel, torch.full((4, 3), 1.0), state, first=True)
    history = float(state)
    _limit(kernel, torch.zeros(4, 3), state, first=False)
    assert float(state) == history
    out = _limit(kernel, torch.full((4, 3), 1.0), state, first=False)
    torch.testing.assert_close(out, torch.full((4, 3), 1.0))  # the same norm as before the zero step: no cut
    grown = _limit(kernel, torch.full((4, 3), 2.0), state, first=False)  # twice the norm: cut to gamma
    assert float(grown.norm()) == pytest.approx(1.01 * history, rel=1e-6)


@pytest.mark.parametrize("implementation", _implementations())
def test_fira_recovers_at_once_after_an_all_zero_gradient(implementation: dict[str, Any]) -> None:
    """End to end: one all-zero gradient at step 2; the update at step 3 is as large as a run's that
    never saw it (the reference's stays ~1e-8 for ~1850 steps)."""
    updates = []
    for zero_step in (True, False):
        optimizer, weight, bias = _setup("fira", (12, 8), **implementation)
        weight.grad, bias.grad = _grads((12, 8), 0)
        optimizer.step()
        if zero_step:
            weight.grad, bias.grad = torch.zeros(12, 8), torch.zeros(12)
            optimizer.step()
        before = weight.detach().clone()
        weight.grad, bias.grad = _grads((12, 8), 1)
        optimizer.step()
        updates.append(float((weight.detach() - before).norm()))
    assert updates[0] > 0.5 * updates[1]


# --- under DeepSpeed's flat partitions (fragment layout, ranks in threads) ------------------------------


@pytest.mark.parametrize("name", ["galore", "fira", "dct"])
def test_a_bad_gradient_on_one_rank_skips_the_step_on_every_rank(name: str) -> None:
    """Matrices are cut between ranks, so the decision is one shared flag: a NaN in rank 1's piece leaves
    every rank's partition and state as it was, and the next finite step proceeds on all of them."""
    from test_distributed_fragments import _FakeComm, _FakeGroup, _flatten12, _run_ranks, _zero12_layout

    from lowrank_optim.distributed.fragment import FragmentLayout

    shapes, world = [(12, 8), (8, 12)], 2
    order, offsets, total, size, plans = _zero12_layout(shapes, world, round_robin=False, alignment=4)
    weights = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    full = _flatten12(weights, order, offsets, total)
    flats = [full[k * size : (k + 1) * size].clone() for k in range(world)]
    group = _FakeGroup(world)
    optimizers = []
    for rank in range(world):
        optimizer = OPTIMIZERS[name]([{"params": [w.clone() for w in weights], "rank": 3, "update_proj_gap": GAP}])
        optimizer.param_groups[0]["params"] = [flats[rank]]
        layout = FragmentLayout()
        layout.add_partition(flats[rank], plans[rank], _FakeComm(group, rank), group_index=0, shard_moments=False)
        layout.attach(optimizer)
        optimizers.append(optimizer)
    grads = [
        _flatten12(
            [torch.randn(shape, generator=torch.Generator().manual_seed(10 + 3 * s + i)) for i, shape in enumerate(shapes)],
            order,
            offsets,
            total,
        )
        for s in range(4)
    ]
    grads[2][size + 5] = float("nan")  # step 3 (no refresh): in rank 1's piece only
    snapshots: list = [None, None]

    def body(rank: int) -> None:
        for step in range(4):
            if step == 2:
                snapshots[rank] = (flats[rank].clone(), _nested_clone(optimizers[rank].state[flats[rank]]))
            flats[rank].grad = grads[step][rank * size : (rank + 1) * size].clone()
            optimizers[rank].step()
            if step == 2:
                assert torch.equal(flats[rank], snapshots[rank][0]), f"rank {rank} updated its piece"
                _assert_nested_equal(snapshots[rank][1], optimizers[rank].state[flats[rank]])

    _run_ranks(world, body)
    assert all(torch.isfinite(flat).all() for flat in flats)
    assert [optimizer.skipped_updates() for optimizer in optimizers] == [{(0, 0): 1}] * 2


def _nested_clone(state: dict) -> dict:
    return {k: _nested_clone(v) if isinstance(v, dict) else v.clone() for k, v in state.items() if k != "step"}


def _assert_nested_equal(before: dict, after: dict) -> None:
    for key, value in before.items():
        if isinstance(value, dict):
            _assert_nested_equal(value, after[key])
        else:
            assert torch.equal(value, after[key]), key


def test_pretrain_counts_skipped_updates() -> None:
    """What the pretraining loop logs and reports as ``skipped_updates``."""
    from lowrank_optim.train.pretrain import _skipped_updates

    optimizer, weight, bias = _setup("galore", (12, 8))
    assert _skipped_updates(torch.optim.AdamW([nn.Parameter(torch.randn(3))])) == 0
    weight.grad, bias.grad = _grads((12, 8), 0)
    optimizer.step()
    assert _skipped_updates(optimizer) == 0
    weight.grad = _poison(_grads((12, 8), 1)[0], float("nan"), (1, 1))
    bias.grad = _poison(_grads((12, 8), 1)[1], float("inf"), (2,))
    optimizer.step()
    assert _skipped_updates(optimizer) == 2 and optimizer.skipped_updates() == {(0, 0): 1, (1, 0): 1}


@pytest.mark.parametrize("implementation", [{}, {"fused": False}, {"foreach": True}], ids=["default", "reference", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(37, 23), (23, 37)], ids=["right", "left"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_skip_equals_propagate_bitwise_for_finite_gradients(
    name: str, shape: tuple[int, int], dtype: torch.dtype, implementation: dict[str, Any]
) -> None:
    """The flag must cost nothing in the arithmetic: with finite gradients both policies give the same
    bits, reduced precision and ATen's scalar tail loops included (odd sizes, lr · wd = 0.01)."""
    results = []
    for policy in ("skip", "propagate"):
        generator = torch.Generator().manual_seed(3)
        weight = nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
        bias = nn.Parameter(torch.randn(shape[0], generator=generator).to(dtype))
        optimizer = OPTIMIZERS[name](
            [{"params": [bias], "weight_decay": 1.0}, {"params": [weight], "rank": 5, "update_proj_gap": 2}],
            nonfinite=policy,
            **implementation,
        )
        for _ in range(5):
            weight.grad = torch.randn(shape, generator=generator).to(dtype)
            bias.grad = torch.randn(shape[0], generator=generator).to(dtype)
            optimizer.step()
        results.append([weight.detach(), bias.detach(), *optimizer.state[weight].values(), *optimizer.state[bias].values()])
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("name", ["galore", "dct"])
def test_found_inf_at_a_refresh_keeps_projector_and_moments(name: str) -> None:
    """An outside "skip this step" (``found_inf``, e.g. another rank's NaN) must not refresh the state."""
    optimizer, weight, bias = _setup(name, (12, 8), moment_policy="reset")
    for seed in range(3):
        weight.grad, bias.grad = _grads((12, 8), seed)
        optimizer.step()
    before = _snapshot(optimizer, weight, bias)
    weight.grad, bias.grad = _grads((12, 8), 3)  # finite: only the outside flag says skip
    found_inf = torch.tensor(True)
    with torch.no_grad():  # what a layout does inside step(), with the flag it decided for all ranks
        with pytest.warns(RuntimeWarning, match="its update was skipped, its moments and projector are kept"):
            group = optimizer.param_groups[1]
            optimizer._step_group(group, optimizer._collect(group), found_inf)
        group = optimizer.param_groups[0]
        optimizer._step_group(group, optimizer._collect(group), found_inf)
    _assert_same(before, _snapshot(optimizer, weight, bias))
    assert int(optimizer.state[weight]["step"]) == 3
