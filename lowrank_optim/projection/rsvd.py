"""A randomized, warm-startable replacement for GaLore's full SVD refresh.

GaLore's refresh (:func:`lowrank_optim.projection.svd.svd_basis`) computes a full thin SVD of the
``m x n`` gradient ``G`` and keeps ``r`` singular vectors. Only the top-``r`` subspace is used, so a
randomized range finder with subspace iteration gets the same subspace for a fraction of the work
(Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM Review 53(2):217-288, 2011,
arXiv:0909.4061; "HMT" below).

The algorithm
-------------
Write ``A`` for ``G`` or ``Gᵀ`` (a view, never a copy; see "which side" below), ``m' x n'``, and let
``k = r + p`` with ``p`` the oversampling, capped at ``min(m, n)``. With a start block ``X`` (``n' x k``)
this is HMT's Algorithm 4.4 (randomized subspace iteration), followed by their Algorithm 5.1 (direct SVD)::

    Q = qr(A X)                                  # m' x k
    repeat q times:                              # q = ``iterations``
        Z = qr(Aᵀ Q)                             # n' x k
        Q = qr(A Z)                              # m' x k
    Bᵀ = Aᵀ Q                                    # n' x k, i.e. B = Qᵀ A
    Bᵀ = W Σ Ũᵀ                                  # small thin SVD
    left basis (m' side) = Q Ũ[:, :r],  right basis (n' side) = W[:, :r]

In exact arithmetic ``range(Q) = range((A Aᵀ)^q A X)``: the QR between products changes nothing but
keeps the columns from collapsing onto the top singular vector in floating point (HMT §4.5). The final
SVD of the small ``B`` orders the directions by singular value, as ``svd_basis`` does, and picks the
best rank-``r`` part of the rank-``k`` sketch.

*Cold start*: ``X`` is standard Gaussian. *Warm start*: ``X = [P_prev, Ω]``, the ``r`` directions of the
previous refresh's basis plus ``p`` Gaussian columns. GaLore's gradients change slowly between refreshes
(the subspace drifts), so the previous basis is already close to the new top subspace and one or two
iterations polish it; the Gaussian columns give the sketch room for directions that entered the top
``r`` since the last refresh.

Which side
----------
``A`` is chosen so that ``X`` lives on the side of the basis being warm-started (the previous basis
is the start block, unchanged), and for a cold start on the larger dimension: then ``q + 1`` of the
``2q + 1`` QR factorizations are of ``min(m, n) x k`` matrices. Products with ``Aᵀ`` are done as
``Aᵀ @ Q`` on the transposed view (BLAS's transpose flag), never by materializing ``Gᵀ``, and neither the
``m x m`` nor the ``n x n`` Gram matrix is formed: ``Aᵀ A`` is applied implicitly as ``A`` then ``Aᵀ``.
``B = Qᵀ A`` is computed as ``(Aᵀ Q)ᵀ``, which is the faster GEMM shape on the CPUs measured. Memory
beyond ``G`` itself: a few ``max(m, n) x k`` blocks (plus an fp32 copy of ``G`` for a bf16/fp16 input,
which ``svd_basis`` makes too).

Cost
----
Each product with ``A`` or ``Aᵀ`` is ``2 m n k`` FLOPs and there are ``2q + 2`` of them; the ``2q + 1``
Householder QRs (``geqrf`` + ``orgqr``) cost about ``4 d k²`` each for a ``d x k`` block and the final
SVD of the ``n' x k`` block ``O(n' k²)``. In total about ``(2q + 2)·2mnk + 4(2q + 1)·max(m, n)·k²``
FLOPs. At 5461 x 2048, ``r = 512``, ``p = 16`` (``k = 528``): about 62 GFLOP for the warm default ``q = 1`` and 154 GFLOP
for the cold default ``q = 4``.
That is less of a saving than the SVD's textbook count (``6mn² + 20n³`` for the R-SVD, Golub & Van
Loan) suggests: LAPACK's ``gesdd`` behind ``torch.linalg.svd`` reduces to ``n x n`` by a QR first and uses
divide and conquer, and on the 2-core CPU measured it runs that shape in about 2 s, near GEMM speed. The
measured speedups (bench/bench_refresh_rsvd.py, bench/results/cpu-refresh-rsvd-*.txt) are therefore
modest: about 5x for a warm start with ``q = 1``, about 2x for a cold start with ``q = 4``.

Accuracy
--------
For a *Gaussian* start block (cold start), target rank ``r >= 2`` and oversampling ``p >= 2``, HMT's
Corollary 10.10 (§10.4, the power scheme) bounds the expected spectral-norm error of the rank-``k``
approximation ``Q Qᵀ G`` after ``q`` iterations, in exact arithmetic::

    E ‖G − Q Qᵀ G‖₂ <= [ (1 + sqrt(r / (p − 1))) σ_{r+1}^{2q+1}
                         + (e sqrt(r + p) / p) · (Σ_{j>r} σ_j^{2(2q+1)})^{1/2} ]^{1/(2q+1)}

so the excess over the optimum ``σ_{r+1}`` shrinks like a ``2q + 1``-th root of a constant. Two honest
caveats: (i) it bounds the spectral norm of the rank-``k`` approximation, not the Frobenius energy of the
rank-``r`` basis we return; truncating to rank ``r`` can add up to ``σ_{r+1}`` more (HMT §9.3), and the
energy we benchmark (``captured_energy`` / ``optimal_energy``) is a different quantity; (ii) it needs a
Gaussian start block. With a warm start the bound still holds for the ``p`` Gaussian columns alone
(``range(Q)`` contains the range they would give, so target rank ``p − 2`` at oversampling 2), which is
weak; no bound covers how good the previous basis is; that it helps is an empirical claim, which
``bench/bench_refresh_rsvd.py`` measures. When the spectrum decays slowly (the first term dominates
and stays near 1 until ``q`` is large) the bound is not enough to promise 99.5 % of the optimal energy;
the code does not detect this itself: ``iterations`` (the first knob: error exponent ``1/(2q+1)``) and
``oversample`` are the user's knobs, and raising ``iterations`` converges to the exact subspace at a
linear rate ``(σ_{k+1}/σ_r)^{2}`` per iteration (classical subspace-iteration theory) whatever the start.

Floating point: everything is fp32 (like ``svd_basis``), whatever the input dtype. Householder QR is
backward stable, so ill-conditioned sketches (``(σ_1/σ_k)^{2q+1}`` far beyond 1/eps) lose only the
bottom directions, which the top-``r`` truncation discards. The small SVD is retried in fp64 if the fp32
one fails to converge. Non-finite gradients are the caller's business (``all_finite``), as for
``svd_basis``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from .projector import register_projector
from .subspace import Side
from .svd import SVDProjector, basis_subspace

__all__ = [
    "RandomizedSVDProjector",
    "DEFAULT_OVERSAMPLE",
    "COLD_ITERATIONS",
    "WARM_ITERATIONS",
    "captured_energy",
    "optimal_energy",
    "randomized_basis",
]

#: Extra random directions beyond the rank. At 5461 x 2048, r = 512 (bench/bench_refresh_rsvd.py --sweep),
#: p = 32 instead of 16 gains under 1e-3 of the energy ratio for about 10 % more time.
DEFAULT_OVERSAMPLE: int = 16
#: Subspace iterations from a Gaussian start block (no previous basis): the fewest that reach 99.5 % of
#: the optimal rank-r energy on both synthetic spectra (k^-0.5: 0.9936 at q = 3, 0.9962 at q = 4).
COLD_ITERATIONS: int = 4
#: Subspace iterations when started from the previous refresh's basis: q = 1 reaches 99.7-99.8 % of the
#: optimal energy on the synthetic warm starts (q = 0: 99.4 % at k^-1, not enough).
WARM_ITERATIONS: int = 1


def _check_arguments(grad: Tensor, rank: int, oversample: int, iterations: int) -> None:
    if grad.dim() != 2:
        raise ValueError(f"Invalid grad: {grad.dim()}-D. Must be a matrix (2-D).")
    _check_count("rank", rank, 1)
    _check_count("oversample", oversample, 0)
    _check_count("iterations", iterations, 0)


def _check_count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"Invalid {name}: {value!r}. Must be an int >= {least}.")


def _previous_block(
    previous: tuple[Tensor | None, Tensor | None], grad: Tensor, side: Side
) -> tuple[Tensor, bool]:
    """The previous basis as columns (``d x r_prev``) and whether it lives on ``G``'s row side (``n``).

    For a FULL previous pair the basis on the larger dimension is used: that is the side a cold start
    would start from, and either one spans (approximately) the same singular subspace of the old
    gradient.
    """
    m, n = grad.shape
    left, right = previous
    if side is Side.LEFT:
        right = None
    elif side is Side.RIGHT:
        left = None
    elif left is not None and right is not None:
        if n >= m:
            left = None
        else:
            right = None
    if right is not None:
        if right.dim() != 2 or right.shape[1] != n:
            raise ValueError(f"Invalid previous right basis: shape {tuple(right.shape)}. Must be (r, {n}).")
        return right.T, True
    if left is not None:
        if left.dim() != 2 or left.shape[0] != m:
            raise ValueError(f"Invalid previous left basis: shape {tuple(left.shape)}. Must be ({m}, r).")
        return left, False
    raise ValueError(f"Invalid previous: no basis for side {side.value!r}.")


def _gaussian(rows: int, cols: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's own device (a CPU generator cannot fill a CUDA tensor) and moved, so a
    # seeded CPU generator gives the same start block on every device.
    device = generator.device if generator is not None else like.device
    block = torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float32)
    return block.to(like.device)


#: Cholesky-QR is used for an intermediate block only while its Gram matrix's Cholesky factor has
#: diagonal entries within this ratio (cond(block) below about 1e3 in fp32, where the Gram matrix's
#: squared condition number stays well inside fp32's range): beyond, Householder QR.
_CHOLESKY_QR_MAX_RATIO = 1e3


def _range_basis(block: Tensor) -> Tensor:
    """A well-conditioned basis of ``range(block)`` (``d x k``): Cholesky-QR, ``Q = block L⁻ᵀ`` with
    ``L Lᵀ = blockᵀ block``, or Householder QR where that would lose accuracy."""
    factor, info = torch.linalg.cholesky_ex(block.T @ block)
    diagonal = factor.diagonal()
    if int(info) == 0 and bool(diagonal.min() * _CHOLESKY_QR_MAX_RATIO > diagonal.max()):
        return torch.linalg.solve_triangular(factor.T, block, upper=True, left=False)
    return _orthonormalize(block)


def _orthonormalize(block: Tensor) -> Tensor:
    # Householder QR (HMT Alg. 4.4): backward stable even when the block's columns are nearly
    # dependent, which after a few power iterations they are (cond ~ (σ₁/σ_k)^(2q+1)).
    return torch.linalg.qr(block, mode="reduced").Q


def _small_svd(block: Tensor) -> tuple[Tensor, Tensor]:
    """``(W, Ũ)`` of the thin SVD ``block = W Σ Ũᵀ`` (``n' x k``), fp64 retry if fp32 does not converge."""
    try:
        w, _, uh = torch.linalg.svd(block, full_matrices=False)
    except torch.linalg.LinAlgError:
        w, _, uh = torch.linalg.svd(block.double(), full_matrices=False)
        w, uh = w.float(), uh.float()
    return w, uh.T


def randomized_basis(
    grad: Tensor,
    rank: int,
    side: Side,
    previous: tuple[Tensor | None, Tensor | None] | None = None,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    iterations: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Approximate ``(U[:, :r], Vh[:r])`` of ``grad`` by randomized subspace iteration (HMT Alg. 4.4 + 5.1).

    Same contract as :func:`lowrank_optim.projection.svd.svd_basis`: ``left`` is ``m x r`` with
    orthonormal columns, ``right`` ``r x n`` with orthonormal rows, ``r = min(rank, m, n)``, both fp32 on
    ``grad``'s device, the side not used ``None``; the directions are ordered by (estimated) singular
    value. Their signs are arbitrary, as LAPACK's are.

    ``previous``: the ``(left, right)`` bases of the last refresh, for a warm start (the basis of
    ``side`` is used; for FULL the one on the larger dimension). It may have fewer than ``r`` directions;
    Gaussian columns fill the block up to ``r + oversample``. ``oversample``: the ``p`` extra directions
    of the sketch. ``iterations``: ``q``, the power (subspace) iterations; ``None`` picks
    :data:`COLD_ITERATIONS` or :data:`WARM_ITERATIONS`. ``generator``: for the Gaussian columns (torch's
    global generator when ``None``); with a fixed seed the result is deterministic.

    Cost ``(2q + 2)`` products ``2mnk`` plus ``2q + 1`` QRs of ``max(m,n) x k`` blocks or smaller and one
    small SVD, ``k = min(r + p, m, n)``; see the module docstring for the accuracy guarantee.
    """
    if iterations is None:
        iterations = COLD_ITERATIONS if previous is None else WARM_ITERATIONS
    _check_arguments(grad, rank, oversample, iterations)
    side = Side(side)
    m, n = grad.shape
    rank = min(rank, m, n)
    # A sketch wider than the smaller side cannot have more independent columns than that side.
    width = min(rank + oversample, m, n)
    g = grad.float()  # no copy for fp32; the fp32 compute copy for bf16/fp16, as svd_basis makes

    if previous is not None:
        start, on_rows = _previous_block(previous, grad, side)
        # One memory layout whatever the stored basis's (column-major in a dense optimizer, row-major in a
        # flat partition): a GEMM's rounding can depend on its operands' layout.
        start = start[:, :width].to(device=g.device, dtype=torch.float32).contiguous()
    else:
        start, on_rows = None, n >= m  # start on the larger dimension (see "Which side")
    # A = G when the start block lives on G's row side (n), else A = Gᵀ (a view).
    a = g if on_rows else g.T
    rows, cols = a.shape  # m' x n'; the start block is n' x k
    if start is None:
        start = _gaussian(cols, width, g, generator)
    elif start.shape[1] < width:
        start = torch.cat([start, _gaussian(cols, width - start.shape[1], g, generator)], dim=1)

    # Between products only the range of each block matters, so the intermediate ones are
    # orthonormalized by Cholesky-QR (one Gram GEMM and a triangular solve, about half a Householder QR
    # here), falling back to Householder where the Gram matrix is too ill-conditioned; the block that
    # the final SVD reads is orthonormalized by Householder QR (HMT Alg. 4.4's stability where it counts).
    q = a @ start  # m' x k
    for _ in range(iterations):
        z = _range_basis(a.T @ _range_basis(q))  # n' x k
        q = a @ z  # m' x k
    q = _orthonormalize(q)
    b_t = a.T @ q  # Bᵀ = Aᵀ Q, n' x k (the faster GEMM shape than Qᵀ A)
    w, u_small = _small_svd(b_t)  # Bᵀ = W Σ Ũᵀ
    # A ≈ Q B = (Q Ũ) Σ Wᵀ: left singular vectors of A are Q Ũ (m' side), right ones W (n' side).
    a_left = q @ u_small[:, :rank]  # m' x r
    a_right = w[:, :rank]  # n' x r
    if on_rows:
        g_left, g_right = a_left, a_right.T.contiguous()
    else:
        g_left, g_right = a_right.contiguous(), a_left.T.contiguous()
    left = g_left if side in (Side.LEFT, Side.FULL) else None
    right = g_right if side in (Side.RIGHT, Side.FULL) else None
    return left, right


def captured_energy(grad: Tensor, left: Tensor | None, right: Tensor | None) -> float:
    """``‖projection‖²_F / ‖G‖²_F``: the share of the gradient's energy the bases keep (fp64 norms).

    The projection is GaLore's (``R = G Pᵀ``, ``Pᵀ G`` or ``Pₗᵀ G Pᵣᵀ``); since the bases are
    orthonormal, ``‖R‖_F`` is the norm of the projected gradient in the full space too.
    """
    g = grad.double()
    if left is not None:
        g = left.double().T @ g
    if right is not None:
        g = g @ right.double().T
    total = grad.double().pow(2).sum()
    return float(g.pow(2).sum() / total)


def optimal_energy(grad: Tensor, rank: int) -> float:
    """``Σ_{k<r} σ_k² / Σ_k σ_k²`` (``torch.linalg.svdvals`` in fp64): the most any rank-``r`` one-sided
    basis can capture (Eckart–Young–Mirsky)."""
    s2 = torch.linalg.svdvals(grad.double()).pow(2)
    return float(s2[:rank].sum() / s2.sum())


@register_projector
@dataclasses.dataclass(frozen=True)
class RandomizedSVDProjector(SVDProjector):
    """GaLore's subspace (the top-``rank`` singular vectors of the gradient) from a randomized SVD warm-started
    from the previous basis (:func:`randomized_basis`; Halko, Martinsson & Tropp 2011), instead of a full
    SVD. Same state as :class:`~lowrank_optim.projection.SVDProjector` (``basis_left`` / ``basis_right``), so
    the two can be swapped in a checkpoint (it is an :class:`SVDProjector` computed another way).

    The first refresh starts from a Gaussian block (``iterations`` subspace iterations), later ones from
    the basis being replaced plus ``oversample`` Gaussian directions (``warm_iterations``). Gaussian
    columns are drawn on the CPU from ``seed`` at every refresh, so the same gradient gives the same basis
    on every device and process count up to rounding, and the canonical sign (``sign``, as for the SVD)
    removes the sign ambiguity. Measured at LLaMA-1B's 5461 x 2048, ``rank`` 512, on 2 CPU cores
    (``bench/bench_refresh_rsvd.py``): a warm refresh 5.0-6.1x faster than the full SVD, capturing
    99.70-99.84 % of the optimal rank-``r`` gradient energy; a cold one 2.2-2.4x. What is guaranteed (and
    what is not) is in the module docstring: raise ``warm_iterations`` (the error shrinks geometrically)
    for gradients whose spectrum decays slowly.
    """

    name: ClassVar[str] = "rsvd"
    uses_previous: ClassVar[bool] = True
    oversample: int = DEFAULT_OVERSAMPLE
    iterations: int = COLD_ITERATIONS
    warm_iterations: int = WARM_ITERATIONS
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("oversample", self.oversample, 0)
        _check_count("iterations", self.iterations, 0)
        _check_count("warm_iterations", self.warm_iterations, 0)
        _check_count("seed", self.seed, 0)

    def refresh(
        self, grad: Tensor, rank: int, side: Side, previous: Sequence[Tensor] | None, *, fused: bool, first: bool
    ) -> list[Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        start = None
        if not first:  # the first refresh replaces zeros: a Gaussian start
            assert previous is not None  # uses_previous: a refresh is given the bases it replaces
            pair = basis_subspace(previous, side)
            start = (pair.left, pair.right)
        left, right = randomized_basis(
            grad,
            rank,
            side,
            start,
            oversample=self.oversample,
            iterations=self.iterations if start is None else self.warm_iterations,
            generator=generator,
        )
        return self.signed(left, right)
