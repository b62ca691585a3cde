"""What the low-rank step needs from a backend: the local piece of each matrix and a few collectives.

The per-matrix step of :mod:`lowrank_optim.optim.galore` (refresh, project, moments, update, decay) is
written once. It only ever sees *local blocks*: the rows of each ``m x n`` matrix (and of its gradient)
that this process updates, and the local pieces of the matrix's state tensors. Projections are linear,
so the few places where pieces of one matrix meet are sums, gathers and broadcasts, and an
:class:`Exchange` supplies exactly those, batched over the matrices of one call (one collective per
phase, not one per matrix):

``refresh_gradients``
    at a refresh, the whole gradient of each refreshing matrix on the one process that computes its
    projector (its *owner*), and, alike everywhere, whether that gradient is finite;
``gather_projectors``
    at a refresh that warm-starts or rotates the moments, the whole previous projector on the owner;
``share_projectors``
    the owner's new projector, as the local piece every holder stores;
``subspaces``
    the basis a local block projects with, from the stored local pieces (e.g. an all-gather of a
    basis kept in column chunks);
``flags``
    a "skip this update" decision (a NaN/Inf gradient) shared by the pieces of a matrix;
``lowranks``
    the projected gradient ``R`` as the local moments hold it, from the blocks' partial projections
    (identity for row blocks of a right-side projection, a sum or reduce-scatter for a left-side one);
``block_terms``
    ``N`` (and ``R``, for Fira) as each block's back-projection needs them;
``residual_norms``
    Fira's ``||S||_F`` of matrices split over processes, from partial sums of squares.

An exchange of a layout that declares ``steps_adaptive_ranks`` (``rank="auto"``) is also an
:class:`AdaptiveExchange`, with one more phase:

``spectra``
    at a refresh, each refreshing matrix's energy spectrum, computed by its owner from the whole
    gradient, on every process that steps the group: the ranks are allocated jointly over the
    group's matrices (:mod:`lowrank_optim.optim.ranks`), so every process must see every spectrum to
    choose the same ranks;
``elsewhere``
    the matrices of the same allocation of which this process steps no block (ZeRO hands each rank a
    subset of a group's matrices, but the collectives are sized by every matrix's rank), with their
    shapes, ranks and spectra;
``assign_ranks``
    the ranks chosen, so that the exchange sizes the rest of the refresh and the later steps by them
    (the stored projectors are gathered at the old ranks, everything after at the new ones).

:class:`LocalExchange` is the whole-tensor case: every block is its whole matrix and every collective
is the identity. The distributed layouts (:mod:`lowrank_optim.distributed`) implement the rest; they
never see the optimizer, and the optimizer never imports them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Sequence, cast

import torch
from torch import Tensor

from ..projection import ProjectorTensor, Side, Subspace, all_finite

__all__ = ["AdaptiveExchange", "Elsewhere", "Exchange", "LocalExchange", "LOCAL", "RefreshGradients", "refresh_due"]


def refresh_due(step: int, update_proj_gap: int) -> bool:
    """Whether a matrix whose step counter reads ``step`` (before this step increments it) refreshes its
    projector now: the one schedule rule, read by the optimizer's step and by a layout that must know
    which of a group's partitions refresh before they step (a ZeRO-3 group cut into sub-groups)."""
    return step % update_proj_gap == 0


class Exchange(Protocol):
    """The collectives of one step over a batch of matrices (see the module docstring).

    Every method takes ``indices``: the positions (in the step's lists) of the tensors it concerns, the
    same on every process that holds a piece of them, and returns one entry per index. ``batched``:
    whether the matrices must go through each phase together (their collectives are bucketed); where
    not, the step takes them one at a time and holds one matrix's temporaries at a time.
    """

    batched: bool

    def whole(self, index: int) -> bool:
        """Whether matrix ``index``'s block is the whole matrix held by this process alone."""
        ...

    def shape(self, index: int, block: Tensor) -> tuple[int, int]:
        """The whole matrix's shape (``block`` is its local gradient block)."""
        ...

    def finish(self) -> None:
        """Called once at the end of a step that updated something: write back the blocks that were
        copies of their tensors' elements."""
        ...

    def flags(self, indices: Sequence[int], flags: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor's "skip this update" flag (0-dim bool) from its pieces' flags (a logical or over the
        holders, so that every piece of a matrix is skipped alike), on the device."""
        ...

    def refresh_gradients(self, indices: Sequence[int], grads: Sequence[Tensor]) -> tuple[list[Tensor | None], list[bool]]:
        """``(whole gradient on the owner, else None; finite, alike on every holder)`` per matrix."""
        ...

    def gather_projectors(
        self, indices: Sequence[int], specs: Sequence[list[ProjectorTensor]], stored: Sequence[Sequence[Tensor]]
    ) -> list[list[Tensor] | None]:
        """The whole projector tensors (whole shapes in ``specs``) of each matrix on its refresh owner, from
        the holders' stored pieces; ``None`` elsewhere."""
        ...

    def share_projectors(
        self,
        indices: Sequence[int],
        specs: Sequence[list[ProjectorTensor]],
        new: Sequence[list[Tensor] | None],
        finite: Sequence[bool],
    ) -> list[list[Tensor] | None]:
        """The owners' new tensors (``new``: whole tensors on the owner, ``None`` elsewhere; their whole
        shapes, dtypes and shardings in ``specs``) as the local pieces each holder stores: the share of a
        tensor kept sharded, all of a replicated one (``None`` where ``finite`` is false: keep the
        previous ones)."""
        ...

    def subspaces(
        self, indices: Sequence[int], specs: Sequence[list[ProjectorTensor]], stored: Sequence[Subspace]
    ) -> list[Subspace]:
        """The subspace each local block projects with, from the subspaces of the stored local pieces: a
        basis the projector keeps sharded (``specs``) arrives as this process's piece, a replicated one
        (e.g. built from DCT indices) whole."""
        ...

    def lowranks(self, indices: Sequence[int], sides: Sequence[Side], partials: Sequence[Tensor]) -> list[Tensor]:
        """``R`` as the local moments of each matrix hold it, from the blocks' partial projections."""
        ...

    def block_terms(
        self, indices: Sequence[int], sides: Sequence[Side], normalized: Sequence[Tensor], lowranks: Sequence[Tensor] | None
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """``N`` (and ``R`` when ``lowranks`` is given) as each block's back-projection reads them."""
        ...

    def residual_norms(self, indices: Sequence[int], residuals: Sequence[Tensor]) -> list[Tensor]:
        """``||S||_F`` of each (split) matrix from the blocks' residuals (0-dim, fp32 or wider)."""
        ...

    def lowrank_norms(self, indices: Sequence[int], tensors: Sequence[Tensor]) -> list[Tensor]:
        """The Frobenius norm of each matrix's low-rank tensor (``R``, ``N``) from the pieces the blocks
        hold as the moments are held (0-dim, fp32 or wider): each element counted once, however the
        layout shares or replicates them."""
        ...


class Elsewhere(NamedTuple):
    """A matrix of a ``rank="auto"`` allocation of which this process steps no block: its whole shape,
    the dtype its state is costed in, the rank it holds, and its spectrum (``None``: it does not refresh
    now, e.g. its gradient is not finite, and keeps ``rank``)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    rank: int
    spectrum: Tensor | None
    position: int  # where it stands in the allocation's order (AdaptiveExchange.position)


class AdaptiveExchange(Exchange, Protocol):
    """An :class:`Exchange` that can also share the spectra a ``rank="auto"`` refresh allocates from."""

    def spectra(self, indices: Sequence[int], energies: Sequence[Tensor | None], sizes: Sequence[int]) -> list[Tensor]:
        """Each matrix's spectrum (``sizes[k]`` fp64 values, given by its refresh owner: ``None`` on the
        other processes, and on the owner too where the gradient is not finite, which reads as zeros) on
        every process, the same values everywhere."""
        ...

    def position(self, index: int) -> int:
        """Where block ``index``'s matrix stands in the allocation's order, the same on every process: the
        greedy breaks ties by this order, so processes that list their blocks differently still choose alike."""
        ...

    def elsewhere(self) -> list[Elsewhere]:
        """After :meth:`spectra`: the matrices of this allocation of which this process steps no block, in
        the same order on every process (empty where every process steps a block of every matrix)."""
        ...

    def assign_ranks(self, indices: Sequence[int], ranks: Sequence[int], elsewhere: Sequence[int | None]) -> None:
        """The ranks chosen: ``ranks[k]`` for the block ``indices[k]``, ``elsewhere[j]`` for the ``j``-th
        matrix of :meth:`elsewhere` (``None``: it keeps its rank). Called before the refresh shares the new
        projectors, alike on every process."""
        ...


#: ``(whole gradient on the owner, else None; finite)`` per matrix: what ``refresh_gradients`` returns.
RefreshResult = tuple[list[Tensor | None], list[bool]]


class RefreshGradients:
    """``refresh_gradients`` computed once per step for the same matrices and gradients: a ``rank="auto"``
    refresh asks for the whole gradients twice (for the spectra, then for the projectors), and a layout
    that gathers them (FSDP2, ZeRO) should gather once. ``compute`` is the layout's collective."""

    def __init__(self, compute: Callable[[Sequence[int], Sequence[Tensor]], RefreshResult]) -> None:
        self.compute = compute
        self.last: tuple[tuple[int, ...], tuple[int, ...], RefreshResult] | None = None

    def __call__(self, indices: Sequence[int], grads: Sequence[Tensor]) -> RefreshResult:
        key = (tuple(indices), tuple(id(grad) for grad in grads))
        if self.last is None or self.last[:2] != key:
            self.last = (*key, self.compute(indices, grads))
        wholes, finite = self.last[2]
        return list(wholes), list(finite)


class LocalExchange:
    """Whole tensors in one process: every block is its matrix, every collective the identity."""

    batched = False

    def whole(self, index: int) -> bool:
        return True

    def shape(self, index: int, block: Tensor) -> tuple[int, int]:
        return cast("tuple[int, int]", tuple(block.shape))  # asked of matrices only

    def finish(self) -> None:
        pass

    def flags(self, indices: Sequence[int], flags: Sequence[Tensor]) -> list[Tensor]:
        return list(flags)

    def refresh_gradients(self, indices: Sequence[int], grads: Sequence[Tensor]) -> tuple[list[Tensor | None], list[bool]]:
        return list(grads), [all_finite(grad) for grad in grads]

    def gather_projectors(
        self, indices: Sequence[int], specs: Sequence[list[ProjectorTensor]], stored: Sequence[Sequence[Tensor]]
    ) -> list[list[Tensor] | None]:
        return [list(tensors) for tensors in stored]

    def share_projectors(
        self,
        indices: Sequence[int],
        specs: Sequence[list[ProjectorTensor]],
        new: Sequence[list[Tensor] | None],
        finite: Sequence[bool],
    ) -> list[list[Tensor] | None]:
        return [tensors if ok else None for tensors, ok in zip(new, finite)]

    def subspaces(
        self, indices: Sequence[int], specs: Sequence[list[ProjectorTensor]], stored: Sequence[Subspace]
    ) -> list[Subspace]:
        return list(stored)

    def lowranks(self, indices: Sequence[int], sides: Sequence[Side], partials: Sequence[Tensor]) -> list[Tensor]:
        return list(partials)

    def block_terms(
        self, indices: Sequence[int], sides: Sequence[Side], normalized: Sequence[Tensor], lowranks: Sequence[Tensor] | None
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        return list(normalized), None if lowranks is None else list(lowranks)

    def residual_norms(self, indices: Sequence[int], residuals: Sequence[Tensor]) -> list[Tensor]:
        return [torch.linalg.vector_norm(r, dtype=torch.promote_types(r.dtype, torch.float32)) for r in residuals]

    def lowrank_norms(self, indices: Sequence[int], tensors: Sequence[Tensor]) -> list[Tensor]:
        return self.residual_norms(indices, tensors)

    def spectra(self, indices: Sequence[int], energies: Sequence[Tensor | None], sizes: Sequence[int]) -> list[Tensor]:
        return [torch.zeros(size, dtype=torch.float64) if values is None else values for values, size in zip(energies, sizes)]

    def position(self, index: int) -> int:
        return index

    def elsewhere(self) -> list[Elsewhere]:
        return []

    def assign_ranks(self, indices: Sequence[int], ranks: Sequence[int], elsewhere: Sequence[int | None]) -> None:
        pass  # the stored tensors' shapes say each matrix's rank


#: The exchange of the whole-tensor case (stateless, shared).
LOCAL = LocalExchange()
