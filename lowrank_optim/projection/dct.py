"""SVD-free projection onto selected DCT-II basis vectors (Modoranu et al., 2025, arXiv 2505.17967).

Instead of an SVD, a fixed orthonormal basis is used: the DCT-II matrix ``Q`` of the projected dimension
``d`` (``Q[k, j] = sqrt(2/d) · cos(π k (2j + 1) / (2d))``, row 0 times ``sqrt(1/2)``; row ``k`` is
frequency ``k``, so ``Q x`` is ``scipy.fft.dct(x, type=2, norm="ortho")``). At a refresh each frequency is
scored by how much of the gradient it carries, the L1 norm of its coefficients::

    right side (basis r x n):  scores_k = Σ_i |(G Qᵀ)[i, k]|    (row-wise DCT-II of G)
    left side  (basis m x r):  scores_k = Σ_j |(Q G)[k, j]|     (column-wise DCT-II of G)

and the ``r`` best frequencies are kept, in ascending order. The projection then uses the rows
``Q[idx]``: right basis ``P = Q[idx]`` (``R = G Pᵀ``), left basis ``P = Q[idx]ᵀ`` (``R = Pᵀ G``). Only the
indices are optimizer state; ``Q`` is rebuilt deterministically and cached per (size, dtype, device).

The scores can come from an explicit matmul with ``Q`` (``O(m d²)``) or from an FFT (Makhoul, 1980:
``O(m d log d)``, never forming ``Q``); ``"auto"`` picks by ``d``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, ClassVar, NamedTuple, Sequence, cast

import torch
from torch import Tensor

from ..state_keys import DCT_INDICES_LEFT, DCT_INDICES_RIGHT
from .projector import Projector, ProjectorTensor, register_projector, without_rounding_noise
from .subspace import Side, Subspace, all_finite, basis_shapes

__all__ = [
    "DCT_BASES",
    "DCT_SCORING",
    "DCTProjector",
    "basis_matrix",
    "DCTSelection",
    "FFT_SCORING_MIN_SIZE",
    "carried_moment",
    "carry_moment_",
    "dct_ii",
    "dct_matrix",
    "dct_scores",
    "dct_subspace",
    "refresh_dct_selection_",
    "resolve_scoring",
    "scoring_input",
    "select_dct_indices",
]

#: How scores are computed: ``matmul`` with ``Q``, ``fft`` (Makhoul), or ``auto`` (by size).
DCT_SCORING: tuple[str, ...] = ("auto", "matmul", "fft")

#: Which orthonormal DCT's rows are the basis vectors: ``ii`` (the DCT-II: frequencies, the paper's and
#: our default) or ``iii`` (the DCT-III, i.e. the columns of the DCT-II matrix: the basis of
#: ``ista-daslab-optimizers``' ``DCTAdamW`` in its default ``sim_type="matmul"`` mode).
DCT_BASES: tuple[str, ...] = ("ii", "iii")

#: ``auto`` uses the FFT from this transform size on. Measured on the 2-core build machine (fp32, ``2d x d``
#: gradients, best of 15, one thread since the other core was busy): the matmul is 2-5x faster up to
#: d = 128, the two tie at d = 256, the FFT is 1.7x faster at 384, 2.5x at 512, 4x at 1024, 8x at 2048.
FFT_SCORING_MIN_SIZE = 384

# Elements per block of rows the FFT scoring transforms at once (1 MiB of fp32): measured fastest
# among 2^16..2^22 at d = 1024-4096 on the build machine.
_FFT_BLOCK_ELEMENTS = 2**18


class DCTSelection(NamedTuple):
    """One parameter's DCT projection as optimizer state holds it: the side and sorted int64 indices.

    ``left`` indexes frequencies of the ``m``-point DCT (present for LEFT and FULL), ``right`` those of
    the ``n``-point DCT (present for RIGHT and FULL). The tensors are refreshed in place.
    """

    side: Side
    left: Tensor | None
    right: Tensor | None


@functools.lru_cache(maxsize=64)
def dct_matrix(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The orthonormal ``size x size`` DCT-II matrix (rows are frequencies), cached per argument triple.

    Built in fp64 on the CPU from the closed form, then cast, so every process and device gets the same
    values (the reference builds it in fp32, which is only 1e-6-accurate). Shared by every caller:
    treat it as read-only.
    """
    if size == 0:  # a zero-size matrix's (empty) basis
        return torch.zeros(0, 0, device=device, dtype=dtype)
    k = torch.arange(size, dtype=torch.float64)[:, None]
    j = torch.arange(size, dtype=torch.float64)[None, :]
    q = torch.cos(math.pi * k * (2 * j + 1) / (2 * size)) * math.sqrt(2.0 / size)
    q[0] *= math.sqrt(0.5)
    return q.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _makhoul_tables(size: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Input permutation and the twiddles ``s_k cos(πk/2N)``, ``s_k sin(πk/2N)`` for ``k <= N/2``."""
    perm = torch.cat([torch.arange(0, size, 2), torch.arange(1, size, 2).flip(0)])
    k = torch.arange(size // 2 + 1, dtype=torch.float64)
    theta = math.pi * k / (2 * size)
    scaling = torch.full_like(k, math.sqrt(2.0 / size))
    scaling[0] = math.sqrt(1.0 / size)
    cos, sin = (scaling * torch.cos(theta)).to(device, dtype), (scaling * torch.sin(theta)).to(device, dtype)
    return perm.to(device), cos, sin


def _dct_ii_halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(X[..., :N//2 + 1], X[..., N-1 : N//2 : -1])``: the two halves :func:`dct_ii` assembles.

    With ``v = (x_0, x_2, x_4, …, x_5, x_3, x_1)`` and ``V = FFT(v)``, ``X_k = s_k Re(V_k e^{-iπk/2N})``
    (``s_0 = 1/sqrt(N)``, else ``sqrt(2/N)``). ``v`` is real, so ``rfft`` gives ``V_j`` for ``j <= N/2``
    only; with ``Z_j = V_j e^{-iπj/2N}`` the upper half follows from ``V_{N-j} = conj(V_j)`` as
    ``X_{N-j} = -s_j Im(Z_j)``, returned for ``j = 1, 2, …`` (i.e. in descending ``k``).
    """
    size = x.shape[-1]
    perm, cos, sin = _makhoul_tables(size, x.dtype, x.device)
    spectrum = torch.view_as_real(torch.fft.rfft(x.index_select(-1, perm), dim=-1))
    real, imag = spectrum[..., 0], spectrum[..., 1]
    top = (size + 1) // 2  # j = 1 .. top-1 give the frequencies above N/2
    lower = torch.addcmul(real * cos, imag, sin)
    upper = torch.addcmul(real[..., 1:top] * sin[1:top], imag[..., 1:top], cos[1:top], value=-1)
    return lower, upper


def dct_ii(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along the last dimension by one real FFT (Makhoul's algorithm), ``O(N log N)``.

    Equals ``x @ dct_matrix(N).T`` (``scipy.fft.dct(x, type=2, norm="ortho")``) without building that
    matrix.
    """
    lower, upper = _dct_ii_halves(x)
    return torch.cat([lower, upper.flip(-1)], dim=-1)


def scoring_input(grad: Tensor) -> Tensor:
    # bf16/fp16 have no FFT on CPU and score too coarsely; score in fp32 (fp64 stays fp64).
    return grad if grad.dtype == torch.float64 else grad.float()


def dct_scores(grad: Tensor, side: Side, scoring: str = "auto") -> Tensor:
    """L1 norm of each frequency's coefficients of ``grad`` on ``side`` (``LEFT`` or ``RIGHT``).

    Right: the columns of ``G Qᵀ`` (``n`` scores); left: the rows of ``Q G`` (``m`` scores). Both are
    ``X Qᵀ`` column sums with ``X = G`` or ``Gᵀ``, i.e. DCT-IIs of the rows of ``X``.
    """
    x = scoring_input(grad)
    x = x if side is Side.RIGHT else x.T
    size = x.shape[1]
    if resolve_scoring(scoring, size) == "fft":
        # Blocks of rows keep the FFT's temporaries in cache (2-3x faster at d >= 2048 than one pass) and
        # bound their memory; each half is scored where it is computed, never copied into order.
        rows = max(1, _FFT_BLOCK_ELEMENTS // size)
        lower_scores: Tensor | None = None
        upper_scores: Tensor | None = None
        for start in range(0, x.shape[0], rows):
            lower, upper = _dct_ii_halves(x[start : start + rows])
            lower, upper = lower.abs_().sum(dim=0), upper.abs_().sum(dim=0)
            if lower_scores is None or upper_scores is None:  # both or neither: set together
                lower_scores, upper_scores = lower, upper
            else:
                lower_scores += lower
                upper_scores += upper
        # Set by the loop's first block (x has rows).
        return torch.cat([cast(Tensor, lower_scores), cast(Tensor, upper_scores).flip(0)])
    return (x @ dct_matrix(size, x.dtype, x.device).T).abs_().sum(dim=0)


def resolve_scoring(scoring: str, size: int) -> str:
    """``"matmul"`` or ``"fft"``: how a ``size``-point transform is scored (``"auto"`` picks by size)."""
    if scoring == "auto":
        return "fft" if size >= FFT_SCORING_MIN_SIZE else "matmul"
    if scoring in DCT_SCORING:
        return scoring
    raise ValueError(f"Invalid scoring: {scoring!r}. Must be one of {', '.join(DCT_SCORING)}.")


def select_dct_indices(grad: Tensor, rank: int, side: Side, scoring: str = "auto") -> Tensor:
    """The ``rank`` highest-scoring frequencies on ``side``, sorted ascending (a canonical order).

    Sorting makes the index *set* the state: a set that did not change maps every moment column to the
    same basis vector, whatever order ``topk`` returns (which is unspecified on CUDA).
    """
    return top_indices(dct_scores(grad, side, scoring), rank)


def top_indices(scores: Tensor, rank: int) -> Tensor:
    """The indices of the ``rank`` highest ``scores``, sorted ascending (int64): the selection rule of
    every scoring path (and of the ``dct_topk`` op's default kernel)."""
    return torch.topk(scores, rank, sorted=False).indices.sort().values


def dct_subspace(
    selection: DCTSelection,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    basis: str = "ii",
) -> Subspace:
    """The :class:`Subspace` of a selection for an ``m x n`` matrix, gathered from the cached DCT matrices
    (``basis``: :data:`DCT_BASES`).

    This allocates the ``r x d`` rows (``r``-sized, like the SVD bases GaLore stores) on every call:
    the price of keeping only ``r`` integers per matrix in the optimizer state.
    """
    side, left, right = selection
    m, n = shape
    left_basis = None if left is None else basis_matrix(m, dtype, device, basis).index_select(0, left).T
    right_basis = None if right is None else basis_matrix(n, dtype, device, basis).index_select(0, right)
    return Subspace(side, left_basis, right_basis)


def basis_matrix(size: int, dtype: torch.dtype, device: torch.device, basis: str = "ii") -> Tensor:
    """The ``size x size`` orthonormal matrix whose rows are the basis vectors: the DCT-II matrix
    (``"ii"``, row ``k`` = frequency ``k``) or its transpose, the DCT-III matrix (``"iii"``)."""
    q = dct_matrix(size, dtype, device)
    return q if basis == "ii" else q.T


def carry_moment_(moment: Tensor, old: Tensor, new: Tensor, dim: int) -> Tensor:
    """Move the slices of ``moment`` along ``dim`` from sorted indices ``old`` to sorted indices ``new``, in
    place (:func:`carried_moment` with as many indices before as after). Device-side only (no host sync).
    """
    return moment.copy_(carried_moment(moment, old, new, dim))


def carried_moment(moment: Tensor, old: Tensor, new: Tensor, dim: int) -> Tensor:
    """A new tensor whose slice ``j`` along ``dim`` is the slice of ``moment`` that belonged to frequency
    ``new[j]`` if that frequency was among the sorted ``old`` ones, else zero: a frequency that stays
    selected keeps its statistics at its new position. ``old`` and ``new`` may differ in length
    (``rank="auto"``).
    """
    shape = [1] * moment.dim()
    shape[dim] = -1
    if old.numel() == 0:
        sizes = list(moment.shape)
        sizes[dim] = new.numel()
        return moment.new_zeros(sizes)
    position = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
    kept = old[position] == new
    moved = moment.index_select(dim, position)
    return torch.where(kept.view(shape), moved, 0)


def refresh_dct_selection_(
    grad: Tensor,
    selection: DCTSelection,
    scoring: str = "auto",
    moments: tuple[Tensor, ...] = (),
    select: Callable[[Tensor, int, Side, str], Tensor] = select_dct_indices,
) -> bool:
    """Re-select ``selection``'s indices in place from ``grad``; return whether they were replaced.

    ``moments`` (kept in the projected coordinates) follow their frequencies (:func:`carry_moment_`).
    A gradient with NaN/Inf keeps the previous indices and returns ``False``, as for the SVD basis.
    ``select`` computes the new indices (the optimizers pass a compiled-kernel variant of the default).
    """
    if not all_finite(grad):
        return False
    side, left, right = selection
    for indices, one_side, dim in ((left, Side.LEFT, 0), (right, Side.RIGHT, -1)):
        if indices is None:
            continue
        new = select(grad, indices.numel(), one_side, scoring)
        for moment in moments:
            carry_moment_(moment, indices, new, dim)
        indices.copy_(new)
    return True


@register_projector
@dataclasses.dataclass(frozen=True)
class DCTProjector(Projector):
    """SVD-free projection onto the ``rank`` DCT-II frequencies carrying most of the gradient (arXiv
    2505.17967, see the module docstring). The state holds ``rank`` sorted int64 frequencies per side
    (``dct_indices_left`` / ``dct_indices_right``, every holder keeps all of them), never a basis; ``full``
    selects each side's frequencies independently. Under ``moment_policy="keep"`` a frequency that stays
    selected keeps its moments at its new position and new ones start at zero (:func:`carry_moment_`).

    Args:
        scoring: how a refresh scores frequencies: ``matmul`` with the DCT matrix, ``fft`` (Makhoul), or
            ``auto`` (FFT from :data:`FFT_SCORING_MIN_SIZE` on). Same selection.
        basis: ``ii`` (default: DCT-II frequencies) or ``iii``: the DCT-III basis (the columns of the DCT-II
            matrix, scored by the L1 norms of ``G Q`` columns on the right, ``Qᵀ G`` rows on the left), which
            ``ista-daslab-optimizers``' ``DCTAdamW`` uses in its default ``sim_type="matmul"`` mode, for
            runs migrating from it (its FFT mode uses DCT-II, as ``ii`` does). ``iii`` scores by matmul only
            (``scoring="fft"`` is refused; ``auto`` means matmul).
    """

    name: ClassVar[str] = "dct"
    fixed_dtypes: ClassVar[dict[str, torch.dtype]] = {DCT_INDICES_LEFT: torch.int64, DCT_INDICES_RIGHT: torch.int64}
    scoring: str = "auto"
    basis: str = "ii"

    def __post_init__(self) -> None:
        if self.scoring not in DCT_SCORING:
            raise ValueError(f"Invalid scoring: {self.scoring!r}. Must be one of {', '.join(DCT_SCORING)}.")
        if self.basis not in DCT_BASES:
            raise ValueError(f"Invalid basis: {self.basis!r}. Must be one of {', '.join(DCT_BASES)}.")
        if self.basis == "iii" and self.scoring == "fft":
            raise ValueError(
                "Invalid scoring: 'fft'. The 'iii' basis (DCT-III) is scored by matmul only: use scoring='matmul' "
                "or 'auto'."
            )

    def tensors(self, shape: tuple[int, int], rank: int, side: Side) -> list[ProjectorTensor]:
        left, right = basis_shapes(shape, rank, side)
        keys = [key for key, used in ((DCT_INDICES_LEFT, left), (DCT_INDICES_RIGHT, right)) if used is not None]
        return [ProjectorTensor(key, (rank,), torch.int64, "replicated") for key in keys]

    def initial(self, spec: ProjectorTensor, device: torch.device, ordinal: int | None = None) -> Tensor:
        # Placeholders until the first refresh (always at the first step) selects frequencies.
        return torch.arange(spec.shape[0], device=device)

    def refresh(
        self, grad: Tensor, rank: int, side: Side, previous: Sequence[Tensor] | None, *, fused: bool, first: bool
    ) -> list[Tensor]:
        sides = [Side.LEFT, Side.RIGHT] if side is Side.FULL else [side]
        return [self.select(grad, rank, one_side, fused) for one_side in sides]

    def select(self, grad: Tensor, rank: int, side: Side, fused: bool) -> Tensor:
        """The ``rank`` frequencies of ``grad`` on ``side`` (:func:`select_dct_indices`). Matmul scoring ends
        in the ``dct_topk`` op (L1 scores and the sorted top-``rank`` in one pass where a kernel is
        compiled); FFT scoring sums the scores of row blocks as it transforms them, which a top-``rank`` op
        cannot, and stays here."""
        from ..ops import dct_topk  # the ops import this module for their default kernel

        size = grad.shape[1 if side is Side.RIGHT else 0]
        if self.basis == "ii" and resolve_scoring(self.scoring, size) != "matmul":
            return select_dct_indices(grad, rank, side, self.scoring)
        x = scoring_input(grad)
        q = basis_matrix(size, x.dtype, x.device, self.basis)
        # Right: columns of G Qᵀ; left: rows of Q G (no transposed copy of G).
        if side is Side.RIGHT:
            return dct_topk(x @ q.T, rank, dim=0, fused=fused)
        return dct_topk(q @ x, rank, dim=1, fused=fused)

    def subspace(
        self,
        stored: Sequence[Tensor],
        side: Side,
        shape: tuple[int, int],
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Subspace:
        left = stored[0] if side in (Side.LEFT, Side.FULL) else None
        right = stored[-1] if side in (Side.RIGHT, Side.FULL) else None
        return dct_subspace(DCTSelection(side, left, right), shape, dtype, device, self.basis)

    def follow_(self, moments: Sequence[Tensor], old: Sequence[Tensor], new: Sequence[Tensor], side: Side) -> None:
        for moment, value in zip(moments, self.carry(moments, old, new, side, 0)):
            moment.copy_(value)

    def carry(
        self, moments: Sequence[Tensor], old: Sequence[Tensor], new: Sequence[Tensor], side: Side, rank: int
    ) -> list[Tensor]:
        # The frequencies say where each moment slice goes, whatever the two ranks (``rank`` is len(new)).
        dims = {Side.LEFT: [0], Side.RIGHT: [-1], Side.FULL: [0, -1]}[side]
        result = []
        for moment in moments:
            for dim, before, after in zip(dims, old, new):
                moment = carried_moment(moment, before, after, dim)
            result.append(moment)
        return result

    def energies(self, grad: Tensor, side: Side) -> Tensor:
        """The squared L2 norm of each frequency's coefficients, in decreasing order: the gradient energy
        each further frequency captures (they sum to ``||G||_F²``). The selection ranks frequencies by
        their L1 norms (the paper's score), so the ``k`` selected ones capture about, not exactly, the top
        ``k`` of these. Values at fp32 rounding level are reported as 0 (:func:`without_rounding_noise`).
        A ``full`` projection is allocated by its singular values (the base rule)."""
        if side is Side.FULL:
            return super().energies(grad, side)
        x = scoring_input(grad)
        x = x if side is Side.RIGHT else x.T
        q = basis_matrix(x.shape[1], x.dtype, x.device, self.basis)
        energies = (x @ q.T).square_().sum(dim=0).float().sort(descending=True).values
        return without_rounding_noise(energies, x.shape[1])
