"""The name-keyed optimizer state in one process (the DeepSpeed side is in test_distributed_deepspeed.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from lowrank_optim import DCTAdamW, FiraAdamW, GaLoreAdamW
from lowrank_optim.distributed import load_lowrank_state, save_lowrank_state


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))


def _optimizer(cls: type[GaLoreAdamW], model: nn.Module, rank: int = 3) -> GaLoreAdamW:
    matrices = [model[0].weight, model[2].weight]
    others = [model[0].bias, model[2].bias]
    return cls([{"params": others}, {"params": matrices, "rank": rank, "update_proj_gap": 2}], lr=1e-2, weight_decay=0.1)


def _train(model: nn.Module, optimizer: GaLoreAdamW, steps: range) -> None:
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 12, generator=generator), torch.randn(8, 6, generator=generator)) for _ in range(7)]
    for step in steps:
        model.zero_grad()
        x, y = batches[step]
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()


def _assert_round_trip_continues_bitwise(tmp_path: Path, make: Callable[[nn.Module], GaLoreAdamW]) -> nn.Module:
    """Save after 3 steps, resume a fresh model and optimizer from it, and require the same bits after 7."""
    model = _model()
    optimizer = make(model)
    _train(model, optimizer, range(3))
    save_lowrank_state(optimizer, tmp_path, model=model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, optimizer, range(3, 7))

    resumed = _model()
    resumed.load_state_dict(weights)
    fresh = make(resumed)
    load_lowrank_state(fresh, tmp_path, model=resumed)
    _train(resumed, fresh, range(3, 7))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    return model


@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW, DCTAdamW])
def test_round_trip_continues_bitwise(tmp_path: Path, cls: type[GaLoreAdamW]) -> None:
    model = _assert_round_trip_continues_bitwise(tmp_path, lambda model: _optimizer(cls, model))
    # Only tensors and strings: readable without unpickling code.
    content = torch.load(next(tmp_path.glob("lowrank_state_rank*.pt")), weights_only=True)
    assert set(content["params"]) == {name for name, _ in model.named_parameters()}


def test_refuses_a_different_rank(tmp_path: Path) -> None:
    model = _model()
    optimizer = _optimizer(GaLoreAdamW, model)
    _train(model, optimizer, range(1))
    save_lowrank_state(optimizer, tmp_path, model=model)
    with pytest.raises(ValueError, match=r"parameter '0.weight' basis_right was saved with shape \(3, 12\)"):
        load_lowrank_state(_optimizer(GaLoreAdamW, model, rank=2), tmp_path, model=model)


def test_refuses_a_missing_parameter_and_a_missing_model(tmp_path: Path) -> None:
    model = _model()
    optimizer = _optimizer(GaLoreAdamW, model)
    _train(model, optimizer, range(1))
    with pytest.raises(ValueError, match="pass model="):
        save_lowrank_state(optimizer, tmp_path)
    save_lowrank_state(optimizer, tmp_path, model=model)
    bigger = nn.Sequential(*model, nn.Linear(6, 6))
    extended = GaLoreAdamW([{"params": list(bigger[3].parameters())}], lr=1e-2)
    with pytest.raises(KeyError, match="no entry for parameter '3.weight'"):
        load_lowrank_state(extended, tmp_path, model=bigger)
    with pytest.raises(FileNotFoundError, match="holds no lowrank_state_rank"):
        load_lowrank_state(optimizer, tmp_path / "empty", model=model)


def test_8bit_round_trip_continues_bitwise_and_refuses_a_full_precision_optimizer(tmp_path: Path) -> None:
    """8-bit codes and scales are saved as they are (uint8, fp32); loaded into an optimizer that keeps plain
    moments they would be read as numbers, so that is refused, naming the parameter and both dtypes."""
    from lowrank_optim import Blockwise8bit, FullPrecision

    def make(model: nn.Module, moment_format) -> GaLoreAdamW:
        optimizer = _optimizer(GaLoreAdamW, model)
        for group in optimizer.param_groups:
            group["moment_format"] = moment_format
        return optimizer

    fmt = Blockwise8bit(block_size=4, min_size=0)
    _assert_round_trip_continues_bitwise(tmp_path, lambda model: make(model, fmt))
    plain_model = _model()
    plain = make(plain_model, FullPrecision())
    message = r"parameter '0.bias' exp_avg was saved as torch.uint8 but this optimizer keeps it as torch.float32"
    with pytest.raises(ValueError, match=message):
        load_lowrank_state(plain, tmp_path, model=plain_model)


# --- rank="auto": each matrix's rank is saved and its state rebuilt at it --------------------------------


def _auto_optimizer(cls: type[GaLoreAdamW], model: nn.Module, budget: int = 1400, **options) -> GaLoreAdamW:
    matrices = [model[0].weight, model[2].weight]
    others = [model[0].bias, model[2].bias]
    auto = {"params": matrices, "rank": "auto", "state_budget": budget, "update_proj_gap": 2}
    return cls([{"params": others}, auto], lr=1e-2, weight_decay=0.1, **options)


@pytest.mark.parametrize("name", ["galore", "fira_8bit", "dct"])
def test_auto_rank_round_trip_continues_bitwise(tmp_path: Path, name: str) -> None:
    """Saved after 3 steps (ranks chosen at steps 0 and 2), resumed in a fresh optimizer whose matrices have
    no rank yet: each is rebuilt at its saved rank, and the run continues bit for bit (refreshes at 4, 6
    reallocate)."""
    from lowrank_optim import Blockwise8bit

    # Budgets under which the two matrices get unequal ranks here.
    cls, budget, options = {
        "galore": (GaLoreAdamW, 1400, {}),
        "fira_8bit": (FiraAdamW, 2000, {"moment_format": Blockwise8bit(block_size=4, min_size=0)}),
        "dct": (DCTAdamW, 1000, {}),
    }[name]
    _assert_round_trip_continues_bitwise(tmp_path, lambda model: _auto_optimizer(cls, model, budget, **options))
    content = torch.load(next(tmp_path.glob("lowrank_state_rank*.pt")), weights_only=True)
    saved = [int(content["params"][key]["matrix_rank"]) for key in ("0.weight", "2.weight")]
    assert saved[0] != saved[1] and min(saved) >= 1, saved  # unequal ranks, as the budget spread them


def test_auto_rank_load_refusals_name_the_value_and_leave_the_state(tmp_path: Path) -> None:
    model = _model()
    optimizer = _auto_optimizer(GaLoreAdamW, model)
    _train(model, optimizer, range(3))
    save_lowrank_state(optimizer, tmp_path / "auto", model=model)
    fixed = _optimizer(GaLoreAdamW, model)
    _train(model, fixed, range(1))
    save_lowrank_state(fixed, tmp_path / "fixed", model=model)

    target = _auto_optimizer(GaLoreAdamW, model)
    _train(model, target, range(1))
    before = {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for p, s in target.state.items()}

    def unchanged() -> None:
        for param, state in target.state.items():
            assert state.keys() == before[param].keys()
            for key, value in state.items():
                assert torch.equal(value, before[param][key]) if isinstance(value, torch.Tensor) else value == before[param][key]

    with pytest.raises(ValueError, match=r"parameter '0.weight' was saved without a 'matrix_rank' \(from a group with "
                                         r"a fixed rank\), but param group 1 has rank='auto'"):
        load_lowrank_state(target, tmp_path / "fixed", model=model)
    unchanged()
    small = _auto_optimizer(GaLoreAdamW, model, budget=500)
    with pytest.raises(ValueError, match=r"the saved ranks of param group 1 hold \d+ bytes of state, more than its "
                                         r"state_budget 500; allowed: a state_budget of at least \d+"):
        load_lowrank_state(small, tmp_path / "auto", model=model)
    # A damaged entry: a rank larger than the matrix allows.
    path = next((tmp_path / "auto").glob("lowrank_state_rank*.pt"))
    content = torch.load(path, weights_only=True)
    content["params"]["2.weight"]["matrix_rank"] = torch.tensor(9)
    (tmp_path / "damaged").mkdir()
    torch.save(content, tmp_path / "damaged" / "lowrank_state_rank00000.pt")  # a pre-manifest save: no checksum
    with pytest.raises(ValueError, match=r"parameter '2.weight' has matrix_rank tensor\(9\) saved; allowed: an "
                                         r"integer in \[0, 6\] for its shape \(6, 20\)"):
        load_lowrank_state(target, tmp_path / "damaged", model=model)
    unchanged()


def test_auto_rank_round_trip_with_two_auto_groups_of_equal_size(tmp_path: Path) -> None:
    """Two rank='auto' groups with the same number of matrices (each its own budget): each matrix is
    rebuilt at its saved rank in its own group, and the run continues bit for bit."""

    def make(model: nn.Module) -> GaLoreAdamW:
        first, second = [model[0].weight], [model[2].weight]
        others = [model[0].bias, model[2].bias]
        auto = {"rank": "auto", "update_proj_gap": 2}
        return GaLoreAdamW(
            [{"params": others}, {"params": first, **auto, "state_budget": 700}, {"params": second, **auto, "state_budget": 400}],
            lr=1e-2, weight_decay=0.1,
        )

    _assert_round_trip_continues_bitwise(tmp_path, make)
