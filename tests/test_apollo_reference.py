"""The fp64 APOLLO reference (``apollo_reference.py``) against ``apollo-torch==1.0.3`` itself.

The package is looked for on ``sys.path`` and in ``/tmp/apollo_pkgs`` (or ``$APOLLO_TORCH_PATH``), where
``pip install --target /tmp/apollo_pkgs --no-deps apollo-torch==1.0.3`` puts it; the tests skip when it
is in neither. For CI, the project's setup would need the line
``$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "apollo-torch==1.0.3"`` (as for
galore-torch). Its package ``__init__`` imports bitsandbytes (8-bit variants) and its optimizer
modules import ``transformers`` for a version check only: the tests load ``apollo_torch.apollo``
without running the package ``__init__`` and stub ``transformers.utils.versions``.

Tolerance: the package runs in float32 (its random matrices are drawn in float32 whatever the weight's
dtype; the reference uses the same float32 values, in float64 arithmetic). Its trajectories agree with the
reference to ``rtol=1e-5, atol=1e-6`` on weights of order 1 (seen: at most 5.5e-7 apart), and the
displacement from the start to 1e-5 of its norm (seen: 7e-7 to 4.8e-6, the worst for APOLLO-Mini's small
steps, where the float32 rounding of the weights themselves is the floor). With float64 weights the
package agrees with the reference to 1e-12.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from apollo_reference import (
    ApolloCrash,
    apollo_next_seed,
    apollo_random_matrix,
    apollo_reference,
    apollo_seed_chain,
    refresh_steps,
)
from stubs import stub_transformers_version_check
from torch import nn

APOLLO_PATH = Path(os.environ.get("APOLLO_TORCH_PATH", "/tmp/apollo_pkgs"))
PIP_LINE = "pip install --no-deps apollo-torch==1.0.3  (or: pip install --target /tmp/apollo_pkgs --no-deps apollo-torch==1.0.3)"
SHAPES = {"tall": (12, 8), "wide": (8, 12), "square": (10, 10)}


@pytest.fixture
def apollo_adamw(monkeypatch: pytest.MonkeyPatch) -> type:
    """apollo-torch's ``APOLLOAdamW`` class (``apollo_torch.apollo.AdamW``), loaded for one test."""
    if importlib.util.find_spec("apollo_torch") is None:
        if not (APOLLO_PATH / "apollo_torch" / "apollo.py").is_file():
            pytest.skip(f"apollo-torch 1.0.3 is not installed; {PIP_LINE}")
        monkeypatch.setattr(sys, "path", [*sys.path, str(APOLLO_PATH)])
    spec = importlib.util.find_spec("apollo_torch")
    assert spec is not None and spec.submodule_search_locations is not None

    stub_transformers_version_check(monkeypatch)
    for name in [name for name in sys.modules if name.startswith("apollo_torch")]:
        monkeypatch.delitem(sys.modules, name)
    # A bare package shell, so that the package __init__ (and its bitsandbytes import) does not run.
    shell = types.ModuleType("apollo_torch")
    shell.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, "apollo_torch", shell)
    try:
        module = importlib.import_module("apollo_torch.apollo")
    except Exception as error:  # pragma: no cover - depends on the machine
        pytest.skip(f"apollo_torch.apollo does not import ({error!r}); {PIP_LINE}")
    for name in [name for name in sys.modules if name.startswith("apollo_torch.")]:
        monkeypatch.setitem(sys.modules, name, sys.modules.pop(name))  # so that undo removes it again
    return module.AdamW


def sequence(shape: tuple[int, int], steps: int, seed: int, growth: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(shape, generator=generator)
    grads = [torch.randn(shape, generator=generator) * growth**t for t in range(steps)]
    return start, grads


def run_package(
    cls: type, starts: list[torch.Tensor], grads: list[list[torch.Tensor]], group: dict, dtype=torch.float32, **kw
) -> tuple[list[list[torch.Tensor]], torch.optim.Optimizer, list[nn.Parameter]]:
    params = [nn.Parameter(s.to(dtype).clone()) for s in starts]
    optimizer = cls([{"params": params, **group}], **kw)
    out = []
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.to(dtype).clone()
        optimizer.step()
        out.append([p.detach().clone() for p in params])
    return out, optimizer, params


def assert_same_trajectory(
    theirs: list[list[torch.Tensor]], ours: list[list[torch.Tensor]], starts, rtol=1e-5, atol=1e-6
) -> float:
    worst = 0.0
    for step_theirs, step_ours in zip(theirs, ours, strict=True):
        for t, o, s in zip(step_theirs, step_ours, starts, strict=True):
            torch.testing.assert_close(t.double(), o, rtol=rtol, atol=atol)
            moved = o - s.double()
            gap = (t.double() - o).norm() / moved.norm().clamp_min(1e-30)
            assert gap < rtol, f"displacement differs by {gap:.2e} relative"
            worst = max(worst, float(gap))
    return worst


def group_of(**kw) -> dict:
    group = {"rank": 3, "proj": "random", "scale_type": "channel", "scale": 1.0, "update_proj_gap": 3, "proj_type": "std"}
    group.update(kw)
    return group


CASES = {
    # name: (shape, group keys, constructor keywords, gradient growth per step)
    "channel-tall": ((12, 8), {}, {"lr": 0.05}, 1.0),
    "channel-wide-wd-scale": ((8, 12), {"scale": 2.0}, {"lr": 0.05, "weight_decay": 0.1}, 1.0),
    "channel-square": ((10, 10), {"rank": 4}, {"lr": 0.02}, 1.0),
    "tensor-tall": ((12, 8), {"scale_type": "tensor", "rank": 2}, {"lr": 0.05}, 1.0),
    "tensor-wide-wd": ((8, 12), {"scale_type": "tensor", "rank": 2}, {"lr": 0.05, "weight_decay": 0.05}, 1.0),
    "mini-tall": ((12, 8), {"rank": 1, "scale_type": "tensor", "scale": 128.0, "update_proj_gap": 2}, {"lr": 0.002}, 1.0),
    "mini-wide": ((8, 12), {"rank": 1, "scale_type": "tensor", "scale": 128.0, "update_proj_gap": 2}, {"lr": 0.002}, 1.0),
    "limiter-growing-grads": ((12, 8), {"update_proj_gap": 4}, {"lr": 0.05}, 1.5),
    "limiter-scale-front": ((8, 12), {"scale": 4.0}, {"lr": 0.02, "scale_front": True}, 1.5),
    "no-limiter": ((12, 8), {}, {"lr": 0.05, "disable_nl": True}, 1.5),
    "no-bias-correction-eps": ((8, 12), {}, {"lr": 0.05, "correct_bias": False, "eps": 1e-3, "betas": (0.8, 0.95)}, 1.0),
    "right-on-tall": ((12, 8), {"proj_type": "right"}, {"lr": 0.05}, 1.0),
    "left-on-wide": ((8, 12), {"proj_type": "left"}, {"lr": 0.05}, 1.0),
    "reverse-std-tensor-tall": ((12, 8), {"proj_type": "reverse_std", "scale_type": "tensor"}, {"lr": 0.05}, 1.0),
    "reverse-std-channel-rank1": ((8, 12), {"proj_type": "reverse_std", "rank": 1}, {"lr": 0.05}, 1.0),
    "rank-above-dim": ((12, 8), {"rank": 10}, {"lr": 0.05}, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_reproduces_apollo_torch(apollo_adamw: type, case: str) -> None:
    shape, keys, kw, growth = CASES[case]
    group = group_of(**keys)
    steps = 8  # with gap 3: draws at steps 1, 4, 7
    start, grads = sequence(shape, steps, seed=len(case), growth=growth)
    theirs, optimizer, params = run_package(apollo_adamw, [start], [[g] for g in grads], group, **kw)
    options = {k: v for k, v in group.items() if k != "proj"}
    ours = apollo_reference([start], [[g] for g in grads], **options, **kw)
    assert_same_trajectory(theirs, ours, [start])
    state = optimizer.state[params[0]]
    assert state["step"] == steps
    assert state["seed"] == 1
    if growth > 1.0 and not kw.get("disable_nl"):  # the limiter really acted
        unlimited = apollo_reference([start], [[g] for g in grads], **options, **{**kw, "disable_nl": True})
        assert (unlimited[-1][0] - ours[-1][0]).norm() > 1e-3 * (ours[-1][0] - start.double()).norm()


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_float64_weights_agree_to_1e_12(apollo_adamw: type, shape: tuple[int, int]) -> None:
    start, grads = sequence(shape, 7, seed=5, growth=1.3)
    group = group_of(update_proj_gap=2, scale=3.0)
    theirs, _, _ = run_package(apollo_adamw, [start], [[g] for g in grads], group, dtype=torch.float64, lr=0.05, weight_decay=0.1)
    options = {k: v for k, v in group.items() if k != "proj"}
    ours = apollo_reference([start], [[g] for g in grads], **options, lr=0.05, weight_decay=0.1)
    for t, o in zip(theirs, ours):
        torch.testing.assert_close(t[0], o[0], rtol=1e-12, atol=1e-12)


def test_random_matrices_regenerated_bit_for_bit(apollo_adamw: type) -> None:
    """Seeds are 1-based positions over every parameter given (the 1-D one of group 0 counts too)."""
    shapes = [(12, 8), (8, 12)]
    bias = nn.Parameter(torch.zeros(5))
    generator = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    group = group_of(rank=2, update_proj_gap=2)
    optimizer = apollo_adamw([{"params": [bias]}, {"params": params, **group}], lr=0.01)
    assert [optimizer.state[p]["seed"] for p in (bias, *params)] == [1, 2, 3]
    sides = ["right", "left"]  # "std": tall -> r x n on the right, wide -> m x r on the left
    for step in range(1, 6):
        bias.grad = torch.randn(5, generator=generator)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        draws = sum(1 for t in refresh_steps(step, 2))
        for i, p in enumerate(params):
            seeds = apollo_seed_chain(i + 2, draws + 1)
            projector = optimizer.state[p]["projector"]
            expected = apollo_random_matrix(seeds[draws - 1], p.shape, 2, sides[i])
            assert torch.equal(projector.ortho_matrix, expected)
            assert projector.seed == seeds[draws]  # the seed of the next draw is kept, not the matrix's
    assert refresh_steps(5, 2) == [1, 3, 5]
    assert apollo_next_seed(3) == 3251329097462014787


def test_several_parameters_and_explicit_projections(apollo_adamw: type) -> None:
    generator = torch.Generator().manual_seed(2)
    shapes = [(12, 8), (8, 12), (10, 10)]
    starts = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(7)]
    group = group_of(update_proj_gap=3)
    theirs, _, _ = run_package(apollo_adamw, starts, grads, group, lr=0.05, weight_decay=0.01)
    options = {k: v for k, v in group.items() if k != "proj"}
    ours = apollo_reference(starts, grads, **options, lr=0.05, weight_decay=0.01)
    assert_same_trajectory(theirs, ours, starts)
    # The same matrices handed in explicitly give the same trajectory.
    sides = ["right", "left", "right"]
    given = [[apollo_random_matrix(s, shapes[i], 3, sides[i]) for s in apollo_seed_chain(i + 1, 3)] for i in range(3)]
    explicit = apollo_reference(starts, grads, **options, lr=0.05, weight_decay=0.01, projections=given)
    for a, b in zip(ours, explicit):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    # Other draws give another trajectory. (Permuting a matrix's r vectors would not: the channel norms
    # are taken over the low-rank dimension, so they do not see the order of the random vectors.)
    other = [[apollo_random_matrix(s + 1000, shapes[i], 3, sides[i]) for s in apollo_seed_chain(i + 1, 3)] for i in range(3)]
    moved = apollo_reference(starts, grads, **options, lr=0.05, weight_decay=0.01, projections=other)
    assert not torch.allclose(moved[-1][0], ours[-1][0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "shape, proj_type", [((12, 8), "reverse_std"), ((8, 12), "right"), ((12, 8), "left"), ((10, 10), "left")]
)
def test_channel_scale_on_the_other_side_crashes_both(apollo_adamw: type, shape, proj_type: str) -> None:
    """The channel follows the weight's shape, not the projected side: a mismatch fails to broadcast."""
    start, grads = sequence(shape, 1, seed=3)
    group = group_of(proj_type=proj_type, rank=3)
    with pytest.raises(RuntimeError, match="must match the size"):
        run_package(apollo_adamw, [start], [grads], group, lr=0.01)
    with pytest.raises(ApolloCrash):
        apollo_reference([start], [grads], **{k: v for k, v in group.items() if k != "proj"}, lr=0.01)


def test_package_quirks(apollo_adamw: type) -> None:
    """Missing keys are KeyErrors (no defaults); gap 0 fails at step 2; 'full' is not implemented."""
    start, grads = sequence((12, 8), 2, seed=4)
    for key in ("proj", "scale_type", "scale", "update_proj_gap", "proj_type"):
        group = group_of()
        del group[key]
        with pytest.raises(KeyError, match=key):
            run_package(apollo_adamw, [start], [[grads[0]]], group)
    with pytest.raises(ZeroDivisionError):
        run_package(apollo_adamw, [start], [[g] for g in grads], group_of(update_proj_gap=0))
    with pytest.raises(NotImplementedError):
        run_package(apollo_adamw, [start], [[grads[0]]], group_of(proj_type="full"))
    late = nn.Parameter(start.clone())
    optimizer = apollo_adamw([{"params": [nn.Parameter(start.clone())], **group_of()}])
    optimizer.add_param_group({"params": [late], **group_of()})
    late.grad = grads[0].clone()
    with pytest.raises(KeyError, match="seed"):  # seeds are handed out in __init__ only
        optimizer.step()
