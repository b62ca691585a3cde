"""The fragment layout: low-rank optimizer steps on pieces of matrices held in flat partitions.

Projections are linear, so the ranks holding pieces of one ``m x n`` matrix combine *partial*
projections. A rank holding elements ``[a, b)`` of the row-major matrix covers rows ``r0..r1``; it
zero-pads its piece to that row block ``G_k`` and computes, with ``P`` the basis,

    right side (P r x n):  R_k = G_k Pᵀ placed at rows r0..r1 of an m x r zero matrix
    left side  (P m x r):  R_k = P[r0:r1]ᵀ G_k                 (r x n)
    full:                  R_k = P_l[r0:r1]ᵀ G_k P_rᵀ            (r x r)

and ``R = Σ_k R_k`` exactly (the pieces are disjoint). Per param group and step the ranks all-reduce one
bucket of these ``r``-sized partial projections; the full gradient crosses the wire only at refresh
steps, where the owner (lowest holder) computes the SVD basis or the DCT selection from the summed,
zero-padded gradient and shares it by a second all-reduce (everyone else contributes zeros, so all
holders get bit-identical projectors). Adam runs on ``R`` duplicated on the holders, and each holder
back-projects only its rows, ``W_k -= step · scale · back(N)_k``, then decays its piece.

Sharded (ZeRO-3's default, one-sided projections of split matrices): the low-rank state lives with the
rows or columns it belongs to. A normal step then sends, per rank, ``(W-1)/W · r·n`` elements for a
right-side matrix and ``2(W-1)/W · r·n`` (one all-reduce of ``R``'s worth) for a left-side one, plus
``r``-sized rows at cuts: at most ``r/min(m, n)`` of an all-reduce of the full gradient.

    right side: a row of ``R = G Pᵀ`` depends only on the same row of ``G``. A holder keeps the moments
                of the rows whose first element it holds and an even share of the flattened basis ``P``,
                which is all-gathered on every step (``r·n`` elements, like ZeRO-3 gathering a
                parameter). ``R`` and ``N`` cross the wire only for the rows cut between two pieces.
    left side:  a holder keeps the rows of ``P`` its piece touches and the moments of an even share of
                ``R``'s columns: the partial ``R_k`` are reduce-scattered by columns and ``N`` (and ``R``
                for Fira) all-gathered.

Fira's factor ``phi`` needs only the rows (right) or all (left) of ``N`` and ``R``; its limiter takes
the Frobenius norm of the whole residual from all-reduced partial sums of squares.

A matrix held by one rank takes the same path with no communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..optim.fira import RESIDUAL_NORM
from ..optim.galore import (
    BASIS_LEFT,
    BASIS_RIGHT,
    DCT_INDICES_LEFT,
    DCT_INDICES_RIGHT,
    EXP_AVG,
    EXP_AVG_SQ,
    STEP,
    GaLoreAdamW,
    _decay_,
    _moments_reference,
    _step_size,
    nonfinite_flag,
)
from ..optim.layout import DenseLayout
from ..projection import (
    DCTSelection,
    Side,
    Subspace,
    add_project_back_,
    all_finite,
    basis_shapes,
    carry_moment_,
    dct_subspace,
    effective_rank,
    fira_coefficients,
    fira_residual,
    limit_norm_growth_,
    lowrank_shape,
    project,
    resolve_side,
    select_dct_indices,
    svd_basis,
)
from .comm import Communicator
from .plan import MatrixPlan, PartitionPlan

__all__ = ["FragmentLayout", "MATRICES"]

#: Key of a flat partition's state holding the per-matrix state dicts, keyed by parameter name.
MATRICES = "matrices"
#: Key of a sharded matrix's state: ``[start, stop)`` of its moment rows (right side) or columns (left).
SHARD = "shard"


@dataclass(frozen=True, kw_only=True)
class _Partition:
    """What the layout knows about one flat partition: its plan, its process group, the index of the
    optimizer's param group it belongs to, and whether the moments of split matrices are sharded among
    their holders."""

    plan: PartitionPlan
    comm: Communicator
    group_index: int
    shard_moments: bool


class FragmentLayout:
    """Steps projected param groups whose tensors are flat partitions described by :class:`PartitionPlan`.

    Groups without ``rank`` are elementwise Adam on the flat tensor (the dense path). A projected group
    holding a tensor this layout was not bound to raises.
    """

    def __init__(self) -> None:
        self._partitions: dict[int, tuple[Tensor, _Partition]] = {}
        self._full_rank: dict[int, tuple[Tensor, _Partition]] = {}
        self._dense = DenseLayout()
        #: This step's shared "skip every update" flag (``nonfinite="skip"`` groups), from begin_step.
        self._found_inf: Tensor | None = None

    def add_partition(
        self, flat: Tensor, plan: PartitionPlan, comm: Communicator, *, group_index: int, shard_moments: bool
    ) -> None:
        """Register ``flat`` (the tensor the optimizer will find in its projected param group
        ``group_index``) with its plan."""
        # Keyed by id, with a reference kept so that the id cannot be reused by another tensor.
        entry = _Partition(plan=plan, comm=comm, group_index=group_index, shard_moments=shard_moments)
        self._partitions[id(flat)] = (flat, entry)

    def add_full_rank_partition(self, flat: Tensor, plan: PartitionPlan, comm: Communicator, *, group_index: int) -> None:
        """Register the flat partition of a full-rank group: stepped as one dense tensor, the plan only says
        which parameters' elements it holds (for :mod:`lowrank_optim.distributed.checkpoint`)."""
        entry = _Partition(plan=plan, comm=comm, group_index=group_index, shard_moments=False)
        self._full_rank[id(flat)] = (flat, entry)

    def plan_of(self, flat: Tensor) -> PartitionPlan:
        return self._partitions[id(flat)][1].plan

    def projected_partitions(self) -> list[tuple[Tensor, _Partition]]:
        """``(flat, partition)`` of the projected groups, in binding order (the same on every rank)."""
        return list(self._partitions.values())

    def full_rank_partitions(self) -> list[tuple[Tensor, _Partition]]:
        """``(flat, partition)`` of the full-rank groups, in binding order."""
        return list(self._full_rank.values())

    @property
    def communicators(self) -> list[Communicator]:
        """The distinct communicators of the bound partitions (for counting communication)."""
        seen: dict[int, Communicator] = {}
        for _, partition in self._partitions.values():
            seen.setdefault(id(partition.comm), partition.comm)
        return list(seen.values())

    def attach(self, optimizer: GaLoreAdamW) -> None:
        """Make ``optimizer`` step through this layout and keep its nested state dtypes across loading."""
        optimizer.layout = self
        optimizer.register_load_state_dict_post_hook(self._restore_dtypes)

    def _restore_dtypes(self, optimizer: GaLoreAdamW) -> None:
        # torch's loader casts every nested tensor, integer or not, to the flat fp32 partition's dtype: the
        # DCT indices and shard bounds must be int64 again, the moments in the group's moment_dtype. (The
        # state is walked directly: ZeRO-3 empties the groups' params outside its step.)
        moment_dtype = optimizer.defaults.get("moment_dtype")
        for flat_state in optimizer.state.values():
            for matrix in flat_state.get(MATRICES, {}).values():
                for key in (DCT_INDICES_LEFT, DCT_INDICES_RIGHT, SHARD):
                    if key in matrix:
                        matrix[key] = matrix[key].to(torch.int64)
                for key in (EXP_AVG, EXP_AVG_SQ):
                    matrix[key] = matrix[key].to(moment_dtype or torch.float32)

    def check_group(self, optimizer: GaLoreAdamW, group: dict[str, Any]) -> None:
        """Every tensor of a projected group must be a partition this layout was bound to; a full-rank
        group's flat partitions are checked as whole tensors."""
        if "rank" not in group:
            self._dense.check_group(optimizer, group)
            optimizer._check_state(group)
            return
        for position, flat in enumerate(group["params"]):
            if id(flat) not in self._partitions:
                raise RuntimeError(
                    f"{type(optimizer).__name__}: tensor {position} (shape {tuple(flat.shape)}) of a projected param "
                    "group is not a partition this optimizer was bound to. Bind after deepspeed.initialize "
                    "(lowrank_optim.deepspeed.bind(engine)) and do not rebuild the optimizer's groups afterwards."
                )

    def begin_step(self, optimizer: GaLoreAdamW) -> None:
        """Decide, alike on every rank, whether this ``step()`` meets a NaN/Inf gradient (groups with
        ``nonfinite="skip"``): then no rank updates anything of the groups it steps, as DeepSpeed itself
        skips a step on fp16 overflow. DeepSpeed's ZeRO calls ``step()`` once per param group (sub-group at
        ZeRO-3), so there the decision is per group. Matrices are cut between ranks, so a per-matrix
        decision would need the flags of all their pieces; one flag costs one pass over the gradient
        partitions and one all-reduce of a single number per process group."""
        self._found_inf = None
        bound = [*self._partitions.values(), *self._full_rank.values()]
        skipping = [group for group in optimizer.param_groups if group["nonfinite"] == "skip"]
        if not skipping or not bound:
            return
        count = torch.zeros((), dtype=torch.float32, device=bound[0][0].device)
        for group in skipping:
            for flat in group["params"]:
                if flat.grad is not None:
                    count += nonfinite_flag(flat.grad)
        # One all-reduce per process group (partitions of one group may have communicators of their own;
        # the first bound one, a projected partition's where there is one, carries it), in binding order,
        # which is the same on every rank.
        groups: dict[int, Communicator] = {}
        for _, part in bound:
            groups.setdefault(id(getattr(part.comm, "group", part.comm)), part.comm)
        for comm in groups.values():
            comm.all_reduce(count)
        self._found_inf = count > 0

    # Full-rank groups hold whole flat tensors: the optimizer's own step, with the dense layout's pieces.
    def local(self, tensor: Tensor) -> Tensor:
        return tensor

    def new_state(self, param: Tensor, shape: Any, dtype: torch.dtype, sharding: str, *, column_major: bool = False) -> Tensor:
        return self._dense.new_state(param, shape, dtype, sharding, column_major=column_major)

    def exchange(self, group: dict[str, Any], params: list[Tensor]) -> Any:
        return self._dense.exchange(group, params)

    def step_group(self, optimizer: GaLoreAdamW, group: dict[str, Any]) -> None:
        found_inf = self._found_inf if group["nonfinite"] == "skip" else None
        if "rank" not in group:
            batch = optimizer._collect(group)
            if batch is not None:
                optimizer._step_group(group, batch, found_inf)
            return
        for flat in group["params"]:
            if flat.grad is not None:
                _step_partition(optimizer, group, flat, self._partitions[id(flat)][1], found_inf)


def _rows(plan: MatrixPlan) -> tuple[int, int, int]:
    """``(r0, r1, offset)``: the rows a piece touches and where it starts in that row block."""
    n = plan.shape[1]
    piece = plan.piece
    r0 = piece.param_start // n
    r1 = (piece.param_start + piece.numel - 1) // n + 1
    return r0, r1, piece.param_start - r0 * n


def _whole(plan: MatrixPlan) -> bool:
    return plan.piece.numel == plan.numel


def _block(flat: Tensor, plan: MatrixPlan) -> Tensor:
    """The piece of ``flat`` as its zero-padded row block (a view when the piece is the whole matrix)."""
    piece = plan.piece
    values = flat[piece.flat_start : piece.flat_start + piece.numel]
    if _whole(plan):
        return values.view(plan.shape)
    r0, r1, offset = _rows(plan)
    block = flat.new_zeros(r1 - r0, plan.shape[1])
    block.view(-1)[offset : offset + piece.numel] = values
    return block


def _fragment(block: Tensor, plan: MatrixPlan) -> Tensor:
    """The piece's own elements of a row block (drops the zero padding)."""
    offset = _rows(plan)[2]
    return block.reshape(-1)[offset : offset + plan.piece.numel]


def _sharded(part: _Partition, mp: MatrixPlan, side: Side) -> bool:
    """Whether a matrix's low-rank state is split among its holders (one-sided projections only)."""
    return part.shard_moments and mp.split and side is not Side.FULL


@dataclass(frozen=True)
class _Shard:
    """One holder's share of a sharded matrix (all ranges ``[start, stop)``).

    ``rows``: the rows its piece touches. ``first``: the rows whose first element it holds (they
    partition the matrix's rows among the holders). ``moments``: right side, its moment rows
    (= ``first``); left side, its even share of ``R``'s columns. ``basis``: right side, its even share
    of the flattened ``r x n`` basis; left side, the rows of the ``m x r`` basis it keeps (= ``rows``).
    """

    rows: tuple[int, int]
    first: tuple[int, int]
    moments: tuple[int, int]
    basis: tuple[int, int]


def _even(size: int, parts: int, index: int) -> tuple[int, int]:
    chunk = math.ceil(size / parts)
    return min(index * chunk, size), min((index + 1) * chunk, size)


def _shard_of(mp: MatrixPlan, index: int, side: Side, rank_r: int) -> _Shard:
    """The share of holder ``mp.holders[index]`` (every rank can compute every holder's)."""
    n = mp.shape[1]
    start, stop = mp.range_of(index)
    rows = (start // n, -(-stop // n))
    first = (-(-start // n), -(-stop // n))
    if side is Side.RIGHT:
        return _Shard(rows=rows, first=first, moments=first, basis=_even(rank_r * n, len(mp.holders), index))
    return _Shard(rows=rows, first=first, moments=_even(n, len(mp.holders), index), basis=rows)


def _my_shard(mp: MatrixPlan, rank: int, side: Side, rank_r: int) -> _Shard:
    return _shard_of(mp, mp.holders.index(rank), side, rank_r)


def _cut_rows(mp: MatrixPlan) -> list[tuple[int, int]]:
    """``(row, owner)`` of the rows cut between holders; ``owner`` is the rank holding the row's first
    element (it keeps the row's moments)."""
    n = mp.shape[1]
    rows = sorted({start // n for start in mp.starts[1:] if start % n})
    result = []
    for row in rows:
        index = max(j for j, start in enumerate(mp.starts) if start <= row * n)
        result.append((row, mp.holders[index]))
    return result


def _init_matrix_state(group: dict[str, Any], flat: Tensor, plan: MatrixPlan, rank: int, shard: bool) -> dict[str, Any]:
    side = resolve_side(group["proj_type"], plan.shape)
    rank_r = effective_rank(group["rank"], plan.shape)
    moment_shape = lowrank_shape(plan.shape, rank_r, side)
    state: dict[str, Any] = {}
    left_shape, right_shape = basis_shapes(plan.shape, rank_r, side)
    if shard and plan.split and side is not Side.FULL:
        mine = _my_shard(plan, rank, side, rank_r)
        state[SHARD] = torch.tensor(mine.moments, dtype=torch.int64)
        extent = mine.moments[1] - mine.moments[0]
        moment_shape = (extent, rank_r) if side is Side.RIGHT else (rank_r, extent)
        extent = mine.basis[1] - mine.basis[0]
        left_shape, right_shape = ((extent, rank_r), None) if side is Side.LEFT else (None, (extent,))
    if group["projector"] == "dct":
        if left_shape is not None:
            state[DCT_INDICES_LEFT] = torch.arange(rank_r, device=flat.device)
        if right_shape is not None:
            state[DCT_INDICES_RIGHT] = torch.arange(rank_r, device=flat.device)
    else:
        if left_shape is not None:
            state[BASIS_LEFT] = flat.new_zeros(left_shape)
        if right_shape is not None:
            state[BASIS_RIGHT] = flat.new_zeros(right_shape)
    moment_dtype = group["moment_dtype"] or flat.dtype
    state[EXP_AVG] = torch.zeros(moment_shape, dtype=moment_dtype, device=flat.device)
    state[EXP_AVG_SQ] = torch.zeros(moment_shape, dtype=moment_dtype, device=flat.device)
    if "residual" in group:  # Fira
        state[RESIDUAL_NORM] = torch.zeros((), dtype=torch.float32, device=flat.device)
    return state


def _projector_keys(group: dict[str, Any]) -> tuple[str, str]:
    return (DCT_INDICES_LEFT, DCT_INDICES_RIGHT) if group["projector"] == "dct" else (BASIS_LEFT, BASIS_RIGHT)


def _new_projector(group: dict[str, Any], grad: Tensor, side: Side, rank_r: int) -> list[Tensor]:
    """The owner's new projector tensors from the full gradient, in the order of :func:`_projector_keys`."""
    if group["projector"] == "dct":
        return [
            select_dct_indices(grad, rank_r, one_side, group["scoring"])
            for one_side in (Side.LEFT, Side.RIGHT)
            if side in (one_side, Side.FULL)
        ]
    return [basis for basis in svd_basis(grad, rank_r, side) if basis is not None]


def _projector_shapes(group: dict[str, Any], mp: MatrixPlan) -> list[tuple[int, ...]]:
    """Shapes of the whole projector tensors of a matrix, in the order of :func:`_projector_keys`."""
    side = resolve_side(group["proj_type"], mp.shape)
    rank_r = effective_rank(group["rank"], mp.shape)
    if group["projector"] == "dct":
        return [(rank_r,)] * (2 if side is Side.FULL else 1)
    return [shape for shape in basis_shapes(mp.shape, rank_r, side) if shape is not None]


def _local_projector(
    group: dict[str, Any], mp: MatrixPlan, part: _Partition, rank: int, whole: list[Tensor]
) -> list[Tensor]:
    """This holder's part of whole projector tensors: the slice of the basis a sharded matrix keeps."""
    side = resolve_side(group["proj_type"], mp.shape)
    if group["projector"] == "dct" or not _sharded(part, mp, side):
        return whole
    (basis,) = whole
    start, stop = _my_shard(mp, rank, side, effective_rank(group["rank"], mp.shape)).basis
    return [basis.reshape(-1)[start:stop] if side is Side.RIGHT else basis[start:stop]]


def _install_projector(group: dict[str, Any], state: dict[str, Any], new: list[Tensor], step: int) -> None:
    """Replace the projector; moments follow it as the dense optimizer's refresh does (keep: SVD moments
    carry over, DCT moments follow their frequencies; reset: zeroed)."""
    keys = [key for key in _projector_keys(group) if key in state]
    keep = group["moment_policy"] == "keep"
    for key, value in zip(keys, new):
        if group["projector"] == "dct" and step > 0 and keep:
            dim = 0 if key == DCT_INDICES_LEFT else -1
            for moment in (state[EXP_AVG], state[EXP_AVG_SQ]):
                carry_moment_(moment, state[key], value, dim)
        state[key].copy_(value)
    if step > 0 and not keep:
        state[EXP_AVG].zero_()
        state[EXP_AVG_SQ].zero_()


def _subspace(group: dict[str, Any], state: dict[str, Any], plan: MatrixPlan, side: Side, flat: Tensor) -> Subspace:
    if group["projector"] == "dct":
        selection = DCTSelection(side, state.get(DCT_INDICES_LEFT), state.get(DCT_INDICES_RIGHT))
        return dct_subspace(selection, plan.shape, flat.dtype, flat.device)
    return Subspace(side, state.get(BASIS_LEFT), state.get(BASIS_RIGHT))


def _restrict(subspace: Subspace, r0: int, r1: int) -> Subspace:
    """The subspace acting on rows ``r0..r1`` of the matrix (only a left basis depends on rows)."""
    left = None if subspace.left is None else subspace.left[r0:r1]
    return Subspace(subspace.side, left, subspace.right)


def _rows_of(lowrank: Tensor, side: Side, r0: int, r1: int) -> Tensor:
    """The part of ``R`` or ``N`` that rows ``r0..r1`` of the matrix depend on."""
    return lowrank[r0:r1] if side is Side.RIGHT else lowrank


def _refresh(
    optimizer: GaLoreAdamW, group: dict[str, Any], flat: Tensor, part: _Partition, matrices: dict[str, Any], step: int
) -> bool:
    """Refresh every matrix's projector; ``False``: skip this step (a non-finite gradient at the very first
    refresh, when no projector exists yet; the decision is the same on every rank)."""
    plan, comm = part.plan, part.comm
    held = [mp for mp in plan.matrices if mp.piece is not None]
    split = [mp for mp in plan.matrices if mp.split]
    grads: dict[str, Tensor] = {mp.name: _block(flat.grad, mp) for mp in held if not mp.split}
    finite = {name: all_finite(grad) for name, grad in grads.items()}
    # One bucket: the zero-padded full gradients of the split matrices, plus a count of non-finite
    # gradients among the whole ones (so that a skip is decided alike everywhere).
    buffer = flat.new_zeros(sum(mp.numel for mp in split) + 1)
    offset = 0
    for mp in split:
        if mp.piece is not None:
            start = offset + mp.piece.param_start
            buffer[start : start + mp.piece.numel] = flat.grad[mp.piece.flat_start : mp.piece.flat_start + mp.piece.numel]
        grads[mp.name] = buffer[offset : offset + mp.numel].view(mp.shape)
        offset += mp.numel
    buffer[-1] = sum(not ok for ok in finite.values())
    comm.all_reduce(buffer)
    for mp in split:
        finite[mp.name] = all_finite(grads[mp.name])
    if buffer[-1].item() > 0 or not all(finite[mp.name] for mp in split):
        outcome = "deferred" if step == 0 else "skipped" if group["nonfinite"] == "skip" else "applied"
        names = ", ".join(mp.name for mp in plan.matrices)
        optimizer._warn_nonfinite(f"a DeepSpeed partition holding {names}", step + 1, outcome)
        if outcome != "applied":
            return False
    new: dict[str, list[Tensor]] = {}
    owners = _refresh_owners(plan, comm.world_size)
    for mp in plan.matrices:
        if owners[mp.name] == comm.rank and finite[mp.name]:
            side = resolve_side(group["proj_type"], mp.shape)
            new[mp.name] = _new_projector(group, grads[mp.name], side, effective_rank(group["rank"], mp.shape))
    if split:
        # Share the owners' projectors: each slot is written by its owner only, so the sum is exact.
        sizes = [_projector_numel(group, mp) for mp in split]
        shared = torch.zeros(sum(sizes), dtype=torch.int64 if group["projector"] == "dct" else flat.dtype, device=flat.device)
        offset = 0
        for mp, size in zip(split, sizes):
            if mp.name in new:
                shared[offset : offset + size] = torch.cat([t.reshape(-1) for t in new[mp.name]])
            offset += size
        comm.all_reduce(shared)
        offset = 0
        for mp, size in zip(split, sizes):
            if mp.piece is not None and finite[mp.name]:
                pieces, start = [], offset
                for shape in _projector_shapes(group, mp):
                    pieces.append(shared[start : start + math.prod(shape)].view(shape))
                    start += math.prod(shape)
                new[mp.name] = pieces
            offset += size
    for mp in held:
        if mp.name in new:
            local = _local_projector(group, mp, part, comm.rank, new[mp.name])
            _install_projector(group, matrices[mp.name], local, step)
    return True


def _refresh_owners(plan: PartitionPlan, world_size: int) -> dict[str, int]:
    """Which rank computes each matrix's projector at a refresh (the same answer on every rank). A matrix
    held whole by one rank is its holder's; a split one's gradient reaches every rank (the refresh's
    all-reduce), so the split ones go, largest SVD first, to the least loaded rank (ZeRO-3 cuts every
    matrix, and the lowest holder would be rank 0 for all of them)."""
    loads = [0] * world_size
    owners: dict[str, int] = {}
    cost = {mp.name: mp.numel * min(mp.shape) for mp in plan.matrices}
    for mp in plan.matrices:
        if not mp.split:
            owners[mp.name] = mp.holders[0]
            loads[mp.holders[0]] += cost[mp.name]
    for mp in sorted((mp for mp in plan.matrices if mp.split), key=lambda mp: (-cost[mp.name], mp.name)):
        owner = min(range(world_size), key=lambda k: (loads[k], k))
        owners[mp.name] = owner
        loads[owner] += cost[mp.name]
    return owners


def _projector_numel(group: dict[str, Any], mp: MatrixPlan) -> int:
    return sum(math.prod(shape) for shape in _projector_shapes(group, mp))


def _step_partition(
    optimizer: GaLoreAdamW, group: dict[str, Any], flat: Tensor, part: _Partition, skip: Tensor | None
) -> None:
    """One step of a projected flat partition; ``skip`` (0-dim bool, the same on every rank) leaves every
    piece and its state as they were, decided on the device (the step counter advances)."""
    plan, comm = part.plan, part.comm
    state = optimizer.state[flat]
    if not state:
        state[STEP] = torch.tensor(0.0, dtype=torch.float32)
        state[MATRICES] = {
            mp.name: _init_matrix_state(group, flat, mp, comm.rank, part.shard_moments)
            for mp in plan.matrices
            if mp.piece is not None
        }
    matrices: dict[str, dict[str, Any]] = state[MATRICES]
    step = int(state[STEP].item())
    refresh = step % group["update_proj_gap"] == 0
    if refresh and skip is not None and bool(skip):  # alike on every rank: no collective of _refresh starts
        names = ", ".join(mp.name for mp in plan.matrices)
        optimizer._warn_nonfinite(f"a DeepSpeed partition holding {names}", step + 1, "deferred" if step == 0 else "skipped")
        refresh_skipped = True
    else:
        refresh_skipped = refresh and not _refresh(optimizer, group, flat, part, matrices, step)
    if refresh_skipped:
        optimizer._skip_counts.setdefault(flat, torch.zeros((), dtype=torch.int64, device=flat.device)).add_(1)
        return
    if skip is not None:
        optimizer._skip_counts.setdefault(flat, torch.zeros((), dtype=torch.int64, device=flat.device)).add_(skip)
    moment_dtype = group["moment_dtype"] or flat.dtype
    dct = group["projector"] == "dct"
    held = [mp for mp in plan.matrices if mp.piece is not None]
    sides = {mp.name: resolve_side(group["proj_type"], mp.shape) for mp in plan.matrices}
    ranks = {mp.name: effective_rank(group["rank"], mp.shape) for mp in plan.matrices}
    shapes = {mp.name: lowrank_shape(mp.shape, ranks[mp.name], sides[mp.name]) for mp in plan.matrices}
    # Global lists (the same on every rank, so that the collectives match up).
    sharded = {mp.name for mp in plan.matrices if _sharded(part, mp, sides[mp.name])}
    split = [mp for mp in plan.matrices if mp.split and mp.name not in sharded]
    right = [mp for mp in plan.matrices if mp.name in sharded and sides[mp.name] is Side.RIGHT]
    left = [mp for mp in plan.matrices if mp.name in sharded and sides[mp.name] is Side.LEFT]
    shards = {mp.name: _my_shard(mp, comm.rank, sides[mp.name], ranks[mp.name]) for mp in held if mp.name in sharded}
    blocks = {mp.name: _block(flat.grad, mp) for mp in held}

    # The subspace each holder's row block sees; sharded right-side bases are all-gathered first.
    gathered = {} if dct else _gather_right_bases(comm, right, matrices, ranks, flat)
    subspaces: dict[str, Subspace] = {}
    for mp in held:
        r0, r1, _ = _rows(mp)
        if mp.name in gathered:
            subspaces[mp.name] = Subspace(Side.RIGHT, None, gathered[mp.name])
        elif mp.name in sharded and sides[mp.name] is Side.LEFT and not dct:
            subspaces[mp.name] = Subspace(Side.LEFT, matrices[mp.name][BASIS_LEFT], None)
        else:
            subspaces[mp.name] = _restrict(_subspace(group, matrices[mp.name], mp, sides[mp.name], flat), r0, r1)
    partials = {mp.name: project(blocks[mp.name], subspaces[mp.name]) for mp in held}

    # R. Replicated: partial projections summed over the holders of split matrices in one bucket.
    # Sharded right: only the rows cut between holders are summed. Sharded left: reduce-scatter by columns.
    lowranks: dict[str, Tensor] = {}
    buffer = flat.new_zeros(sum(math.prod(shapes[mp.name]) for mp in split))
    split_views = _views(buffer, split, shapes)
    for mp in held:
        if mp.name in sharded:
            continue
        r0, r1, _ = _rows(mp)
        if not mp.split:
            lowranks[mp.name] = partials[mp.name].to(moment_dtype)
        elif sides[mp.name] is Side.RIGHT:
            split_views[mp.name][r0:r1] = partials[mp.name]
        else:
            split_views[mp.name].copy_(partials[mp.name])
    if split:
        comm.all_reduce(buffer)
        for mp in split:
            if mp.piece is not None:
                lowranks[mp.name] = split_views[mp.name].to(moment_dtype)
    _exchange_cut_rows(comm, right, partials, ranks, flat.dtype, flat.device, owners_only=False)
    row_lowranks = {mp.name: partials[mp.name].to(moment_dtype) for mp in right if mp.piece is not None}
    column_lowranks = _reduce_scatter_columns(comm, left, partials, ranks, flat.dtype, flat.device)

    # Adam in low-rank space: on the whole R, or on this holder's rows / columns of it.
    beta1, beta2 = group["betas"]
    normalized: dict[str, Tensor] = {}
    for mp in held:
        if mp.name in row_lowranks:
            t0 = shards[mp.name].rows[0]
            o0, o1 = shards[mp.name].moments
            lowrank = row_lowranks[mp.name][o0 - t0 : o1 - t0]
        elif mp.name in column_lowranks:
            lowrank = column_lowranks[mp.name].to(moment_dtype)
        else:
            lowrank = lowranks[mp.name]
        mstate = matrices[mp.name]
        normalized[mp.name] = _moments_reference(
            lowrank, mstate[EXP_AVG], mstate[EXP_AVG_SQ], beta1, beta2, group["eps"], skip
        )

    # R and N as each holder's row block needs them: rows r0..r1 (right side) or the whole (left side).
    local_r: dict[str, Tensor] = {}
    local_n: dict[str, Tensor] = {}
    for mp in held:
        if mp.name in sharded:
            continue
        r0, r1, _ = _rows(mp)
        local_r[mp.name] = _rows_of(lowranks[mp.name], sides[mp.name], r0, r1)
        local_n[mp.name] = _rows_of(normalized[mp.name], sides[mp.name], r0, r1)
    for mp in right:
        if mp.piece is None:
            continue
        t0, t1 = shards[mp.name].rows
        o0, o1 = shards[mp.name].moments
        rows = torch.zeros(t1 - t0, ranks[mp.name], dtype=moment_dtype, device=flat.device)
        rows[o0 - t0 : o1 - t0] = normalized[mp.name]
        local_n[mp.name] = rows
        local_r[mp.name] = row_lowranks[mp.name]
    _exchange_cut_rows(comm, right, local_n, ranks, moment_dtype, flat.device, owners_only=True)
    fira = "residual" in group
    columns = {mp.name: normalized[mp.name] for mp in left if mp.piece is not None}
    if fira:  # Fira needs the whole R too: one gather of [N | R] per column share
        columns = {name: torch.cat([chunk, column_lowranks[name].to(moment_dtype)]) for name, chunk in columns.items()}
    whole = _gather_columns(comm, left, columns, ranks, 2 if fira else 1, moment_dtype, flat.device)
    for name, both in whole.items():
        local_n[name] = both[: both.shape[0] // (2 if fira else 1)]
        if fira:
            local_r[name] = both[both.shape[0] // 2 :]

    step_size = _step_size(group["lr"], beta1, beta2, step + 1, group["correct_bias"])
    if fira:
        _apply_fira(
            group, flat, part, matrices, held, plan, sides, blocks, subspaces, local_r, local_n, step, step_size, skip
        )
    else:
        for mp in held:
            piece = mp.piece
            values = flat[piece.flat_start : piece.flat_start + piece.numel]
            # Update the row block that holds the piece, so that each element sees the same addmm as dense.
            target = _block(flat, mp)
            add_project_back_(target, local_n[mp.name], subspaces[mp.name], alpha=-step_size * group["scale"])
            if not _whole(mp):
                values.copy_(_fragment(target, mp))
    if group["weight_decay"] > 0.0:
        for mp in held:
            values = flat[mp.piece.flat_start : mp.piece.flat_start + mp.piece.numel]
            _decay_(values, group["lr"], group["weight_decay"], skip)
    state[STEP] += 1


def _views(buffer: Tensor, plans: list[MatrixPlan], shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    views, offset = {}, 0
    for mp in plans:
        size = math.prod(shapes[mp.name])
        views[mp.name] = buffer[offset : offset + size].view(shapes[mp.name])
        offset += size
    return views


def _gather_right_bases(
    comm: Communicator, right: list[MatrixPlan], matrices: dict[str, Any], ranks: dict[str, int], flat: Tensor
) -> dict[str, Tensor]:
    """The whole ``r x n`` bases of the sharded right-side matrices this rank holds, from every holder's
    even share (one all-gather for the partition)."""
    if not right:
        return {}
    # Segment k of the gather: rank k's shares, in plan order; padded to the longest segment.
    offsets: dict[tuple[str, int], int] = {}
    sizes = [0] * comm.world_size
    for mp in right:
        for index, holder in enumerate(mp.holders):
            start, stop = _shard_of(mp, index, Side.RIGHT, ranks[mp.name]).basis
            offsets[mp.name, holder] = sizes[holder]
            sizes[holder] += stop - start
    width = max(sizes)
    mine = flat.new_zeros(width)
    for mp in right:
        if mp.piece is not None:
            share = matrices[mp.name][BASIS_RIGHT]
            start = offsets[mp.name, comm.rank]
            mine[start : start + share.numel()] = share
    everything = flat.new_empty(width * comm.world_size)
    comm.all_gather(everything, mine)
    result = {}
    for mp in right:
        if mp.piece is None:
            continue
        basis = flat.new_empty(ranks[mp.name] * mp.shape[1])
        for index, holder in enumerate(mp.holders):
            start, stop = _shard_of(mp, index, Side.RIGHT, ranks[mp.name]).basis
            source = holder * width + offsets[mp.name, holder]
            basis[start:stop] = everything[source : source + stop - start]
        result[mp.name] = basis.view(ranks[mp.name], mp.shape[1])
    return result


def _exchange_cut_rows(
    comm: Communicator,
    right: list[MatrixPlan],
    rows: dict[str, Tensor],
    ranks: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    *,
    owners_only: bool,
) -> None:
    """Complete, in place, the rows cut between holders of sharded right-side matrices in ``rows`` (each
    holder's rows ``r0..r1``): summed over the holders touching them (``R``), or copied from the row's
    owner (``N``, ``owners_only``). One all-reduce of ``r``-sized rows; nothing when no row is cut."""
    cuts = [(mp, row, owner) for mp in right for row, owner in _cut_rows(mp)]
    if not cuts:
        return
    buffer = torch.zeros(sum(ranks[mp.name] for mp, _, _ in cuts), dtype=dtype, device=device)
    slots = []
    offset = 0
    for mp, row, owner in cuts:
        size = ranks[mp.name]
        if mp.piece is not None and (not owners_only or owner == comm.rank):
            r0, r1, _ = _rows(mp)
            if r0 <= row < r1:
                buffer[offset : offset + size] = rows[mp.name][row - r0]
        slots.append(offset)
        offset += size
    comm.all_reduce(buffer)
    for (mp, row, _), offset in zip(cuts, slots):
        if mp.piece is not None:
            r0, r1, _ = _rows(mp)
            if r0 <= row < r1:
                rows[mp.name][row - r0] = buffer[offset : offset + ranks[mp.name]]


def _column_layout(
    comm: Communicator, left: list[MatrixPlan], ranks: dict[str, int], height: int
) -> tuple[int, dict[tuple[str, int], tuple[int, int, int]]]:
    """``(width, {(name, holder): (offset, c0, c1)})``: segment ``k`` of a reduce-scatter / all-gather
    holds rank ``k``'s column shares ``[c0, c1)`` (``height · r`` rows each) in plan order."""
    sizes = [0] * comm.world_size
    places = {}
    for mp in left:
        for index, holder in enumerate(mp.holders):
            c0, c1 = _shard_of(mp, index, Side.LEFT, ranks[mp.name]).moments
            places[mp.name, holder] = (sizes[holder], c0, c1)
            sizes[holder] += height * ranks[mp.name] * (c1 - c0)
    return max(sizes, default=0), places


def _reduce_scatter_columns(
    comm: Communicator,
    left: list[MatrixPlan],
    partials: dict[str, Tensor],
    ranks: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    """This holder's columns of ``R = Σ_k R_k`` for the sharded left-side matrices (one reduce-scatter)."""
    if not left:
        return {}
    width, places = _column_layout(comm, left, ranks, 1)
    buffer = torch.zeros(width * comm.world_size, dtype=dtype, device=device)
    for mp in left:
        if mp.piece is None:
            continue
        for holder in mp.holders:
            offset, c0, c1 = places[mp.name, holder]
            start = holder * width + offset
            buffer[start : start + ranks[mp.name] * (c1 - c0)] = partials[mp.name][:, c0:c1].reshape(-1)
    mine = torch.empty(width, dtype=dtype, device=device)
    comm.reduce_scatter(mine, buffer)
    result = {}
    for mp in left:
        if mp.piece is not None:
            offset, c0, c1 = places[mp.name, comm.rank]
            result[mp.name] = mine[offset : offset + ranks[mp.name] * (c1 - c0)].view(ranks[mp.name], c1 - c0)
    return result


def _gather_columns(
    comm: Communicator,
    left: list[MatrixPlan],
    columns: dict[str, Tensor],
    ranks: dict[str, int],
    height: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    """The whole ``height·r x n`` tensors of the sharded left-side matrices this rank holds, from every
    holder's columns (one all-gather)."""
    if not left:
        return {}
    width, places = _column_layout(comm, left, ranks, height)
    mine = torch.zeros(width, dtype=dtype, device=device)
    for name, chunk in columns.items():
        offset = places[name, comm.rank][0]
        mine[offset : offset + chunk.numel()] = chunk.reshape(-1)
    everything = torch.empty(width * comm.world_size, dtype=dtype, device=device)
    comm.all_gather(everything, mine)
    result = {}
    for mp in left:
        if mp.piece is None:
            continue
        rows = height * ranks[mp.name]
        whole = torch.empty(rows, mp.shape[1], dtype=dtype, device=device)
        for holder in mp.holders:
            offset, c0, c1 = places[mp.name, holder]
            start = holder * width + offset
            whole[:, c0:c1] = everything[start : start + rows * (c1 - c0)].view(rows, c1 - c0)
        result[mp.name] = whole
    return result


def _apply_fira(
    group: dict[str, Any],
    flat: Tensor,
    part: _Partition,
    matrices: dict[str, dict[str, Any]],
    held: list[MatrixPlan],
    plan: PartitionPlan,
    sides: dict[str, Side],
    blocks: dict[str, Tensor],
    subspaces: dict[str, Subspace],
    local_r: dict[str, Tensor],
    local_n: dict[str, Tensor],
    step: int,
    step_size: float,
    skip: Tensor | None,
) -> None:
    """Fira's update on each piece: residual on the row block, limiter on the whole matrix's norm; a
    skipped step adds nothing and keeps the limiter's state."""
    subtract, residual_scale = fira_coefficients(group["alpha"], group["residual"])
    split = [mp for mp in plan.matrices if mp.split]
    residuals: dict[str, Tensor] = {}
    for mp in held:
        residuals[mp.name] = fira_residual(
            blocks[mp.name], local_r[mp.name], local_n[mp.name], subspaces[mp.name], subtract=subtract
        )
    # ||S||_F of split matrices from the holders' partial sums of squares (own elements only).
    squares = torch.zeros(len(split), dtype=torch.float32, device=flat.device)
    for index, mp in enumerate(split):
        if mp.piece is not None:
            squares[index] = _fragment(residuals[mp.name], mp).float().square().sum()
    if split:
        part.comm.all_reduce(squares)
    norms = {mp.name: squares[index].sqrt() for index, mp in enumerate(split)}
    for mp in held:
        residual = residuals[mp.name]
        limit_norm_growth_(
            residual,
            matrices[mp.name][RESIDUAL_NORM],
            gamma=group["gamma"],
            first=step == 0,
            norm=norms.get(mp.name),
            skip=skip,
        )
        if residual_scale != 1.0:
            residual.mul_(residual_scale)
        if skip is not None:
            residual.masked_fill_(skip, 0.0)
        update = add_project_back_(residual, local_n[mp.name], subspaces[mp.name], alpha=group["alpha"])
        values = flat[mp.piece.flat_start : mp.piece.flat_start + mp.piece.numel]
        values.add_(_fragment(update, mp), alpha=-step_size)
