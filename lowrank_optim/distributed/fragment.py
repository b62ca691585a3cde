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
holders get bit-identical projectors). Adam runs on ``R`` — duplicated on the holders, or with the
moments sharded along the unprojected dimension (then the normalized update ``N`` is reassembled by
one more all-reduce) — and each holder back-projects only its rows, ``W_k -= step · scale · back(N)_k``,
then decays its piece. Fira's factor ``phi`` needs only ``N`` and ``R`` (known in full by every holder);
its limiter takes the Frobenius norm of the whole residual from all-reduced partial sums of squares.

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
    _step_size,
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
#: Key of a sharded matrix's state: ``[start, stop)`` of its moment chunk along the unprojected dim.
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

    def step_group(self, optimizer: GaLoreAdamW, group: dict[str, Any]) -> None:
        if "rank" not in group:
            self._dense.step_group(optimizer, group)
            return
        for position, flat in enumerate(group["params"]):
            entry = self._partitions.get(id(flat))
            if entry is None:
                raise RuntimeError(
                    f"{type(optimizer).__name__}: tensor {position} (shape {tuple(flat.shape)}) of a projected param "
                    "group is not a partition this optimizer was bound to. Bind after deepspeed.initialize "
                    "(lowrank_optim.deepspeed.bind(engine)) and do not rebuild the optimizer's groups afterwards."
                )
            if flat.grad is not None:
                _step_partition(optimizer, group, flat, entry[1])


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


def _shard_range(plan: MatrixPlan, rank: int, side: Side, lowrank: tuple[int, int]) -> tuple[int, int] | None:
    """The moment chunk this holder keeps: an even share, among the holders, of the unprojected
    dimension (rows of an ``m x r`` right-side ``R``, columns of a left-side ``r x n``); ``None`` when not
    sharded (single holder, or a two-sided projection, whose DCT moments move along both dims)."""
    if not plan.split or side is Side.FULL:
        return None
    size = lowrank[0] if side is Side.RIGHT else lowrank[1]
    chunk = math.ceil(size / len(plan.holders))
    index = plan.holders.index(rank)
    return min(index * chunk, size), min((index + 1) * chunk, size)


def _chunk(tensor: Tensor, side: Side, bounds: tuple[int, int]) -> Tensor:
    start, stop = bounds
    return tensor[start:stop] if side is Side.RIGHT else tensor[:, start:stop]


def _init_matrix_state(group: dict[str, Any], flat: Tensor, plan: MatrixPlan, rank: int, shard: bool) -> dict[str, Any]:
    side = resolve_side(group["proj_type"], plan.shape)
    rank_r = effective_rank(group["rank"], plan.shape)
    moment_shape = lowrank_shape(plan.shape, rank_r, side)
    state: dict[str, Any] = {}
    bounds = _shard_range(plan, rank, side, moment_shape) if shard else None
    if bounds is not None:
        state[SHARD] = torch.tensor(bounds, dtype=torch.int64)
        extent = bounds[1] - bounds[0]
        moment_shape = (extent, moment_shape[1]) if side is Side.RIGHT else (moment_shape[0], extent)
    left_shape, right_shape = basis_shapes(plan.shape, rank_r, side)
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


def _new_projector(group: dict[str, Any], grad: Tensor, state: dict[str, Any], side: Side) -> list[Tensor]:
    """The owner's new projector tensors from the full gradient, in the order of :func:`_projector_keys`."""
    left_key, right_key = _projector_keys(group)
    if group["projector"] == "dct":
        return [
            select_dct_indices(grad, state[key].numel(), one_side, group["scoring"])
            for key, one_side in ((left_key, Side.LEFT), (right_key, Side.RIGHT))
            if key in state
        ]
    rank_r = (state[left_key] if left_key in state else state[right_key].T).shape[1]
    return [basis for basis in svd_basis(grad, rank_r, side) if basis is not None]


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
        optimizer._warn_nonfinite_once()
        if step == 0:
            return False
    new: dict[str, list[Tensor]] = {}
    for mp in held:
        if mp.holders[0] == comm.rank and finite[mp.name]:
            side = resolve_side(group["proj_type"], mp.shape)
            new[mp.name] = _new_projector(group, grads[mp.name], matrices[mp.name], side)
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
                state = matrices[mp.name]
                pieces, start = [], offset
                for key in _projector_keys(group):
                    if key in state:
                        pieces.append(shared[start : start + state[key].numel()].view(state[key].shape))
                        start += state[key].numel()
                new[mp.name] = pieces
            offset += size
    for mp in held:
        if mp.name in new:
            _install_projector(group, matrices[mp.name], new[mp.name], step)
    return True


def _projector_numel(group: dict[str, Any], mp: MatrixPlan) -> int:
    side = resolve_side(group["proj_type"], mp.shape)
    rank_r = effective_rank(group["rank"], mp.shape)
    if group["projector"] == "dct":
        return rank_r * (2 if side is Side.FULL else 1)
    left, right = basis_shapes(mp.shape, rank_r, side)
    return sum(math.prod(shape) for shape in (left, right) if shape is not None)


def _step_partition(optimizer: GaLoreAdamW, group: dict[str, Any], flat: Tensor, part: _Partition) -> None:
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
    if step % group["update_proj_gap"] == 0 and not _refresh(optimizer, group, flat, part, matrices, step):
        return
    moment_dtype = group["moment_dtype"] or flat.dtype
    held = [mp for mp in plan.matrices if mp.piece is not None]
    split = [mp for mp in plan.matrices if mp.split]
    sides = {mp.name: resolve_side(group["proj_type"], mp.shape) for mp in plan.matrices}
    shapes = {
        mp.name: lowrank_shape(mp.shape, effective_rank(group["rank"], mp.shape), sides[mp.name]) for mp in plan.matrices
    }
    blocks = {mp.name: _block(flat.grad, mp) for mp in held}
    subspaces = {mp.name: _subspace(group, matrices[mp.name], mp, sides[mp.name], flat) for mp in held}

    # R: local partial projections, summed over the holders of split matrices in one bucket.
    lowranks: dict[str, Tensor] = {}
    buffer = flat.new_zeros(sum(math.prod(shapes[mp.name]) for mp in split))
    split_views = _views(buffer, split, shapes)
    for mp in held:
        r0, r1, _ = _rows(mp)
        partial = project(blocks[mp.name], _restrict(subspaces[mp.name], r0, r1))
        if not mp.split:
            lowranks[mp.name] = partial.to(moment_dtype)
        elif sides[mp.name] is Side.RIGHT:
            split_views[mp.name][r0:r1] = partial
        else:
            split_views[mp.name].copy_(partial)
    if split:
        comm.all_reduce(buffer)
        for mp in split:
            if mp.piece is not None:
                lowranks[mp.name] = split_views[mp.name].to(moment_dtype)

    # Adam in low-rank space, on the whole R or on this holder's chunk of it.
    beta1, beta2 = group["betas"]
    normalized: dict[str, Tensor] = {}
    sharded = [mp for mp in split if mp.piece is not None and SHARD in matrices[mp.name]]
    for mp in held:
        mstate = matrices[mp.name]
        lowrank = lowranks[mp.name]
        if SHARD in mstate:
            lowrank = _chunk(lowrank, sides[mp.name], tuple(mstate[SHARD].tolist()))
        exp_avg, exp_avg_sq = mstate[EXP_AVG], mstate[EXP_AVG_SQ]
        exp_avg.mul_(beta1).add_(lowrank, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(lowrank, lowrank, value=1.0 - beta2)
        update = exp_avg_sq.sqrt().add_(group["eps"])
        normalized[mp.name] = torch.div(exp_avg, update, out=update)
    # The same list on every rank: split one-sided matrices, when moments are sharded.
    gathered = [mp for mp in split if part.shard_moments and sides[mp.name] is not Side.FULL]
    if gathered:
        # Reassemble N from the holders' chunks (each element written by exactly one holder).
        buffer = torch.zeros(sum(math.prod(shapes[mp.name]) for mp in gathered), dtype=moment_dtype, device=flat.device)
        views = _views(buffer, gathered, shapes)
        for mp in sharded:
            _chunk(views[mp.name], sides[mp.name], tuple(matrices[mp.name][SHARD].tolist())).copy_(normalized[mp.name])
        comm.all_reduce(buffer)
        for mp in sharded:
            normalized[mp.name] = views[mp.name]

    step_size = _step_size(group["lr"], beta1, beta2, step + 1, group["correct_bias"])
    if "residual" in group:
        _apply_fira(group, flat, part, matrices, held, split, sides, blocks, subspaces, lowranks, normalized, step, step_size)
    else:
        for mp in held:
            piece = mp.piece
            values = flat[piece.flat_start : piece.flat_start + piece.numel]
            r0, r1, _ = _rows(mp)
            sub = _restrict(subspaces[mp.name], r0, r1)
            rows = _rows_of(normalized[mp.name], sides[mp.name], r0, r1)
            # Update the row block that holds the piece, so that each element sees the same addmm as dense.
            target = _block(flat, mp)
            add_project_back_(target, rows, sub, alpha=-step_size * group["scale"])
            if not _whole(mp):
                values.copy_(_fragment(target, mp))
    if group["weight_decay"] > 0.0:
        for mp in held:
            values = flat[mp.piece.flat_start : mp.piece.flat_start + mp.piece.numel]
            values.add_(values, alpha=-group["lr"] * group["weight_decay"])
    state[STEP] += 1


def _views(buffer: Tensor, plans: list[MatrixPlan], shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    views, offset = {}, 0
    for mp in plans:
        size = math.prod(shapes[mp.name])
        views[mp.name] = buffer[offset : offset + size].view(shapes[mp.name])
        offset += size
    return views


def _apply_fira(
    group: dict[str, Any],
    flat: Tensor,
    part: _Partition,
    matrices: dict[str, dict[str, Any]],
    held: list[MatrixPlan],
    split: list[MatrixPlan],
    sides: dict[str, Side],
    blocks: dict[str, Tensor],
    subspaces: dict[str, Subspace],
    lowranks: dict[str, Tensor],
    normalized: dict[str, Tensor],
    step: int,
    step_size: float,
) -> None:
    """Fira's update on each piece: residual on the row block, limiter on the whole matrix's norm."""
    subtract, residual_scale = fira_coefficients(group["alpha"], group["residual"])
    residuals: dict[str, Tensor] = {}
    for mp in held:
        r0, r1, _ = _rows(mp)
        side = sides[mp.name]
        residuals[mp.name] = fira_residual(
            blocks[mp.name],
            _rows_of(lowranks[mp.name], side, r0, r1),
            _rows_of(normalized[mp.name], side, r0, r1),
            _restrict(subspaces[mp.name], r0, r1),
            subtract=subtract,
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
        r0, r1, _ = _rows(mp)
        residual = residuals[mp.name]
        limit_norm_growth_(
            residual, matrices[mp.name][RESIDUAL_NORM], gamma=group["gamma"], first=step == 0, norm=norms.get(mp.name)
        )
        if residual_scale != 1.0:
            residual.mul_(residual_scale)
        update = add_project_back_(
            residual,
            _rows_of(normalized[mp.name], sides[mp.name], r0, r1),
            _restrict(subspaces[mp.name], r0, r1),
            alpha=group["alpha"],
        )
        values = flat[mp.piece.flat_start : mp.piece.flat_start + mp.piece.numel]
        values.add_(_fragment(update, mp), alpha=-step_size)
