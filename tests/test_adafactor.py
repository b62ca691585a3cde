"""GaLoreAdafactor against galore-torch 1.0's GaLoreAdafactor, an fp64 reference written from the formulas,
through checkpoints, and on bad input.

Parity: on CPU the trajectories (weights and every statistic) are bit-identical to galore-torch's with
``SVDProjector(sign="lapack")``, in fp32, bf16 and fp64, for every ``proj_type`` and the option sets below
(tolerance 0: the same ops in the same order; the bases have the reference's column-major layout).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import io
import math
import sys
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from reference import GaLoreReference, _moved
from stubs import stub_module, stub_transformers_version_check
from torch import Tensor, nn

from lowrank_optim import GaLoreAdafactor
from lowrank_optim.projection import SVDProjector

# ---------------------------------------------------------------------------------------------------------
# galore-torch itself


@pytest.fixture
def reference_adafactor(monkeypatch: pytest.MonkeyPatch) -> type:
    """galore-torch's ``GaLoreAdafactor``, its package ``__init__``'s imports of transformers (a version
    check) and bitsandbytes (the 8-bit variant) stubbed for the test."""
    if importlib.util.find_spec("galore_torch") is None:
        pytest.skip("galore-torch 1.0 is not installed (make test installs it: pip install --no-deps galore-torch==1.0)")
    stub_transformers_version_check(monkeypatch)
    stub_module(monkeypatch, "bitsandbytes")
    stub_module(monkeypatch, "bitsandbytes.optim")
    stub_module(monkeypatch, "bitsandbytes.optim.optimizer", Optimizer2State=object)
    for name in [name for name in sys.modules if name.startswith("galore_torch")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("galore_torch").GaLoreAdafactor


class Net(nn.Module):
    """Three Linear layers (projected), their biases, a 3-D tensor (factored over its last two dimensions)
    and a scalar; the middle weight starts with an RMS below eps2 = 1e-3 and the last bias at zero, so the
    step size takes both branches of ``max(eps2, RMS(W))``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(12, 16)
        self.middle = nn.Linear(16, 10)
        self.last = nn.Linear(10, 4)
        self.mix = nn.Parameter(torch.randn(2, 4, 4) * 0.5)
        self.gain = nn.Parameter(torch.tensor(0.7))
        with torch.no_grad():
            self.middle.weight.mul_(1e-4)
            self.last.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.middle(torch.tanh(self.first(x))))
        return (self.last(h) @ (self.mix[0] + self.mix[1])) * self.gain

    def matrices(self) -> list[nn.Parameter]:
        return [self.first.weight, self.middle.weight, self.last.weight]

    def groups(self, **projected: object) -> list[dict]:
        matrices = self.matrices()
        rest = [p for p in self.parameters() if all(p is not m for m in matrices)]
        return [{"params": rest}, {"params": matrices, "rank": 3, "update_proj_gap": 7, "scale": 0.25, **projected}]


def train(model: Net, optimizer: torch.optim.Optimizer, steps: int, dtype: torch.dtype, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=generator).to(dtype)
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()


def twin_models(dtype: torch.dtype) -> tuple[Net, Net]:
    torch.manual_seed(0)
    ours = Net().to(dtype)
    torch.manual_seed(0)
    return ours, Net().to(dtype)


OPTION_SETS = {
    "relative": {},
    "relative-beta1-decay": {"beta1": 0.9, "weight_decay": 0.1},
    "lr": {"lr": 1e-2, "relative_step": False, "scale_parameter": False},
    "lr-scaled-beta1-decay": {"lr": 1e-2, "relative_step": False, "beta1": 0.9, "weight_decay": 0.1},
    "warmup": {"warmup_init": True, "beta1": 0.5},
    "clip-decay_rate": {"clip_threshold": 0.5, "decay_rate": -0.5, "eps": (1e-20, 1e-2)},
}


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("options", list(OPTION_SETS.values()), ids=list(OPTION_SETS))
def test_bit_identical_to_galore_torch(reference_adafactor: type, options: dict, proj_type: str) -> None:
    ours, theirs = twin_models(torch.float32)
    optimizers = [
        # LAPACK's signs, as galore-torch keeps them (our default is the canonical sign).
        GaLoreAdafactor(ours.groups(proj_type=proj_type), projector=SVDProjector(sign="lapack"), **options),
        reference_adafactor(theirs.groups(proj_type=proj_type), **options),
    ]
    for model, optimizer in zip((ours, theirs), optimizers):
        train(model, optimizer, 30, torch.float32)  # the same inputs; refreshes at steps 1, 8, 15, 22 and 29
    assert_same_run(ours, theirs, *optimizers)


def assert_same_run(ours: Net, theirs: Net, our_optimizer: torch.optim.Optimizer, reference: torch.optim.Optimizer) -> None:
    for mine, other in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(mine, other), (mine - other).abs().max()
        state, expected = our_optimizer.state[mine], reference.state[other]
        assert int(state["step"]) == expected["step"] == 30
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "RMS"):
            assert (key in state) == (key in expected), key
            if key in state:
                assert state[key].dtype == expected[key].dtype, key
                assert torch.equal(state[key], expected[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
@pytest.mark.parametrize("options", [OPTION_SETS["relative-beta1-decay"], OPTION_SETS["lr-scaled-beta1-decay"]], ids=["r", "lr"])
def test_bit_identical_to_galore_torch_in_other_dtypes(reference_adafactor: type, options: dict, dtype: torch.dtype) -> None:
    """bf16: both compute in fp32 copies and keep fp32 state (the basis too); fp64: everything fp64."""
    ours, theirs = twin_models(dtype)
    optimizers = [
        GaLoreAdafactor(ours.groups(), projector=SVDProjector(sign="lapack"), **options),
        reference_adafactor(theirs.groups(proj_type="std"), **options),
    ]
    for model, optimizer in zip((ours, theirs), optimizers):
        train(model, optimizer, 30, dtype)
    assert_same_run(ours, theirs, *optimizers)
    assert optimizers[0].state[ours.first.weight]["basis_right"].dtype == compute_dtype(dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 else dtype


def test_signature_and_step_size_are_galore_torchs(reference_adafactor: type) -> None:
    """Same positional parameters and defaults; ``_get_lr`` (what transformers' AdafactorSchedule reads)
    gives the reference's value."""
    ours = inspect.signature(GaLoreAdafactor.__init__).parameters
    theirs = inspect.signature(reference_adafactor.__init__).parameters
    for name, parameter in theirs.items():
        assert name in ours and ours[name].default == parameter.default, name
    assert list(ours)[: len(theirs)] == list(theirs)
    mine, other = twin_models(torch.float32)
    optimizers = [GaLoreAdafactor(mine.groups()), reference_adafactor(other.groups(proj_type="std"))]
    for model, optimizer in zip((mine, other), optimizers):
        train(model, optimizer, 3, torch.float32)
    for p, q in [(mine.first.weight, other.first.weight), (mine.middle.weight, other.middle.weight)]:
        expected = reference_adafactor._get_lr(optimizers[1].param_groups[1], optimizers[1].state[q])
        assert GaLoreAdafactor._get_lr(optimizers[0].param_groups[1], optimizers[0].state[p]) == pytest.approx(float(expected))


# ---------------------------------------------------------------------------------------------------------
# An fp64 reference written from the formulas (Shazeer & Stern 2018, as Hugging Face orders the steps)


def rms(x: Tensor) -> float:
    return math.sqrt(float((x * x).sum()) / x.numel())


@dataclass
class AdafactorReference:
    """Adafactor for one tensor in fp64, GaLore-projected when ``rank`` is set (the basis from
    :class:`reference.GaLoreReference`: the fp32 SVD, or DCT frequencies). ``V̂ = r cᵀ / mean(r)`` is formed
    entry by entry. With ``projector="dct"`` the first moment and the factor along the projected
    dimension follow the frequencies that stay selected at a refresh (new ones start at zero)."""

    weight: Tensor
    lr: float | None = None
    eps: tuple[float, float] = (1e-30, 1e-3)
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    beta1: float | None = None
    weight_decay: float = 0.0
    scale_parameter: bool = True
    relative_step: bool = True
    warmup_init: bool = False
    rank: int | None = None
    update_proj_gap: int = 200
    scale: float = 1.0
    proj_type: str = "std"
    projector: str = "svd"
    t: int = 0
    row: Tensor | None = field(default=None, repr=False)
    col: Tensor | None = field(default=None, repr=False)
    second: Tensor | None = field(default=None, repr=False)
    first: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.weight = self.weight.detach().double().clone()
        self.basis = None
        if self.rank is not None:
            self.basis = GaLoreReference(
                self.weight, rank=self.rank, update_proj_gap=self.update_proj_gap, proj_type=self.proj_type,
                projector=self.projector,
            )

    def update(self, grad: Tensor) -> None:
        g = grad.double()
        side = None
        if self.basis is not None:
            side = self.basis.side()
            if self.t % self.update_proj_gap == 0:
                old = (self.basis.left_indices, self.basis.right_indices)
                self.basis.refresh(grad, side)
                if self.projector == "dct" and self.t > 0:
                    self._follow(side, old, (self.basis.left_indices, self.basis.right_indices))
            g = self.basis.project(g, side)
        self.t += 1
        t = self.t
        if self.relative_step:
            rho = min(1e-6 * t if self.warmup_init else 1e-2, 1.0 / math.sqrt(t))
        else:
            rho = self.lr
        alpha = max(self.eps[1], rms(self.weight)) * rho if self.scale_parameter else rho
        b2 = 1.0 - t**self.decay_rate
        squared = g * g + self.eps[0]
        if g.dim() >= 2:
            if self.row is None:
                self.row = torch.zeros(g.shape[:-1], dtype=torch.float64)
                self.col = torch.zeros(g.shape[:-2] + g.shape[-1:], dtype=torch.float64)
            self.row = b2 * self.row + (1 - b2) * squared.mean(dim=-1)
            self.col = b2 * self.col + (1 - b2) * squared.mean(dim=-2)
            estimate = torch.empty_like(g)
            for index in torch.cartesian_prod(*[torch.arange(size) for size in g.shape]).tolist():
                *lead, i, j = index
                row = self.row[tuple(lead)]
                estimate[tuple(index)] = row[i] * self.col[tuple(lead)][j] / row.mean()
        else:
            self.second = (b2 * self.second if self.second is not None else 0.0) + (1 - b2) * squared
            estimate = self.second
        update = g / estimate.sqrt()
        update = alpha * update / max(1.0, rms(update) / self.clip_threshold)
        if self.beta1 is not None:
            self.first = (self.beta1 * self.first if self.first is not None else 0.0) + (1 - self.beta1) * update
            update = self.first
        if side is not None:
            update = self.scale * self.basis.back(update, side)
        self.weight = self.weight - self.weight_decay * alpha * self.weight - update

    def _follow(self, side: str, old: tuple, new: tuple) -> None:
        """The statistics indexed by projected coordinates move with their frequencies."""
        if side in ("left", "full"):
            if self.first is not None:
                self.first = _moved(self.first, old[0], new[0], 0)
            self.row = _moved(self.row, old[0], new[0], 0)
        if side in ("right", "full"):
            if self.first is not None:
                self.first = _moved(self.first, old[1], new[1], 1)
            self.col = _moved(self.col, old[1], new[1], 0)


def gradient_sequence(shape: tuple[int, ...], steps: int, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Growing gradients, so that DCT selections change between refreshes.
    return [torch.randn(shape, generator=generator, dtype=torch.float64) * (1 + 0.3 * t) for t in range(steps)]


REFERENCE_OPTIONS = {
    "relative": {},
    "lr-beta1-decay": {"lr": 3e-2, "relative_step": False, "beta1": 0.9, "weight_decay": 0.2},
    "lr-unscaled": {"lr": 3e-2, "relative_step": False, "scale_parameter": False, "clip_threshold": 0.3},
    "warmup-beta1": {"warmup_init": True, "beta1": 0.7, "weight_decay": 0.1},
}


@pytest.mark.parametrize("projector", ["svd", "dct"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["tall", "wide"])
@pytest.mark.parametrize("options", list(REFERENCE_OPTIONS.values()), ids=list(REFERENCE_OPTIONS))
def test_matches_fp64_reference(options: dict, shape: tuple[int, int], proj_type: str, projector: str) -> None:
    generator = torch.Generator().manual_seed(3)
    weight = nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64))
    vector = nn.Parameter(torch.randn(shape[0], generator=generator, dtype=torch.float64) * 1e-4)
    block = nn.Parameter(torch.randn(2, 3, 5, generator=generator, dtype=torch.float64))
    group = {"rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": proj_type}
    optimizer = GaLoreAdafactor([{"params": [vector, block]}, {"params": [weight], **group}], projector=projector, **options)
    references = [
        AdafactorReference(weight, **group, projector=projector, **options),
        AdafactorReference(vector, **options),
        AdafactorReference(block, **options),
    ]
    sequences = [gradient_sequence(p.shape, 10, seed) for seed, p in enumerate((weight, vector, block))]
    for grads in zip(*sequences):  # refreshes at steps 1, 4, 7, 10
        for param, grad, reference in zip((weight, vector, block), grads, references):
            param.grad = grad.clone()
            reference.update(grad)
        optimizer.step()
    for param, reference in zip((weight, vector, block), references):
        torch.testing.assert_close(param.detach(), reference.weight, rtol=0, atol=1e-12)
    state = optimizer.state[weight]
    torch.testing.assert_close(state["exp_avg_sq_row"], references[0].row, rtol=1e-12, atol=0)
    torch.testing.assert_close(state["exp_avg_sq_col"], references[0].col, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Projectors, checkpoints


def run(model: Net, optimizer: GaLoreAdafactor, steps: int, seed: int) -> None:
    train(model, optimizer, steps, next(model.parameters()).dtype, seed=seed)


@pytest.mark.parametrize("projector", ["svd", "rsvd", "dct", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_round_trip_continues_bit_identically(projector: str, dtype: torch.dtype) -> None:
    model, _ = twin_models(dtype)
    options = dict(beta1=0.9, weight_decay=0.1, projector=projector)
    optimizer = GaLoreAdafactor(model.groups(proj_type="std"), **options)
    run(model, optimizer, 10, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Net().to(dtype)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = GaLoreAdafactor(resumed.groups(proj_type="std"), **options)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert resumed_optimizer.param_groups[1]["projector"] == optimizer.param_groups[1]["projector"]
    assert saved["optimizer"]["param_groups"][1]["projector"] == projector  # plain values in the state dict
    assert copy.deepcopy(optimizer).state_dict()["param_groups"][1]["projector"] == projector  # hooks rebuilt
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in optimizer.state[p].items():
            assert resumed_optimizer.state[q][key].dtype == value.dtype, key
    run(model, optimizer, 12, seed=2)  # refreshes at steps 15 and 22
    run(resumed, resumed_optimizer, 12, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(resumed_optimizer.state[q][key], value), key
    if dtype == torch.bfloat16:  # the state of bf16 weights stays fp32 through the load
        assert resumed_optimizer.state[resumed.first.weight]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("projector", ["rsvd", "dct"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_other_projectors_train(projector: str, proj_type: str) -> None:
    model, _ = twin_models(torch.float32)
    optimizer = GaLoreAdafactor(
        model.groups(proj_type=proj_type), lr=3e-2, relative_step=False, scale_parameter=False, projector=projector
    )
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(0))
    target = torch.tanh(x[:, :4])
    losses = []
    for _ in range(40):  # refreshes every 7 steps
        optimizer.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.6 * losses[0]  # 0.405 -> 0.09-0.23 (SVD: 0.09-0.12)
    state = optimizer.state[model.first.weight]  # 16 x 12: left-projected under reverse_std
    sides = {"std": ["right"], "reverse_std": ["left"], "full": ["left", "right"]}[proj_type]
    for side in sides:
        if projector == "dct":
            assert state[f"dct_indices_{side}"].dtype == torch.int64
        else:
            basis = state[f"basis_{side}"]
            gram = basis.T @ basis if side == "left" else basis @ basis.T
            torch.testing.assert_close(gram, torch.eye(3), atol=1e-5, rtol=0)


def test_nonfinite_gradient_at_a_refresh() -> None:
    """The first refresh with a NaN gradient defers the update (counter kept); a later one keeps the basis."""
    weight = nn.Parameter(torch.randn(8, 6))
    optimizer = GaLoreAdafactor([{"params": [weight], "rank": 2, "update_proj_gap": 2}])
    start = weight.detach().clone()
    weight.grad = torch.full((8, 6), float("nan"))
    with pytest.warns(RuntimeWarning, match="no projector yet, so its update was skipped"):
        optimizer.step()
    assert torch.equal(weight, start) and int(optimizer.state[weight]["step"]) == 0
    for _ in range(2):
        weight.grad = torch.randn(8, 6)
        optimizer.step()
    basis = optimizer.state[weight]["basis_right"].clone()
    weight.grad = torch.randn(8, 6)
    weight.grad[0, 0] = float("inf")
    optimizer.step()  # the warning is shown once per optimizer
    assert torch.equal(optimizer.state[weight]["basis_right"], basis)


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lr": 1e-3}, r"Invalid learning rate: 0.001. A manual lr cannot be combined with relative_step=True"),
        ({"relative_step": False}, r"Invalid learning rate: None. relative_step=False takes its step size from lr"),
        ({"lr": -1.0, "relative_step": False}, r"Invalid learning rate: -1.0. Must be None or a finite number >= 0.0"),
        ({"lr": float("inf"), "relative_step": False}, r"Invalid learning rate: inf"),
        ({"lr": 1e-3, "relative_step": False, "warmup_init": True}, r"Invalid warmup_init: True. warmup_init=True requires"),
        ({"eps": (1e-30,)}, r"Invalid eps: \(1e-30,\). Must be a pair"),
        ({"eps": 1e-30}, r"Invalid eps: 1e-30. Must be a pair"),
        ({"eps": (-1.0, 1e-3)}, r"Invalid epsilon value at index 0: -1.0. Must be a finite number >= 0.0"),
        ({"eps": (1e-30, float("nan"))}, r"Invalid epsilon value at index 1: nan"),
        ({"clip_threshold": 0.0}, r"Invalid clip_threshold: 0.0. Must be a number > 0.0"),
        ({"decay_rate": 0.5}, r"Invalid decay_rate: 0.5. Must be a finite number <= 0.0"),
        ({"decay_rate": float("-inf")}, r"Invalid decay_rate: -inf"),
        ({"beta1": 1.0}, r"Invalid beta1: 1.0. Must be None or in \[0, 1\)"),
        ({"beta1": "0.9"}, r"Invalid beta1: '0.9'"),
        ({"weight_decay": -0.1}, r"Invalid weight_decay value: -0.1. Must be a finite number >= 0.0"),
        ({"scale_parameter": 1}, r"Invalid scale_parameter: 1. Must be True or False"),
        ({"relative_step": None}, r"Invalid relative_step: None. Must be True or False"),
        ({"scale": float("nan")}, r"Invalid scale: nan. Must be a finite number"),
        ({"projector": "pca"}, r"Invalid projector: 'pca'. Must be one of svd, rsvd, dct, random"),
    ],
)
def test_bad_arguments_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaLoreAdafactor([nn.Parameter(torch.randn(4, 3))], **options)


@pytest.mark.parametrize(
    "group, message",
    [
        ({"rank": 0}, r"Invalid rank in param group 1: 0. Must be a positive integer"),
        ({"rank": 2, "update_proj_gap": 0}, r"Invalid update_proj_gap in param group 1: 0"),
        ({"rank": 2, "proj_type": "diag"}, r"Invalid proj_type in param group 1: 'diag'. Must be one of std"),
        ({"rank": 2, "projector": "pca"}, r"Invalid projector in param group 1: 'pca'"),
        ({"rank": 2, "scale": "big"}, r"Invalid scale in param group 1: 'big'"),
        ({"rnak": 2}, r"Unknown key 'rnak' in param group 1. Did you mean 'rank'\?"),
        ({"lr": 1e-3}, r"Invalid learning rate in param group 1: 0.001. A manual lr cannot be combined"),
        ({"beta1": -0.1}, r"Invalid beta1 in param group 1: -0.1"),
        ({"amsgrad": True}, r"Invalid amsgrad in param group 1: True"),
    ],
)
def test_bad_groups_are_refused(group: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaLoreAdafactor([{"params": [nn.Parameter(torch.randn(3))]}, {"params": [nn.Parameter(torch.randn(4, 3))], **group}])


def test_bad_tensors_are_refused() -> None:
    matrix, vector = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"Param 0 of param group 0 has shape \(3,\): only 2-D tensors can be projected"):
        GaLoreAdafactor([{"params": [vector], "rank": 2}])
    with pytest.raises(ValueError, match=r"Param 0 of param group 1 \(shape \(4, 3\)\) appears more than once"):
        GaLoreAdafactor([{"params": [matrix]}, {"params": [matrix], "rank": 2}])
    with pytest.raises(ValueError, match=r"Param 0 of param group 0 is complex"):
        GaLoreAdafactor([nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    placeholder = nn.Parameter(torch.empty(0))
    placeholder.ds_shape = (4, 3)  # what deepspeed.zero.Init leaves in a parameter
    with pytest.raises(ValueError, match=r"Param 0 of param group 0 \(shape \(4, 3\)\) is a DeepSpeed ZeRO-3"):
        GaLoreAdafactor([{"params": [placeholder], "rank": 2}])
    with pytest.warns(UserWarning, match="rank 5 in param group 0 exceeds min"):
        GaLoreAdafactor([{"params": [matrix], "rank": 5}])


def test_refuses_dtensors() -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
        for group in ({"params": [sharded], "rank": 2}, {"params": [sharded]}):
            with pytest.raises(ValueError, match=r"Param 0 of param group 0 \(shape \(6, 4\)\) is a DTensor .*whole tensors"):
                GaLoreAdafactor([group])
        plain = nn.Parameter(torch.randn(6, 4))
        optimizer = GaLoreAdafactor([plain])
        optimizer.param_groups[0]["params"] = [sharded]  # put there after construction
        sharded.grad = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
        with pytest.raises(RuntimeError, match=r"GaLoreAdafactor: param 0 of param group 0 .* is a DTensor"):
            optimizer.step()
    finally:
        if created:
            dist.destroy_process_group()


def snapshot(optimizer: GaLoreAdafactor, params: list[Tensor]) -> list:
    return [p.detach().clone() for p in params] + [
        {key: value.clone() for key, value in optimizer.state[p].items()} for p in params if p in optimizer.state
    ]


def assert_unchanged(before: list, after: list) -> None:
    assert len(before) == len(after)
    for old, new in zip(before, after):
        if isinstance(old, dict):
            assert old.keys() == new.keys() and all(torch.equal(old[key], new[key]) for key in old)
        else:
            assert torch.equal(old, new)


def two_groups() -> tuple[nn.Parameter, nn.Parameter, GaLoreAdafactor]:
    vector, matrix = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6, 4))
    optimizer = GaLoreAdafactor([{"params": [vector]}, {"params": [matrix], "rank": 2, "update_proj_gap": 2}])
    for _ in range(3):
        vector.grad, matrix.grad = torch.randn(6), torch.randn(6, 4)
        optimizer.step()
    return vector, matrix, optimizer


def test_a_flattened_tensor_in_a_projected_group_is_refused_before_anything_changes() -> None:
    vector, matrix, optimizer = two_groups()
    flat = nn.Parameter(torch.randn(24))  # what DeepSpeed ZeRO puts in a group: one flat partition
    flat.grad = torch.randn(24)
    optimizer.param_groups[1]["params"] = [flat]
    vector.grad = torch.randn(6)
    before = snapshot(optimizer, [vector, matrix])
    with pytest.raises(RuntimeError, match=r"tensor 0 of a projected param group \(rank 2\) has shape \(24,\), not the 2-D"):
        optimizer.step()
    assert_unchanged(before, snapshot(optimizer, [vector, matrix]))


def test_a_step_that_raises_changes_nothing() -> None:
    vector, matrix, optimizer = two_groups()
    vector.grad, matrix.grad = torch.randn(6), torch.randn(6, 4).to_sparse()
    before = snapshot(optimizer, [vector, matrix])
    with pytest.raises(RuntimeError, match="GaLoreAdafactor does not support sparse gradients"):
        optimizer.step()
    assert_unchanged(before, snapshot(optimizer, [vector, matrix]))

    matrix.grad = torch.randn(6, 4)
    optimizer.param_groups[1]["beta1"] = 0.9  # there is no first moment to continue
    with pytest.raises(RuntimeError, match=r"param 0 of param group 1 .* its state 'exp_avg' is missing"):
        optimizer.step()
    assert_unchanged(before, snapshot(optimizer, [vector, matrix]))
    optimizer.param_groups[1]["beta1"] = None

    with torch.no_grad():
        matrix.data = matrix.data.double()
    matrix.grad = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"its state 'basis_right' is torch.float32 .* the parameter or its group's"):
        optimizer.step()
    assert torch.equal(vector, before[0])


def test_bf16_weights_are_stepped_in_fp32_and_changes_of_their_dtype_are_accepted() -> None:
    """Widening bf16 weights to fp32 after some steps keeps the (fp32) state valid."""
    matrix = nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    optimizer = GaLoreAdafactor([{"params": [matrix], "rank": 2}], beta1=0.9)
    matrix.grad = torch.randn(6, 4, dtype=torch.bfloat16)
    optimizer.step()
    assert {value.dtype for key, value in optimizer.state[matrix].items() if key != "step"} == {torch.float32}
    with torch.no_grad():
        matrix.data = matrix.data.float()
    matrix.grad = torch.randn(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert matrix.dtype == torch.float32 and torch.isfinite(matrix).all()
