"""Seeded random projection: the subspace of a Gaussian matrix, whose state is a seed, not a basis.

APOLLO (Zhu et al., 2024, arXiv 2412.05270) estimates Adam's per-channel scaling from moments kept in a
random projection of the gradient, so the subspace needs no SVD and no gradient at all. The matrix has
entries ``N(0, 1/r)`` (standard normal over ``sqrt(r)``): ``P`` is ``r x n`` (right side, ``R = G Pᵀ``) or
``m x r`` (left, ``R = Pᵀ G``); such a ``P`` is not orthonormal (``P Pᵀ ≈ (n/r) I`` for the right side,
``E[Pᵀ P] = I``), which is why ``moment_policy="rotate"`` and Fira refuse this projector.

The stored state is one 0-dim int64 seed per matrix; the matrix is drawn from it, as ``apollo-torch``
1.0.3 draws its own: a ``torch.Generator`` on the parameter's device seeded with it, ``torch.randn`` in
fp32, divided by ``sqrt(r)``, cast to the parameter's dtype (so CPU runs reproduce apollo-torch's matrices
bit for bit; CUDA generators give other numbers). At a refresh the seed advances along apollo-torch's
chain (:func:`next_seed`); the first refresh uses the initial seed, ``seed`` plus the parameter's 1-based
position among the optimizer's parameters where the optimizer knows it (apollo-torch's rule for
``seed=0``). Reading the seed is a host read, so each drawn matrix is cached with the seed tensor it came
from (until that tensor changes): a step between refreshes never synchronizes. The cache holds the
matrix, so the memory in use is that of a basis; what the seed saves is checkpoint size. Under DeepSpeed
ZeRO the seed (up to 2^63) survives checkpoints because the fragment layout keeps nested integer state
away from the loader's fp32 cast (:class:`~lowrank_optim.distributed.fragment.FragmentLayout`), and each
matrix's position comes from its plan (:attr:`~lowrank_optim.distributed.plan.MatrixPlan.ordinal`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import ClassVar, Sequence, cast

import torch
from torch import Tensor

from ..state_keys import PROJECTION_SEED
from .projector import Projector, ProjectorTensor, register_projector
from .subspace import Side, Subspace, basis_shapes

__all__ = ["RandomProjector", "next_seed", "random_matrices"]

#: apollo-torch advances a seed to the 15th value of a CPU ``randint`` stream seeded with it.
_SEED_STREAM_POSITION = 15
_INT64_MAX = 2**63 - 1

#: seed tensor -> (its version when drawn, (shape, rank, side, dtype, device), the matrices)
_DRAWN: "weakref.WeakKeyDictionary[Tensor, tuple[int, tuple, tuple[Tensor | None, Tensor | None]]]" = (
    weakref.WeakKeyDictionary()
)


def next_seed(seed: int) -> int:
    """The seed after ``seed`` in apollo-torch's chain (a CPU stream, whatever the device)."""
    stream = torch.Generator(device="cpu").manual_seed(seed)
    return int(torch.randint(0, _INT64_MAX, (_SEED_STREAM_POSITION,), generator=stream)[-1])


def random_matrices(
    seed: int, shape: tuple[int, int], rank: int, side: Side, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """``(left m x r, right r x n)`` drawn from ``seed`` (the unused side ``None``; for ``full``, left then
    right from one stream), entries standard normal over ``sqrt(rank)``, drawn in fp32 on ``device``."""
    stream = torch.Generator(device=device).manual_seed(seed)
    left_shape, right_shape = basis_shapes(shape, rank, side)
    drawn: list[Tensor | None] = []
    for size in (left_shape, right_shape):
        if size is None:
            drawn.append(None)
            continue
        gaussian = torch.randn(size, generator=stream, device=device, dtype=torch.float32)
        drawn.append((gaussian / math.sqrt(rank)).to(dtype))
    return drawn[0], drawn[1]


@register_projector
@dataclasses.dataclass(frozen=True)
class RandomProjector(Projector):
    """A Gaussian random subspace, re-drawn at every refresh from a seed chain (see the module docstring).

    Args:
        seed: added to each matrix's position (1-based, among the parameters the optimizer was built
            with) to give its initial seed; ``0`` is apollo-torch's rule. Where no position is known (a
            matrix the layout cannot place) it starts from ``seed``.
    """

    name: ClassVar[str] = "random"
    uses_previous: ClassVar[bool] = True  # the next seed follows from the current one
    orthonormal: ClassVar[bool] = False
    fixed_dtypes: ClassVar[dict[str, torch.dtype]] = {PROJECTION_SEED: torch.int64}
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Invalid seed: {self.seed!r}. Must be an int >= 0.")

    def tensors(self, shape: tuple[int, int], rank: int, side: Side) -> list[ProjectorTensor]:
        return [ProjectorTensor(PROJECTION_SEED, (), torch.int64, "replicated")]

    def initial(self, spec: ProjectorTensor, device: torch.device, ordinal: int | None = None) -> Tensor:
        return torch.tensor(self.seed + (ordinal or 0), dtype=torch.int64, device=device)

    def refresh(
        self, grad: Tensor, rank: int, side: Side, previous: Sequence[Tensor] | None, *, fused: bool, first: bool
    ) -> list[Tensor]:
        assert previous is not None  # uses_previous: a refresh is given the current seed
        (current,) = previous
        seed = int(current) if first else next_seed(int(current))
        return [torch.tensor(seed, dtype=torch.int64, device=current.device)]

    def subspace(
        self,
        stored: Sequence[Tensor],
        side: Side,
        shape: tuple[int, int],
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Subspace:
        (seed,) = stored
        key = (tuple(shape), rank, side, dtype, torch.device(device))
        cached = _DRAWN.get(seed)
        if cached is None or cached[0] != seed._version or cached[1] != key:
            whole_shape = cast("tuple[int, int]", tuple(shape))
            cached = (seed._version, key, random_matrices(int(seed), whole_shape, rank, side, dtype, device))
            _DRAWN[seed] = cached
        left, right = cached[2]
        return Subspace(side, left, right)
