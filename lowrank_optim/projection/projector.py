"""Projectors: how a projected matrix chooses its low-rank subspace, behind one small protocol.

A projector is a frozen configuration object (GaLore's SVD basis, the randomized SVD, selected DCT
frequencies, ...). It says

* which tensors it keeps per matrix (:meth:`Projector.tensors`: key, shape, dtype and how each lines up
  with the matrix, which is all a sharded layout needs to split, gather or broadcast them),
* how a refresh computes them from the whole gradient (:meth:`Projector.refresh`, on the one process
  that owns the matrix's refresh; ``previous`` is the projector being replaced where
  :attr:`Projector.uses_previous` asks for it),
* what the moments do under the ``keep`` policy when its basis vectors have identities
  (:meth:`Projector.follow_`: DCT frequencies that stay selected keep their moments), and
* the subspace its stored tensors span (:meth:`Projector.subspace`), which is all the step projects and
  back-projects with.

Everything else (the refresh schedule, non-finite gradients, the moment policies ``reset`` and
``rotate``, the collectives) is the optimizer's and the layouts', written once for every projector.
``projector=`` accepts a registered name or an instance; :func:`resolve_projector` is the one mapping
from either to the implementation, and a new projector is one module that subclasses
:class:`Projector` and calls :func:`register_projector`.

Optimizer state stays plain tensors under fixed keys; in a state dict a projector is written as its
name (default options) or ``{"name": ..., option: value}`` (:meth:`Projector.to_state`), so
``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Sequence, cast

import torch
from torch import Tensor

from .._named import NamedRegistry, to_state
from .subspace import Side, Subspace

__all__ = [
    "Projection",
    "Projector",
    "keeps_aligned",
    "ProjectorTensor",
    "projector_names",
    "projector_state_dtypes",
    "register_projector",
    "resolve_projector",
    "refresh_specs",
    "rotates",
    "rotate_moments_",
    "rotations",
    "rotated_moments",
    "resize_rank",
    "without_rounding_noise",
]


def without_rounding_noise(energies: Tensor, inner: int) -> Tensor:
    """``energies`` (fp32, one per direction) with those at fp32 rounding level set to 0: the values at or
    below ``sqrt(inner) · eps · Σ energies``, where ``inner`` is the length of the sums of products they
    were computed from (the larger side of the gradient for its Gram matrix, the transformed side for
    DCT coefficients) and ``eps`` fp32's machine epsilon.

    Why: a direction the gradient does not have (a rank-12 gradient's 13th) still comes out of fp32
    arithmetic with an energy of about ``eps · ||G||_F²``, and ``rank="auto"`` would spend budget on it,
    ranked by rounding, so that the ranks would depend on summation order (those of an all-reduced
    gradient would differ from one process's). ``sqrt(inner) · eps`` is the typical relative error of such sums (the
    worst case is ``inner · eps``); the noise measured on planted-rank gradients (36x28 to 4096x1024) stays
    10-250x below it, while a real direction that small holds under ``1.3e-5`` of the energy even for an
    11008-long side. Negative values (rounding) become 0 as well. Energies that overflowed (an infinite
    total) are returned as they are: no floor can be told from them."""
    # A 0-d tensor, not a Python float: no device sync here.
    floor = energies.clamp_min(0.0).sum() * (math.sqrt(inner) * torch.finfo(torch.float32).eps)
    return torch.where((energies <= floor) & floor.isfinite(), torch.zeros_like(energies), energies)


class ProjectorTensor(NamedTuple):
    """One tensor a projector keeps per matrix.

    ``dtype`` ``None`` means the parameter's dtype. ``sharding`` (``optim.layout.SHARDINGS``): ``rows``
    (dimension 0 runs along the matrix's rows: a left basis), ``columns`` (dimension 1 along its
    columns: a right basis) or ``replicated`` (every holder keeps all of it: indices, a seed).
    ``column_major`` asks the layout for LAPACK's layout (see ``GaLoreAdamW._init_state``).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    sharding: str
    column_major: bool = False


class Projection(NamedTuple):
    """One matrix's projector as a step sees it: the projector, the side, the (whole) rank, and its stored
    tensors in the order of :meth:`Projector.tensors` (this process's pieces of them). Transient: built
    from optimizer state on every step, never stored."""

    projector: "Projector"
    side: Side
    rank: int
    tensors: tuple[Tensor, ...]


@dataclasses.dataclass(frozen=True)
class Projector:
    """Base of every projector configuration (see the module docstring). Subclasses are frozen
    dataclasses whose fields are the options; they validate them in ``__post_init__``."""

    #: The name ``projector=`` accepts for this class with default options.
    name: ClassVar[str] = ""
    #: Whether :meth:`refresh` reads the projector it replaces (a warm start).
    uses_previous: ClassVar[bool] = False
    #: Whether its bases are orthonormal (``P Pᵀ = I``): ``moment_policy="rotate"`` and Fira need it.
    orthonormal: ClassVar[bool] = True
    #: State keys whose dtype is fixed whatever the parameter's (kept through ``load_state_dict``).
    fixed_dtypes: ClassVar[dict[str, torch.dtype]] = {}

    def tensors(self, shape: tuple[int, int], rank: int, side: Side) -> list[ProjectorTensor]:
        """The tensors kept for an ``m x n`` matrix at (effective) ``rank`` on ``side``: left first."""
        raise NotImplementedError

    def initial(self, spec: ProjectorTensor, device: torch.device, ordinal: int | None = None) -> Tensor | None:
        """The value a tensor holds before the first refresh (which is always the first step), or
        ``None`` for zeros made by the layout (``Layout.new_state``). ``ordinal``: the matrix's 1-based
        position among the optimizer's parameters where the optimizer knows it (seeds), else ``None``."""
        return None

    def refresh(
        self, grad: Tensor, rank: int, side: Side, previous: Sequence[Tensor] | None, *, fused: bool, first: bool
    ) -> list[Tensor]:
        """The new tensors (whole, in :meth:`tensors` order) from the whole, finite gradient ``grad``.
        ``previous``: where :attr:`uses_previous` is set, the whole tensors being replaced (at the first
        refresh, ``first``, the values of :meth:`initial`, or zeros), else ``None``. ``fused``: whether
        compiled kernels may be used."""
        raise NotImplementedError

    def subspace(
        self,
        stored: Sequence[Tensor],
        side: Side,
        shape: tuple[int, int],
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Subspace:
        """The subspace the stored tensors (this process's pieces) span at (effective) ``rank``, with bases in
        ``dtype``; a basis
        kept sharded comes back as the same piece (the layout's exchange gathers what a block needs)."""
        raise NotImplementedError

    def follow_(self, moments: Sequence[Tensor], old: Sequence[Tensor], new: Sequence[Tensor], side: Side) -> None:
        """Under ``moment_policy="keep"``, move the moments (in the old projected coordinates) to the new
        ones where the basis vectors have identities; the default leaves them as they are (GaLore)."""

    def carry(
        self, moments: Sequence[Tensor], old: Sequence[Tensor], new: Sequence[Tensor], side: Side, rank: int
    ) -> list[Tensor]:
        """:meth:`follow_` across a rank change (``rank="auto"``): new moment tensors in the coordinates of
        ``new``, made for ``rank``, which may differ from the rank of ``old`` and of the moments. The
        default keeps coordinates by position, as ``keep`` does at a fixed rank: the first
        ``min(r_old, r_new)`` rank slices carry over and new ones start at zero (an SVD basis is sorted by
        singular value, so a shrinking rank drops the weakest directions of the last refresh)."""
        return [resize_rank(moment, side, rank) for moment in moments]

    def energies(self, grad: Tensor, side: Side) -> Tensor:
        """How much of the whole gradient ``grad`` each further direction of this projector would capture,
        in decreasing order (1-D fp32 with ``min(m, n)`` entries at most, summing to ``||G||_F²`` where the
        directions span everything): what ``rank="auto"`` allocates ranks by. The default is the squared
        singular values, the energy the top-``k`` SVD subspace captures (Eckart-Young), also the best any
        projector of rank ``k`` can capture.

        Computed as the eigenvalues of the Gram matrix ``A Aᵀ`` of the smaller side (``A = G`` or ``Gᵀ``,
        ``k x k`` with ``k = min(m, n)``), which are ``σ_i²`` exactly in exact arithmetic: 2-5x faster than
        ``svdvals`` on LLaMA-60M's matrices (``bench/bench_auto_rank.py``), at an absolute error of about
        ``1e-7 · ||G||_F²`` per value (measured ``<= 4e-8`` of the total), far below what changes an
        allocation by energy fractions. Values within rounding of zero are reported as 0
        (:func:`without_rounding_noise`): a gradient of rank ``r`` then has ``r`` nonzero energies."""
        matrix = grad.float()
        if matrix.shape[0] > matrix.shape[1]:
            matrix = matrix.T
        try:
            values = torch.linalg.eigvalsh(matrix @ matrix.T)
        except torch.linalg.LinAlgError:
            wide = matrix.double()
            values = torch.linalg.eigvalsh(wide @ wide.T).float()
        return without_rounding_noise(values.flip(0), matrix.shape[1])

    def to_state(self) -> str | dict[str, Any]:
        """This projector as plain values for a state dict: its name, or a dict with its options."""
        return to_state(self)


#: Registered projector classes by name (the rule shared with moment formats: :mod:`lowrank_optim._named`).
_PROJECTORS: NamedRegistry[Projector] = NamedRegistry("projector", Projector, "lowrank_optim.SVDProjector(sign='lapack')")
#: The registered classes by name (the registry's own dict; tests unregister their examples from it).
_REGISTRY: dict[str, type[Projector]] = _PROJECTORS.classes


def register_projector(cls: type[Projector]) -> type[Projector]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    return _PROJECTORS.register(cls)


def projector_names() -> tuple[str, ...]:
    """The names ``projector=`` accepts, in registration order."""
    return _PROJECTORS.names()


def projector_state_dtypes() -> dict[str, torch.dtype]:
    """``{state key: dtype}`` of every registered projector's fixed-dtype state tensors."""
    result: dict[str, torch.dtype] = {}
    for cls in _PROJECTORS.classes.values():
        result.update(cls.fixed_dtypes)
    return result


def resolve_projector(value: Any, where: str = "") -> Projector:
    """The projector ``value`` names: a registered name, a :class:`Projector`, or the plain form
    :meth:`Projector.to_state` writes (``where`` says which param group, for messages)."""
    return _PROJECTORS.resolve(value, where)


def keeps_aligned(projector: Projector) -> bool:
    """Whether ``projector`` keeps tensors that line up with the matrix (bases a sharded layout splits),
    rather than only replicated ones (DCT indices): alike for every shape."""
    return any(spec.sharding != "replicated" for side in Side for spec in projector.tensors((2, 2), 1, side))


# --- the "rotate" moment policy (projector-independent) ----------------------------------------------


def rotations(old: Subspace, new: Subspace) -> list[Tensor]:
    """The change of coordinates from the old subspace to the new one, per side in use (left first):
    ``C_l = P_l,oldᵀ P_l,new`` (``r x r``) and ``C_r = P_r,old P_r,newᵀ`` (``r x r``), in fp32 (fp64 bases
    stay fp64). A projected gradient ``R`` in old coordinates is ``C_lᵀ R`` / ``R C_r`` in new ones."""
    first = old.left if old.left is not None else old.right
    assert first is not None  # a subspace has a basis on at least one side
    dtype = torch.promote_types(torch.float32, first.dtype)
    result = []
    if old.left is not None:
        assert new.left is not None  # the new subspace has the old one's side
        result.append(old.left.to(dtype).T @ new.left.to(dtype))
    if old.right is not None:
        assert new.right is not None  # the new subspace has the old one's side
        result.append(old.right.to(dtype) @ new.right.to(dtype).T)
    return result


def rotates(moment_policy: str, step: int) -> bool:
    """Whether a refresh at ``step`` (the counter before it) rotates the moments: under ``rotate``, except
    at the first refresh, which replaces placeholders."""
    return moment_policy == "rotate" and step > 0


def refresh_specs(
    projector: Projector, shape: tuple[int, int], rank: int, side: Side, rotate: bool, old_rank: int | None = None
) -> list[ProjectorTensor]:
    """What a refresh shares with every holder of a matrix: the projector's tensors at ``rank``, then
    (``rotate``) the change of coordinates of :func:`rotations` (replicated ``r_old x r`` fp32 matrices,
    left first; ``old_rank`` ``None``: the rank does not change)."""
    specs = projector.tensors(cast("tuple[int, int]", tuple(shape)), rank, side)
    if rotate:
        count = 2 if side is Side.FULL else 1
        before = rank if old_rank is None else old_rank
        specs += [ProjectorTensor(f"rotation_{k}", (before, rank), torch.float32, "replicated") for k in range(count)]
    return specs


def resize_rank(moment: Tensor, side: Side, rank: int) -> Tensor:
    """``moment`` (in projected coordinates: ``m x r`` right, ``r x n`` left, ``r x r`` full) truncated or
    zero-padded along its rank dimension(s) to ``rank``: a new tensor."""
    dims = {Side.RIGHT: [1], Side.LEFT: [0], Side.FULL: [0, 1]}[side]
    shape = list(moment.shape)
    for dim in dims:
        shape[dim] = rank
    result = moment.new_zeros(shape)
    kept = tuple(slice(0, min(moment.shape[dim], rank)) if dim in dims else slice(None) for dim in range(moment.dim()))
    result[kept] = moment[kept]
    return result


def rotate_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, side: Side, rotation: Sequence[Tensor]) -> None:
    """``moment_policy="rotate"``: express the moments kept in the old projected coordinates in the new
    ones, in place (this process's pieces: right-side moment rows, left-side moment columns).

    The first moment is linear in ``R`` and rotates exactly: ``M ← M C_r`` (right), ``C_lᵀ M`` (left),
    ``C_lᵀ M C_r`` (full). The second moment is not: ``V`` holds per-coordinate mean squares, and a new
    coordinate is the combination ``Σ_k c_kj x_k`` of old ones. Taking the old coordinates as
    uncorrelated, its mean square is ``Σ_k c_kj² V_k``, i.e. ``V ← V (C_r∘C_r)`` (and likewise on the
    left): non-negative, exact when the change of basis is a signed permutation (DCT frequencies that
    stay selected, SVD directions that only flip or swap), and the part of ``V`` outside the new
    subspace is dropped as it is for ``M``.
    """
    for moment, value in zip((exp_avg, exp_avg_sq), rotated_moments(exp_avg, exp_avg_sq, side, rotation)):
        if moment.numel() != 0:
            moment.copy_(value)


def rotated_moments(exp_avg: Tensor, exp_avg_sq: Tensor, side: Side, rotation: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The rule of :func:`rotate_moments_`, out of place: ``(M', V')`` in the new coordinates (in the
    rotation's dtype), whose rank may differ from the old one (``rank="auto"``: ``C`` is ``r_old x r_new``)."""
    if side is Side.FULL:
        left, right = rotation
    elif side is Side.LEFT:
        left, right = rotation[0], None
    else:
        left, right = None, rotation[0]
    result = []
    for moment, squared in ((exp_avg, False), (exp_avg_sq, True)):
        value = moment.to(left.dtype if left is not None else cast(Tensor, right).dtype)  # one side is always given
        if left is not None:
            value = (left * left if squared else left).T @ value
        if right is not None:
            value = value @ (right * right if squared else right)
        result.append(value)
    return result[0], result[1]
