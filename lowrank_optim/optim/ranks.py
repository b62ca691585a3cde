"""Adaptive ranks (``rank="auto"``): each projected matrix's rank chosen at a refresh from its gradient
spectrum, under one state-memory budget for the group.

WeLore (Jaiswal et al., 2024, arXiv 2407.11239) finds that the matrices of a model become low-rank to
very different degrees, so that one rank for all of them wastes memory on some and starves others. Its
pretraining counterpart, which this module implements (the paper compresses trained weights; choosing
the ranks of GaLore-style training from the gradients under a budget is ours): a param group with
``rank="auto"`` and ``state_budget=B`` (bytes) gives its matrices ranks that together keep at most ``B``
bytes of rank-dependent state, re-chosen at every refresh.

The rule. Matrix ``i`` has gradient energies ``e_i1 >= e_i2 >= ...`` (:meth:`Projector.energies`: the
squared singular values; for DCT, the frequencies' energies), total ``E_i = Σ_j e_ij``, and at rank ``k``
costs ``c_i(k)`` bytes of state (its moments as its moment format stores them and its projector's tensors:
:meth:`GaLoreAdamW.rank_state_bytes`). Each matrix gets at least rank 1; then, repeatedly, the next
direction with the most captured energy fraction per byte, ``(e_i,k+1 / E_i) / (c_i(k+1) - c_i(k))``, is
added while the total fits ``B`` and the direction carries energy (energies at fp32 rounding level are
reported as 0, :func:`~lowrank_optim.projection.without_rounding_noise`: a rank-12 gradient gets rank 12
at most, and rounding, which differs between an all-reduced and a one-process gradient, decides no rank).
The fraction, not the raw energy, is what counts: gradient scales differ by orders of magnitude between
layers (the output layer's dwarfs the rest), and raw energy would hand it the whole budget. Since each
matrix's gains decrease with its rank, this greedy choice is the optimum of the fractional relaxation of
the knapsack ``max Σ_i F_i(k_i) s.t. Σ_i c_i(k_i) <= B`` (``F_i``: the captured fraction, concave); a
matrix whose next direction does not fit stops growing while smaller ones may still fit.

Budget accounting. ``c_i(k)`` is exact (8-bit moments' scale blocks included), and a matrix is charged
at least its rank-1 cost even before its first refresh, so that the bytes held never exceed ``B``
between or at refreshes (asserted by the tests), whichever matrices refresh together. Rank-independent
state (step counters, Fira's and APOLLO's limiter norms) is not counted; every tensor the projector
keeps is (APOLLO's 8-byte seed too: it is one of its tensors, whatever the rank).

Where it runs. Whole tensors, and FSDP2: there each spectrum is computed by the matrix's refresh owner
from the whole gradient and shared with every rank (``AdaptiveExchange.spectra``), so all ranks allocate
what one process would; the budget counts whole tensors, of which each rank holds about ``1/world``. DCP
checkpoints load through :func:`lowrank_optim.distributed.dcp.match_saved_ranks`. DeepSpeed ZeRO 1-3:
every rank keeps every matrix's rank (the partition's rank table), the owners' spectra reach every rank
(``AdaptiveExchange.spectra``), and each rank allocates over all of the partition's matrices, those it
holds no piece of too (``AdaptiveExchange.elsewhere``). A ZeRO-3 group cut into sub-groups, which
DeepSpeed steps one at a time, is allocated as a whole at the refresh of its first sub-group due in that
step, over every sub-group due then, from their reduced gradients (one more refresh gather per later
sub-group); the later sub-groups find the same ranks (checked). A sub-group that deferred a refresh
(``nonfinite="skip"``) is a step behind and refreshes alone, the others charged at the ranks they hold.
Within that engine step the bytes held may exceed ``B`` until the last sub-group has resized (by at most
what the earlier ones grew); after it they never do. DeepSpeed's own checkpoints keep the rank tables; the
name-keyed state (``save_lowrank_state``) saves each matrix's ``matrix_rank``, and ``load_lowrank_state``
rebuilds every matrix at it (any number of ranks). ``GaLoreAdafactor`` (one rank per group) and
``PerLayerUpdates`` (one matrix stepped at a time) refuse it by name.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..projection import Projector, Side

__all__ = ["AUTO", "allocate_ranks", "charged_bytes", "spectrum_of"]

#: The ``rank`` value of a param group whose matrices' ranks are chosen from their gradients.
AUTO = "auto"


def charged_bytes(cost: Callable[[int], int], rank: int | None) -> int:
    """What a matrix of ``cost`` (its state bytes per rank) is charged against the budget at ``rank``: at
    least its rank-1 cost (also at rank 0, before its first refresh, so that the budget holds whichever
    matrices refresh together), and never less than rank 1's where a larger rank's state is smaller (8-bit
    moments crossing their size threshold)."""
    return max(cost(max(rank or 0, 1)), cost(1))


def spectrum_of(projector: Projector, whole: Tensor, side: Side, size: int) -> Tensor:
    """The ``size`` energies (fp64, ``size = min(m, n)``) matrix ``whole``'s gradient offers ``projector``
    on ``side`` (:meth:`Projector.energies`), padded with zeros where the projector offers fewer
    directions: what the allocation reads, computed alike by the optimizer and by a layout that needs a
    matrix's spectrum before its step (a ZeRO-3 group cut into sub-groups)."""
    energies = projector.energies(whole, side).to(torch.float64).flatten()[:size]
    return torch.cat([energies, energies.new_zeros(size - energies.numel())])


def allocate_ranks(
    energies: Sequence[Tensor], costs: Sequence[Callable[[int], int]], budget: int
) -> list[int]:
    """Each matrix's rank (module docstring): ``energies[i]`` its decreasing gradient energies (one per
    possible direction, so ``len(energies[i])`` is its largest rank), ``costs[i](k)`` its state bytes at
    rank ``k >= 1``, ``budget`` the bytes they may hold together. Deterministic: ties go to the lower index.
    Raises ``ValueError`` when even rank 1 everywhere exceeds ``budget``."""
    ranks = [1] * len(energies)
    charged = [costs[i](1) for i in range(len(energies))]
    total = sum(charged)
    if total > budget:
        raise ValueError(
            f"Invalid state_budget: {budget} bytes. Rank 1 for each of these {len(energies)} matrices already "
            f"needs {total} bytes: allowed is a budget of at least {total}."
        )
    values = [[float(v) for v in e.tolist()] for e in energies]
    sums = [sum(v) for v in values]
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        k = ranks[i]
        if k >= len(values[i]) or sums[i] <= 0.0 or values[i][k] <= 0.0:
            return
        extra = costs[i](k + 1) - charged[i]
        # A cost that does not grow (8-bit moments crossing their size threshold) is as good as free.
        heapq.heappush(heap, (-(values[i][k] / sums[i]) / max(extra, 1), i))

    for i in range(len(energies)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        cost = charged_bytes(costs[i], ranks[i] + 1)
        if total - charged[i] + cost > budget:
            continue  # does not fit: this matrix stops growing
        total += cost - charged[i]
        charged[i] = cost
        ranks[i] += 1
        push(i)
    return ranks
