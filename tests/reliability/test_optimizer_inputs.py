"""Bad settings fail at construction naming the value; a step that raises leaves everything as it was.

Table-driven: every refused input asserts its message, every accepted unusual input (numpy and 0-dim
tensor scalars, zero-size matrices, named parameters) asserts what it became.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_optim import DCTAdamW, FiraAdamW, GaLoreAdamW
from lowrank_optim.ops import kernel_load_error, kernels_available

CLASSES = {"galore": GaLoreAdamW, "fira": FiraAdamW, "dct": DCTAdamW}
needs_kernels = pytest.mark.skipif(not kernels_available("cpu"), reason=f"no CPU kernels: {kernel_load_error('cpu')}")


def _matrix(*shape: int, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape or (8, 6), generator=torch.Generator().manual_seed(0)).to(dtype))


REFUSED_GROUPS: dict[str, tuple[dict[str, Any], type, str]] = {
    "typo rnak": ({"rnak": 2}, ValueError, "Unknown key 'rnak' in param group 0. Did you mean 'rank'?"),
    "typo update_proj_gaps": (
        {"rank": 2, "update_proj_gaps": 5},
        ValueError,
        "Unknown key 'update_proj_gaps' in param group 0. Did you mean 'update_proj_gap'?",
    ),
    "typo weight_decy": ({"weight_decy": 0.1}, ValueError, "Did you mean 'weight_decay'?"),
    "unrelated key": ({"momentum": 0.9}, ValueError, "Unknown key 'momentum' in param group 0."),
    "metadata without underscore": ({"layer": 3}, ValueError, "and any key starting with '_' (your own metadata)"),
    "amsgrad": (
        {"amsgrad": True},
        ValueError,
        "Invalid amsgrad in param group 0: True. This optimizer only implements amsgrad=False.",
    ),
    "maximize": ({"maximize": True}, ValueError, "Invalid maximize in param group 0: True."),
    "not decoupled": (
        {"decoupled_weight_decay": False},
        ValueError,
        "Invalid decoupled_weight_decay in param group 0: False. This optimizer only implements decoupled_weight_decay=True.",
    ),
    "float rank": ({"rank": 2.0}, ValueError, "Invalid rank in param group 0: 2.0. Must be a positive integer."),
    "bool rank": ({"rank": True}, ValueError, "Invalid rank in param group 0: True. Must be a positive integer."),
    "numpy float rank": ({"rank": np.float64(2.0)}, ValueError, "Invalid rank in param group 0: np.float64(2.0)."),
    "float tensor rank": ({"rank": torch.tensor(2.5)}, ValueError, "Invalid rank in param group 0: tensor(2.5000)."),
    "1-d tensor rank": ({"rank": torch.tensor([2])}, ValueError, "Invalid rank in param group 0: tensor([2])."),
    "zero gap": ({"rank": 2, "update_proj_gap": np.int64(0)}, ValueError, "Invalid update_proj_gap in param group 0: 0."),
    "string scale": (
        {"rank": 2, "scale": "0.25"},
        ValueError,
        "Invalid scale in param group 0: '0.25'. Must be a finite number.",
    ),
    "nan scale": ({"rank": 2, "scale": torch.tensor(float("nan"))}, ValueError, "Invalid scale in param group 0: nan."),
    "bad policy": (
        {"nonfinite": "ignore"},
        ValueError,
        "Invalid nonfinite in param group 0: 'ignore'. Must be one of skip, propagate.",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_GROUPS))
def test_refused_group(case: str) -> None:
    options, error, message = REFUSED_GROUPS[case]
    with pytest.raises(error, match=re.escape(message)):
        GaLoreAdamW([{"params": [_matrix()], **options}])


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_typo_in_a_later_group_adds_nothing(name: str) -> None:
    optimizer = CLASSES[name]([_matrix(3)])
    with pytest.raises(ValueError, match=re.escape("Unknown key 'rnak' in param group 1. Did you mean 'rank'?")):
        optimizer.add_param_group({"params": [_matrix()], "rnak": 2})
    assert len(optimizer.param_groups) == 1


ACCEPTED: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "numpy int rank": ({"rank": np.int64(3)}, {"rank": 3}),
    "numpy int32 gap": ({"rank": 2, "update_proj_gap": np.int32(5)}, {"update_proj_gap": 5}),
    "0-d tensor rank": ({"rank": torch.tensor(3)}, {"rank": 3}),
    "0-d tensor gap": ({"rank": 2, "update_proj_gap": torch.tensor(7, dtype=torch.int32)}, {"update_proj_gap": 7}),
    "numpy float32 scale": ({"rank": 2, "scale": np.float32(0.25)}, {"scale": 0.25}),
    "0-d tensor scale": ({"rank": 2, "scale": torch.tensor(0.5)}, {"scale": 0.5}),
    "integer scale": ({"rank": 2, "scale": np.int64(1)}, {"scale": 1.0}),
    "torch's own keys": ({"initial_lr": 0.1, "amsgrad": False, "maximize": False, "capturable": False}, {}),
    "scheduler and library keys": (
        {"max_lr": 0.1, "min_lr": 1e-4, "base_momentum": 0.85, "max_momentum": 0.95, "swa_lr": 0.05,
         "name": "decay", "moe": False, "lr_scale": 0.5},
        {"name": "decay", "lr_scale": 0.5},
    ),
    "own metadata": ({"_layer": 3, "_tag": "mlp"}, {"_layer": 3}),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_accepted_group_stores_plain_numbers(case: str) -> None:
    options, expected = ACCEPTED[case]
    optimizer = GaLoreAdamW([{"params": [_matrix()], **options}])
    group = optimizer.param_groups[0]
    for key, value in expected.items():
        assert group[key] == value and type(group[key]) is type(value), (key, group[key])
    weight = group["params"][0]
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert torch.isfinite(weight).all()


def test_fira_accepts_numpy_alpha_and_gamma_and_the_scale_alias() -> None:
    optimizer = FiraAdamW([{"params": [_matrix()], "rank": 2, "scale": np.float64(0.5)}], gamma=np.float32(1.02))
    assert optimizer.param_groups[0]["alpha"] == 0.5 and type(optimizer.param_groups[0]["alpha"]) is float
    assert optimizer.defaults["gamma"] == pytest.approx(1.02) and type(optimizer.defaults["gamma"]) is float


def test_constructor_defaults_accept_numpy_and_tensor_scalars() -> None:
    optimizer = GaLoreAdamW([{"params": [_matrix()], "rank": 2}], update_proj_gap=np.int64(4), scale=torch.tensor(0.5))
    assert optimizer.param_groups[0]["update_proj_gap"] == 4 and optimizer.param_groups[0]["scale"] == 0.5


def test_named_parameters_are_accepted() -> None:
    model = nn.Linear(6, 4)
    optimizer = GaLoreAdamW(model.named_parameters(), lr=0.01)
    assert optimizer.param_groups[0]["param_names"] == ["weight", "bias"]
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameters_are_refused(name: str, dtype: torch.dtype) -> None:
    message = f"Param 1 of param group 0 is complex ({dtype}, shape (4, 4)): these optimizers update real"
    with pytest.raises(ValueError, match=re.escape(message)):
        CLASSES[name]([nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4, 4, dtype=dtype))])


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("shape", [(0, 6), (6, 0), (0, 0)])
def test_zero_size_matrices_step_as_no_ops(name: str, shape: tuple[int, int]) -> None:
    weight, bias = nn.Parameter(torch.empty(shape)), nn.Parameter(torch.empty(0))
    with pytest.warns(UserWarning, match=re.escape(f"(e.g. shape {shape}); their rank is clamped to min(m, n)")):
        optimizer = CLASSES[name]([{"params": [bias]}, {"params": [weight], "rank": 2, "update_proj_gap": 2}])
    for _ in range(3):
        weight.grad, bias.grad = torch.empty(shape), torch.empty(0)
        optimizer.step()
    assert weight.shape == shape and int(optimizer.state[weight]["step"]) == 3


# --- a step that raises changes nothing ----------------------------------------------------------------


def _two_groups(name: str, **kwargs: Any) -> tuple[torch.optim.Optimizer, nn.Parameter, nn.Parameter]:
    first, second = _matrix(8, 6), _matrix(6, 8)
    optimizer = CLASSES[name]([{"params": [first], "rank": 2}, {"params": [second], "rank": 2}], lr=0.01, **kwargs)
    return optimizer, first, second


def _sparse_grad(param: nn.Parameter) -> None:
    param.grad = torch.randn(param.shape).to_sparse()


def _flat(param: nn.Parameter) -> None:
    param.data = param.data.reshape(-1)
    param.grad = torch.randn(param.numel())


def _to_bf16(param: nn.Parameter) -> None:
    param.data = param.data.bfloat16()
    param.grad = torch.randn(param.shape).bfloat16()


def _resized(param: nn.Parameter) -> None:
    param.data = torch.randn(param.shape[0] + 2, param.shape[1])
    param.grad = torch.randn(param.shape)


#: Ways a step can be refused after the optimizer has stepped: the refusal names the cause, before any update.
STEP_FAILURES: dict[str, tuple[Callable[[nn.Parameter], None], type, str]] = {
    "sparse gradient": (_sparse_grad, RuntimeError, "does not support sparse gradients"),
    "flattened matrix": (_flat, RuntimeError, "tensor 0 of a projected param group (rank 2) has shape (48,)"),
    # The parameter changed after its first step (model.to(...), a resized layer): its state no longer fits.
    "dtype changed": (
        _to_bf16,
        RuntimeError,
        "param 0 of param group 1 is torch.bfloat16 on cpu with shape (6, 8), but its state",
    ),
    "shape changed": (
        _resized,
        RuntimeError,
        "param 0 of param group 1 is torch.float32 on cpu with shape (8, 8), but its state",
    ),
}


@pytest.mark.parametrize("failure", sorted(STEP_FAILURES))
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_step_that_raises_in_a_later_group_changes_nothing(name: str, failure: str) -> None:
    optimizer, first, second = _two_groups(name)
    for _ in range(2):
        first.grad, second.grad = torch.randn(8, 6), torch.randn(6, 8)
        optimizer.step()
    state = {key: value.clone() for key, value in optimizer.state[first].items()}
    weight = first.detach().clone()
    first.grad = torch.randn(8, 6)
    breaks, error, message = STEP_FAILURES[failure]
    breaks(second)
    with pytest.raises(error, match=re.escape(message)):
        optimizer.step()
    assert torch.equal(first, weight)
    assert all(torch.equal(optimizer.state[first][key], value) for key, value in state.items())


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_parameter_left_on_the_meta_device_is_refused_before_any_update(name: str) -> None:
    """Building the optimizer before materializing (FSDP-style meta init) is allowed; stepping is not."""
    real, meta = _matrix(8, 6), nn.Parameter(torch.empty(6, 8, device="meta"))
    optimizer = CLASSES[name]([{"params": [real], "rank": 2}, {"params": [meta], "rank": 2}], lr=0.01)
    real.grad, meta.grad = torch.randn(8, 6), torch.empty(6, 8, device="meta")
    before = real.detach().clone()
    message = "param 0 of param group 1 (shape (6, 8)) is on the meta device and has no data to update"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        optimizer.step()
    assert torch.equal(real, before) and not optimizer.state


def test_a_first_step_that_raises_creates_no_state() -> None:
    optimizer, first, second = _two_groups("galore")
    first.grad = torch.randn(8, 6)
    _sparse_grad(second)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()
    assert not optimizer.state and not optimizer.skipped_updates()


@pytest.mark.parametrize("fused", [None, False])
def test_fira_with_fp16_weights_works_by_default(fused: bool | None) -> None:
    """The compiled residual kernel takes no fp16; fused=None runs the reference for it (the old code
    raised a TypeError in the middle of the step, after the moments had been updated)."""
    weight, bias = _matrix(8, 6, dtype=torch.float16), nn.Parameter(torch.randn(8, dtype=torch.float16))
    optimizer = FiraAdamW([{"params": [bias]}, {"params": [weight], "rank": 2, "update_proj_gap": 2}], lr=0.01, fused=fused)
    start = weight.detach().clone()
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        weight.grad = torch.randn(8, 6, generator=generator).half()
        bias.grad = torch.randn(8, generator=generator).half()
        optimizer.step()
    assert torch.isfinite(weight).all() and not torch.equal(weight, start)


@needs_kernels
def test_fira_fp16_with_fused_true_is_refused_at_construction() -> None:
    message = (
        "Invalid fused in param group 0: True. Param 0 is torch.float16 with torch.float16 moments, which the "
        "compiled Fira residual kernel does not take"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        FiraAdamW([{"params": [_matrix(dtype=torch.float16)], "rank": 2}], fused=True)
    with pytest.raises(ValueError, match=re.escape("Param 0 is torch.float16 with torch.float32 moments")):
        FiraAdamW([{"params": [_matrix(dtype=torch.float16)], "rank": 2}], fused=True, moment_dtype=torch.float32)
    FiraAdamW([{"params": [_matrix(dtype=torch.bfloat16)], "rank": 2}], fused=True)


@needs_kernels
def test_fira_fused_true_refuses_a_dtype_change_before_stepping() -> None:
    """Refused by the state check, which runs first (a fresh optimizer for fp16 would be refused too)."""
    weight = _matrix()
    optimizer = FiraAdamW([{"params": [weight], "rank": 2}], fused=True)
    weight.grad = torch.randn(8, 6)
    optimizer.step()
    state = {key: value.clone() for key, value in optimizer.state[weight].items()}
    weight.data = weight.data.half()
    weight.grad = torch.randn(8, 6).half()
    with pytest.raises(RuntimeError, match=re.escape("param 0 of param group 0 is torch.float16 on cpu")):
        optimizer.step()
    assert all(torch.equal(optimizer.state[weight][key], value) for key, value in state.items())


def test_groups_rewritten_by_torch_schedulers_can_be_added_again() -> None:
    """OneCycleLR and SWALR write keys into every group; a group copied from those is accepted."""
    optimizer = GaLoreAdamW([{"params": [_matrix()], "rank": 2}], lr=0.01)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    torch.optim.swa_utils.SWALR(optimizer, swa_lr=0.05)
    template = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    optimizer.add_param_group({**template, "params": [_matrix(6, 4)]})
    assert len(optimizer.param_groups) == 2
