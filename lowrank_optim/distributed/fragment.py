"""The fragment layout: low-rank optimizer steps on pieces of matrices held in flat partitions.

Projections are linear, so the ranks holding pieces of one ``m x n`` matrix combine *partial*
projections. A rank holding elements ``[a, b)`` of the row-major matrix covers rows ``r0..r1``; it
zero-pads its piece to that row block ``G_k`` and computes, with ``P`` the basis,

    right side (P r x n):  R_k = G_k Pᵀ placed at rows r0..r1 of an m x r zero matrix
    left side  (P m x r):  R_k = P[r0:r1]ᵀ G_k                 (r x n)
    full:                  R_k = P_l[r0:r1]ᵀ G_k P_rᵀ            (r x r)

and ``R = Σ_k R_k`` exactly (the pieces are disjoint). Per param group and step the ranks all-reduce one
bucket of these ``r``-sized partial projections; the full gradient crosses the wire only at refresh
steps, where the owner (one holder per matrix, chosen to balance the work: :func:`_refresh_owners`)
computes the SVD basis or the DCT selection from the summed, zero-padded gradient and shares it by a
second all-reduce (everyone else contributes zeros, so all
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

8-bit moments (``moment_format``, :mod:`lowrank_optim.optim.moments`) quantize blocks along stored rows, so
a holder must keep whole stored rows. A sharded right-side matrix's holder keeps rows of ``R`` (its codes
and scales are rows too); a left-side one keeps columns of ``R``, which 8-bit moments store transposed
(``columns_first``), so its columns are stored rows. Full-rank partitions cut parameters anywhere; with
8-bit moments they are stepped per parameter piece (:meth:`FragmentLayout._piece_blocks`): a piece keeps
the stored rows (of a 1-D moment: the blocks) its elements touch. A row cut between two holders is kept
by both; one all-reduce of the cut rows' gradients per partition and step (at most a row per cut)
completes it, and both compute the same codes and scales for it. So every block, and every code, is the
whole-tensor optimizer's, and the name-keyed state (:mod:`.checkpoint`) is that optimizer's state.

The arithmetic is the optimizers' own step (:func:`~lowrank_optim.optim.galore_adamw`), run on each
piece's row block: this layout supplies the blocks (:meth:`FragmentLayout.blocks`) and the collectives
above (an :class:`~lowrank_optim.optim.exchange.Exchange`, one collective per phase and partition). A rank
whose partition holds no element of any matrix (only padding) still takes part, with one empty block.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence, cast

import torch
from torch import Tensor

from ..optim.exchange import LOCAL, Elsewhere, Exchange, LocalExchange, RefreshGradients, refresh_due
from ..optim.layout import Block, DenseLayout, StateInit
from ..optim.moments import FullPrecision, MomentFormat
from ..optim.ranks import AUTO, spectrum_of
from ..projection import (
    ProjectorTensor,
    Side,
    Subspace,
    all_finite,
    effective_rank,
    keeps_aligned,
    nonfinite_flag,
    refresh_specs,
    resolve_side,
    rotates,
)
from ..state_keys import BASIS_RIGHT, MATRIX_RANK, STEP
from .comm import Communicator
from .plan import MatrixPlan, PartitionPlan, Piece

__all__ = ["FragmentLayout", "MATRICES", "RANKS", "SHARD"]


#: Key of a flat partition's state holding the per-matrix state dicts, keyed by parameter name.
MATRICES = "matrices"
#: Key of a sharded matrix's state: ``[start, stop)`` of its moment rows (right side) or columns (left).
SHARD = "shard"
#: Key of a ``rank="auto"`` flat partition's state: ``{name: rank}`` of every matrix of its plan, held here or
#: not (the partition's collectives are sized by every matrix's rank; the held ones' ``matrix_rank`` agree).
RANKS = "ranks"


@dataclass(frozen=True, kw_only=True)
class _Partition:
    """What the layout knows about one flat partition: its plan, its process group, the index of the
    optimizer's param group it belongs to, and whether the moments of split matrices are sharded among
    their holders."""

    plan: PartitionPlan
    comm: Communicator
    group_index: int
    shard_moments: bool
    #: This partition's flat gradient before its own step is prepared (ZeRO-3: a later sub-group's reduced
    #: gradient), for a ``rank="auto"`` group cut into several partitions (:meth:`_Exchange.spectra`).
    gradient: Callable[[], Tensor | None] | None = field(default=None, compare=False)


#: What :meth:`FragmentLayout.blocks` hands the step's exchange of a partition: its step counter, the
#: (matrix, block) pairs it handed out (``None``: the empty placeholder block) and, in a ``rank="auto"``
#: group, its rank table (:data:`RANKS`, updated in place by a refresh that changes ranks).
_Pending = tuple[int, list[tuple[MatrixPlan | None, Tensor]], dict[str, int] | None]


class _Matrix(NamedTuple):
    """What the optimizer's state initialization sees of one matrix of a partition: its whole shape, the
    partition's dtype and device, and (for :meth:`FragmentLayout.new_state`) how its state is cut."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    plan: MatrixPlan | None  # None: the empty placeholder of a rank that holds only padding
    rank: int
    side: Side
    r: int
    sharded: bool

    @property
    def ordinal(self) -> int | None:
        """The matrix's position among the optimizer's parameters (:attr:`MatrixPlan.ordinal`)."""
        return None if self.plan is None else self.plan.ordinal


class FragmentLayout:
    """Steps projected param groups whose tensors are flat partitions described by :class:`PartitionPlan`.

    Groups without ``rank`` are elementwise Adam on the flat tensor (the dense path), or, with quantized
    moments, on each parameter's piece (:meth:`_piece_blocks`). A projected group holding a tensor this
    layout was not bound to raises.
    """

    #: Quantized moments (``optim.layout.DenseLayout``): a sharded matrix's holder keeps whole stored rows of
    #: its moments (right side: rows of ``R``; left side: columns of ``R``, which quantized moments store as
    #: rows, ``columns_first``); a full-rank parameter's piece keeps whole rows (or 1-D blocks), a cut one
    #: on both of its holders.
    steps_quantized_moments = True
    #: ``rank="auto"``: every rank of a partition keeps every matrix's rank (:data:`RANKS`), allocates over all
    #: of them from spectra the refresh owners share (:meth:`_Exchange.spectra`), and rebuilds the state of
    #: the pieces it holds (:meth:`rebuilt_state`). A group cut into several partitions stepped in separate
    #: calls (ZeRO-3 sub-groups) is allocated as a whole at its first partition's refresh, from every
    #: partition's gradient (:meth:`_Exchange._group_spectra`).
    steps_adaptive_ranks = True

    def __init__(self) -> None:
        self._partitions: dict[int, tuple[Tensor, _Partition]] = {}
        self._full_rank: dict[int, tuple[Tensor, _Partition]] = {}
        self._dense = DenseLayout()
        #: The blocks handed out since the last exchange, per flat partition (for the exchange).
        self._pending: dict[int, _Pending] = {}
        #: Quantized full-rank partitions: the pieces handed out as copies since the last exchange.
        self._piece_copies: dict[int, list[tuple[Piece, _Span, Tensor]]] = {}
        #: rank="auto" groups cut into several partitions: per group index, the spectra of all its matrices
        #: (``None``: not refreshing) and the ranks chosen from them, each with the step it belongs to
        #: (:meth:`_token`).
        self._group_spectra: dict[int, tuple[Any, dict[str, Tensor | None]]] = {}
        self._group_choice: dict[int, tuple[Any, dict[str, int]]] = {}
        self._round: dict[int, int] = {}
        self._last_position: dict[int, int] = {}
        #: What identifies the training step across the calls that step a group's partitions (bind: the
        #: engine's ``global_steps``); the partitions' binding order identifies it otherwise (:meth:`_token`).
        self.step_token: Callable[[], Any] | None = None
        self._optimizer: Any = None

    def add_partition(
        self,
        flat: Tensor,
        plan: PartitionPlan,
        comm: Communicator,
        *,
        group_index: int,
        shard_moments: bool,
        gradient: Callable[[], Tensor | None] | None = None,
    ) -> None:
        """Register ``flat`` (the tensor the optimizer will find in its projected param group
        ``group_index``) with its plan. ``gradient``: where ``flat``'s gradient is before its own step (a
        ``rank="auto"`` group of several partitions, stepped one at a time, needs all their gradients at
        the first; ``flat.grad`` is used where it is set)."""
        # Keyed by id, with a reference kept so that the id cannot be reused by another tensor.
        entry = _Partition(
            plan=plan, comm=comm, group_index=group_index, shard_moments=shard_moments, gradient=gradient
        )
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

    def _siblings(self, group_index: int) -> list[tuple[Tensor, _Partition]]:
        """The partitions of one param group, in binding order (ZeRO-3 steps its sub-groups in that order)."""
        return [(flat, part) for flat, part in self._partitions.values() if part.group_index == group_index]

    def _state_of(self, flat: Tensor) -> dict[str, Any] | None:
        optimizer = self._optimizer() if self._optimizer is not None else None
        if optimizer is None:
            raise RuntimeError(
                "FragmentLayout: not attached to an optimizer (attach(optimizer)); a rank='auto' group of several "
                "partitions reads the state of the partitions it is not stepping."
            )
        return optimizer.state.get(flat)

    def _token(self, group_index: int) -> Any:
        """The step a split group's partitions are in: a new one starts when a partition steps that is not
        after the last one stepped in binding order (ZeRO-3 steps them in that order, once each), and, where
        bind gives one, when the engine's step count moves (a step in which the first partitions did not
        step at all)."""
        return (self._round.get(group_index, 0), None if self.step_token is None else self.step_token())

    def _table(self, flat: Tensor) -> dict[str, int] | None:
        """A partition's rank table as its state holds it now (``None`` before its first step)."""
        state = self._state_of(flat)
        return None if not state else state.get(RANKS)

    def _step_count(self, flat: Tensor) -> int:
        """A partition's step counter as its state holds it now (0 before its first step)."""
        state = self._state_of(flat)
        return int(state[STEP].item()) if state else 0

    def full_rank_partitions(self) -> list[tuple[Tensor, _Partition]]:
        """``(flat, partition)`` of the full-rank groups, in binding order."""
        return list(self._full_rank.values())

    @property
    def communicators(self) -> list[Communicator]:
        """The distinct communicators of the bound partitions (for counting communication)."""
        seen: dict[int, Communicator] = {}
        for _, partition in [*self._partitions.values(), *self._full_rank.values()]:
            seen.setdefault(id(partition.comm), partition.comm)
        return list(seen.values())

    def attach(self, optimizer: Any) -> None:
        """Make ``optimizer`` step through this layout and keep its nested state dtypes across loading."""
        optimizer.layout = self
        # Weakly: the optimizer holds this layout. Read for other partitions' rank tables (split groups).
        self._optimizer = weakref.ref(optimizer)
        self._held: list[tuple[Tensor, str, str, Tensor]] = []
        optimizer.register_load_state_dict_pre_hook(self._hold_integers)
        optimizer.register_load_state_dict_post_hook(self._restore_dtypes)

    def _hold_integers(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        """torch's loader casts every nested tensor, integer or not, to the flat fp32 partition's dtype, which
        a seed (up to 2^63) does not survive: the matrices' integer tensors (seeds, DCT indices, shard
        bounds) are taken out of the incoming state dict (a shallow copy: the caller's is not changed) and
        put back as they were by :meth:`_restore_dtypes`. Saved ids pair with the current tensors in group
        order, as the loader pairs them."""
        saved = itertools.chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        current = itertools.chain.from_iterable(group["params"] for group in optimizer.param_groups)
        tensor_of = dict(zip(saved, current))
        self._held = []
        state = {}
        for pid, param_state in state_dict["state"].items():
            flat = tensor_of.get(pid)
            matrices = param_state.get(MATRICES) if isinstance(param_state, dict) else None
            if flat is None or not self._bound(flat) or not isinstance(matrices, dict):
                state[pid] = param_state
                continue
            kept_matrices = {}
            for name, matrix in matrices.items():
                kept = {}
                for key, value in matrix.items():
                    if isinstance(value, Tensor) and not (value.is_floating_point() or value.is_complex()):
                        self._held.append((flat, name, key, value))
                    else:
                        kept[key] = value
                kept_matrices[name] = kept
            state[pid] = {**param_state, MATRICES: kept_matrices}
        return {**state_dict, "state": state}

    def _bound(self, flat: Tensor) -> bool:
        """Whether ``flat`` is a partition this layout was bound to (projected or full-rank)."""
        return id(flat) in self._partitions or id(flat) in self._full_rank

    def _restore_dtypes(self, optimizer: Any) -> None:
        # The integer tensors held back from the loader (seeds, DCT indices, shard bounds, 8-bit codes) go
        # back unchanged (on the partition's device); every other tensor is cast back to the dtype the
        # optimizer keeps it in (its ``_intended_state_dtype``: moments in moment_dtype, fp32 -> bf16 of a
        # bf16 value being exact; 8-bit scales and limiter norms in fp32; DCT indices in int64). (The state is
        # walked directly: ZeRO-3 empties the groups' params outside its step.)
        for flat, name, key, value in self._held:
            optimizer.state[flat][MATRICES][name][key] = value.to(device=flat.device)
        self._held = []
        for flat, part in [*self._partitions.values(), *self._full_rank.values()]:
            group = optimizer.param_groups[part.group_index]
            matrices = optimizer.state.get(flat, {}).get(MATRICES, {})
            for mp in part.plan.matrices:
                matrix = matrices.get(mp.name)
                if matrix is None:
                    continue
                like = torch.empty(mp.shape, dtype=flat.dtype, device="meta")
                for key, value in matrix.items():
                    # The matrix's own state says its rank (rank="auto": its moments' shape, hence their format).
                    dtype = torch.int64 if key == SHARD else optimizer._intended_state_dtype(group, like, key, matrix)
                    if dtype is not None and value.dtype != dtype:
                        matrix[key] = value.to(dtype)

    def check_group(self, optimizer: Any, group: dict[str, Any]) -> bool:
        """Every tensor of a projected group must be a partition this layout was bound to (its nested
        state is built here); a full-rank group's flat partitions are checked as whole tensors."""
        if "rank" not in group:
            if not _quantizing(group):
                return self._dense.check_group(optimizer, group)
            bound = self._full_rank  # quantized: the nested state of pieces is built here
        else:
            bound = self._partitions
        for position, flat in enumerate(group["params"]):
            if id(flat) not in bound:
                raise RuntimeError(
                    f"{type(optimizer).__name__}: tensor {position} (shape {tuple(flat.shape)}) of a "
                    f"{'projected' if 'rank' in group else 'quantized full-rank'} param group is not a partition "
                    "this optimizer was bound to. Bind after deepspeed.initialize "
                    "(lowrank_optim.deepspeed.bind(engine)) and do not rebuild the optimizer's groups afterwards."
                )
        return False

    def begin_step(self, groups: list[dict[str, Any]]) -> Tensor | None:
        """Decide, alike on every rank, whether this ``step()`` meets a NaN/Inf gradient (groups with
        ``nonfinite="skip"``): then no rank updates anything of the groups it steps, as DeepSpeed itself
        skips a step on fp16 overflow. DeepSpeed's ZeRO calls ``step()`` once per param group (sub-group at
        ZeRO-3), so there the decision is per group. Matrices are cut between ranks, so a per-matrix
        decision would need the flags of all their pieces; one flag costs one pass over the gradient
        partitions and one all-reduce of a single number per process group."""
        bound = [*self._partitions.values(), *self._full_rank.values()]
        skipping = [group for group in groups if group["nonfinite"] == "skip"]
        if not skipping or not bound:
            return None
        count = torch.zeros((), dtype=torch.float32, device=bound[0][0].device)
        for group in skipping:
            for flat in group["params"]:
                if flat.grad is not None:
                    count += nonfinite_flag(flat.grad)
        # One all-reduce per process group (partitions of one group may have communicators of their own;
        # the first bound one, a projected partition's where there is one, carries it), in binding order,
        # which is the same on every rank.
        groups_seen: dict[int, Communicator] = {}
        for _, part in bound:
            groups_seen.setdefault(id(getattr(part.comm, "group", part.comm)), part.comm)
        for comm in groups_seen.values():
            comm.all_reduce(count)
        return count > 0

    def blocks(self, group: dict[str, Any], tensor: Tensor, state: dict[str, Any], init: StateInit) -> list[Block]:
        """A full-rank group's flat partition is one tensor; a projected one yields the zero-padded row
        block of every matrix piece it holds (a view where the piece is a whole matrix), or one empty
        block when it holds none, so that this rank still takes part in the partition's collectives."""
        if "rank" not in group:
            if _quantizing(group):
                return self._piece_blocks(group, tensor, state, init)
            return self._dense.blocks(group, tensor, state, init)
        part = self._partitions[id(tensor)][1]
        if group["rank"] == AUTO:
            siblings = self._siblings(part.group_index)
            if len(siblings) > 1:
                position = next(k for k, (flat, _) in enumerate(siblings) if flat is tensor)
                if position <= self._last_position.get(part.group_index, -1):  # a new step of the group
                    self._round[part.group_index] = self._round.get(part.group_index, 0) + 1
                self._last_position[part.group_index] = position
        if not state:
            state[STEP] = torch.tensor(0.0, dtype=torch.float32)
            if group["rank"] == AUTO:  # rank 0 (no state) until the first refresh allocates one
                state[RANKS] = {mp.name: 0 for mp in part.plan.matrices}
            table = state.get(RANKS)
            state[MATRICES] = {
                mp.name: _init_matrix_state(init, group, tensor, mp, part, None if table is None else table[mp.name])
                for mp in part.plan.matrices
                if mp.piece is not None
            }
        matrices = state[MATRICES]
        blocks: list[Block] = []
        pending: list[tuple[MatrixPlan | None, Tensor]] = []
        for mp in part.plan.matrices:
            if mp.piece is None:
                continue
            block = _block(tensor, mp)
            # The optimizer asks for the blocks of parameters that have a gradient only.
            blocks.append(Block(block, _block(cast(Tensor, tensor.grad), mp), matrices[mp.name], state[STEP], mp.shape))
            pending.append((mp, block))
        if not blocks:
            # The optimizer's own state of a 0 x 0 matrix (its moments, projector tensors and limiter
            # norm, as empty as they get): whatever the optimizer keeps, the placeholder has it too.
            side = resolve_side(group["proj_type"], (0, 0))
            like = _Matrix((0, 0), tensor.dtype, tensor.device, None, part.comm.rank, side, 0, False)
            placeholder: dict[str, Any] = {}
            init(like, placeholder)
            placeholder.pop(STEP, None)
            empty = tensor.new_zeros(0, 0)
            blocks.append(Block(empty, tensor.new_zeros(0, 0), placeholder, state[STEP], (0, 0)))
            pending.append((None, empty))
        self._pending[id(tensor)] = (int(state[STEP].item()), pending, state.get(RANKS))
        return blocks

    def rebuilt_state(
        self, group: dict[str, Any], tensor: Tensor, state: dict[str, Any], local: dict[str, Any], rank: int, rebuild: StateInit
    ) -> dict[str, Any]:
        """The matrix piece whose state is ``local`` rebuilt at ``rank`` (its shares follow the new rank)."""
        part = self._partitions[id(tensor)][1]
        name = next(name for name, matrix in state[MATRICES].items() if matrix is local)
        mp = next(mp for mp in part.plan.matrices if mp.name == name)
        side = resolve_side(group["proj_type"], mp.shape)
        sharded = _sharded(part, mp, side)
        like = _Matrix(tuple(mp.shape), tensor.dtype, tensor.device, mp, part.comm.rank, side, rank, sharded)
        rebuild(like, local)
        if sharded:
            local[SHARD] = torch.tensor(_my_shard(mp, part.comm.rank, side, rank).moments, dtype=torch.int64)
        return local

    def _piece_blocks(self, group: dict[str, Any], flat: Tensor, state: dict[str, Any], init: StateInit) -> list[Block]:
        """A full-rank partition with quantized moments: one block per parameter piece it holds, covering the
        stored rows (blocks, for a 1-D moment) of the moments its elements touch (:class:`_Span`). A row cut
        between two holders is kept, and stepped, by both: its gradient is completed by one all-reduce of
        the cut rows (every rank takes part, alike), each holder computes the same codes and scales for it,
        and each writes back only its own elements. So the quantization blocks are the whole-tensor
        optimizer's, and its state, step for step."""
        if id(flat) not in self._full_rank:
            raise RuntimeError(
                f"tensor of shape {tuple(flat.shape)} in a quantized full-rank param group is not a partition this "
                "optimizer was bound to; bind after deepspeed.initialize (lowrank_optim.deepspeed.bind(engine))."
            )
        part = self._full_rank[id(flat)][1]
        fmt: MomentFormat = group["moment_format"]
        held = [mp for mp in part.plan.matrices if mp.piece is not None]
        if not state:
            state[STEP] = torch.tensor(0.0, dtype=torch.float32)
            state[MATRICES] = {}
            for mp in held:
                piece_state: dict[str, Any] = {}
                init(_Piece(tuple(mp.shape), flat.dtype, flat.device, _span(mp, fmt)), piece_state)
                piece_state.pop(STEP, None)  # the partition keeps one step counter for all its pieces
                state[MATRICES][mp.name] = piece_state
        grad = cast(Tensor, flat.grad)  # the optimizer asks for the blocks of tensors that have a gradient
        # Every parameter of the plan, held here or not: the cut units are the same list on every rank.
        cuts = [(mp, unit, _span(mp, fmt, 0, 0).unit_elements(unit)) for mp in part.plan.matrices
                for unit in _span(mp, fmt, 0, 0).cut_units(mp)]
        buffer = grad.new_zeros(sum(e1 - e0 for _, _, (e0, e1) in cuts))
        offsets, offset = [], 0
        for mp, _, (e0, e1) in cuts:
            offsets.append(offset)
            if mp.piece is not None:
                lo, hi = max(e0, mp.piece.param_start), min(e1, mp.piece.param_start + mp.piece.numel)
                if lo < hi:
                    source = mp.piece.flat_start + lo - mp.piece.param_start
                    buffer[offset + lo - e0 : offset + hi - e0] = grad[source : source + hi - lo]
            offset += e1 - e0
        if cuts:
            part.comm.all_reduce(buffer)
        blocks, copies = [], []
        for mp in held:
            piece = cast(Piece, mp.piece)
            span = _span(mp, fmt)
            values = flat[piece.flat_start : piece.flat_start + piece.numel]
            own = grad[piece.flat_start : piece.flat_start + piece.numel]
            if span.exact:  # its elements are whole stored rows: step them in place
                piece_state = state[MATRICES][mp.name]
                blocks.append(Block(values.view(span.shape), own.view(span.shape), piece_state, state[STEP], mp.shape))
                continue
            e0 = span.elements[0]
            param_block, grad_block = flat.new_zeros(span.shape), grad.new_zeros(span.shape)
            start = piece.param_start - e0
            param_block.view(-1)[start : start + piece.numel] = values
            grad_block.view(-1)[start : start + piece.numel] = own
            for (cut_mp, unit, _), at in zip(cuts, offsets):
                u0, u1 = span.units
                if cut_mp is mp and u0 <= unit < u1:
                    c0, c1 = span.unit_elements(unit)
                    grad_block.view(-1)[c0 - e0 : c1 - e0] = buffer[at : at + c1 - c0]
            blocks.append(Block(param_block, grad_block, state[MATRICES][mp.name], state[STEP], mp.shape))
            copies.append((piece, span, param_block))
        self._piece_copies[id(flat)] = copies
        return blocks

    def new_state(
        self, like: Any, shape: Sequence[int], dtype: torch.dtype, sharding: str, *, column_major: bool = False
    ) -> Tensor:
        """Whole state tensors (row-major), or this holder's share of a sharded matrix's (module docstring)."""
        if isinstance(like, _Piece):  # a parameter's piece in a full-rank partition with quantized moments
            return torch.zeros(like.span.local_shape(shape), dtype=dtype, device=like.device)
        if not isinstance(like, _Matrix):  # a full-rank group's flat partition
            return self._dense.new_state(like, shape, dtype, sharding, column_major=column_major)
        if not like.sharded or sharding == "replicated":
            return torch.zeros(tuple(shape), dtype=dtype, device=like.device)
        assert like.plan is not None  # only the empty placeholder has no plan, and it is never sharded
        mine = _my_shard(like.plan, like.rank, like.side, like.r)
        if sharding == "rows":  # right side: the moment rows it owns; left side: the basis rows it touches
            # (Quantized moments' codes and scales are rows of the moment too: their blocks run along rows.)
            start, stop = mine.moments if like.side is Side.RIGHT else mine.basis
            return torch.zeros(stop - start, *shape[1:], dtype=dtype, device=like.device)
        if sharding == "columns_first":  # a left side's quantized moments, stored transposed: its columns as rows
            start, stop = mine.moments
            return torch.zeros(stop - start, *shape[1:], dtype=dtype, device=like.device)
        if like.side is Side.LEFT:  # its even share of R's columns
            start, stop = mine.moments
            return torch.zeros(shape[0], stop - start, dtype=dtype, device=like.device)
        start, stop = mine.basis  # right basis: its even share of the flattened r x n basis
        return torch.zeros(stop - start, dtype=dtype, device=like.device)

    def exchange(self, group: dict[str, Any], sources: list[Tensor]) -> Exchange:
        if "rank" not in group:
            if not _quantizing(group):
                return LOCAL
            flats = {id(flat): flat for flat in sources}  # one source per block: a partition appears once per piece
            return _PieceExchange([(flat, self._piece_copies.pop(key, [])) for key, flat in flats.items()])
        partitions, seen = [], set()
        for flat in sources:
            if id(flat) not in seen:
                seen.add(id(flat))
                partitions.append((flat, self._partitions[id(flat)][1], self._pending.pop(id(flat))))
        return _Exchange(group, partitions, self)


def _init_matrix_state(
    init: StateInit, group: dict[str, Any], flat: Tensor, mp: MatrixPlan, part: _Partition, rank: int | None = None
) -> dict[str, Any]:
    """The state of one matrix piece, built by the optimizer's own initialization (``init``) through
    :meth:`FragmentLayout.new_state`; a sharded one also records its moment range (``SHARD``). ``rank``: the
    matrix's rank in a ``rank="auto"`` group (its entry of :data:`RANKS`)."""
    side = resolve_side(group["proj_type"], mp.shape)
    rank_r = _rank_of(group, mp, rank)
    sharded = _sharded(part, mp, side)
    like = _Matrix(tuple(mp.shape), flat.dtype, flat.device, mp, part.comm.rank, side, rank_r, sharded)
    state: dict[str, Any] = {} if rank is None else {MATRIX_RANK: rank}
    if sharded:
        state[SHARD] = torch.tensor(_my_shard(mp, part.comm.rank, side, rank_r).moments, dtype=torch.int64)
    init(like, state)
    state.pop(STEP, None)  # the partition keeps one step counter for all its matrices
    return state


def _rank_of(group: dict[str, Any], mp: MatrixPlan, rank: int | None) -> int:
    """A matrix's rank: the group's (``min(rank, m, n)``), or in a ``rank="auto"`` group the one given."""
    if group["rank"] == AUTO:
        if rank is None:
            raise RuntimeError(f"matrix {mp.name!r} of a rank='auto' group has no entry in its partition's rank table")
        return rank
    return effective_rank(group["rank"], mp.shape)


def _rows(plan: MatrixPlan) -> tuple[int, int, int]:
    """``(r0, r1, offset)``: the rows a piece touches and where it starts in that row block."""
    n = plan.shape[1]
    piece = plan.piece
    assert piece is not None  # asked only of matrices this rank holds a piece of
    r0 = piece.param_start // n
    r1 = (piece.param_start + piece.numel - 1) // n + 1
    return r0, r1, piece.param_start - r0 * n


def _whole(plan: MatrixPlan) -> bool:
    assert plan.piece is not None  # asked only of matrices this rank holds a piece of
    return plan.piece.numel == plan.numel


def _block(flat: Tensor, plan: MatrixPlan) -> Tensor:
    """The piece of ``flat`` as its zero-padded row block (a view when the piece is the whole matrix)."""
    piece = plan.piece
    assert piece is not None  # asked only of matrices this rank holds a piece of
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
    assert plan.piece is not None  # asked only of matrices this rank holds a piece of
    return block.reshape(-1)[offset : offset + plan.piece.numel]


def _sharded(part: _Partition, mp: MatrixPlan, side: Side) -> bool:
    """Whether a matrix's low-rank state is split among its holders (one-sided projections only)."""
    return part.shard_moments and mp.split and side is not Side.FULL


def _quantizing(group: dict[str, Any]) -> bool:
    """Whether a group's moments may be quantized (a format other than full precision): a full-rank group's
    partitions are then stepped per piece, and a projected group's N travels in fp32."""
    return not isinstance(group.get("moment_format"), (FullPrecision, type(None)))


@dataclass(frozen=True)
class _Span:
    """How one parameter's piece in a quantized full-rank partition is stepped.

    The moments of a parameter are stored in *units*: the rows of a quantized moment of two or more
    dimensions (``unit`` = its last dimension, along which its blocks run), the blocks of a quantized 1-D
    moment (``unit`` = ``block_size``), single elements of plain moments (``unit`` = 1). A piece of the
    row-major parameter, elements ``[start, stop)``, keeps and steps the units it touches, ``units`` =
    ``[u0, u1)``, which cover the parameter's elements ``elements`` = ``[u0·unit, min(u1·unit, numel))``;
    a unit cut between two holders is kept by both (it is at most one row or block per cut).
    """

    numel: int
    unit: int
    rows: bool  # state tensors are rows of (numel / unit) x (last dimension) views
    start: int
    stop: int

    @property
    def units(self) -> tuple[int, int]:
        return self.start // self.unit, -(-self.stop // self.unit)

    @property
    def first(self) -> tuple[int, int]:
        """The units whose first element this piece holds (they partition the units among the holders)."""
        return -(-self.start // self.unit), -(-self.stop // self.unit)

    def unit_elements(self, unit: int) -> tuple[int, int]:
        return unit * self.unit, min((unit + 1) * self.unit, self.numel)

    @property
    def elements(self) -> tuple[int, int]:
        u0, u1 = self.units
        return u0 * self.unit, min(u1 * self.unit, self.numel)

    @property
    def exact(self) -> bool:
        """Whether the piece's elements are exactly whole units (no row or block is cut)."""
        return self.elements == (self.start, self.stop)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the step sees the piece (and its gradient and moments) in."""
        u0, u1 = self.units
        e0, e1 = self.elements
        return (u1 - u0, self.unit) if self.rows else (e1 - e0,)

    def kind(self, whole: Sequence[int]) -> str:
        """How a state tensor of whole shape ``whole`` maps onto units: ``rows`` (of a >= 2-D quantized
        moment's codes and scales), ``elements`` (1-D codes, plain moments) or ``scales`` (1-D scales)."""
        if self.rows:
            return "rows"
        return "elements" if math.prod(whole) == self.numel else "scales"

    def local_shape(self, whole: Sequence[int]) -> tuple[int, ...]:
        """The shape of this piece's part of a state tensor of whole shape ``whole``."""
        u0, u1 = self.units
        kind = self.kind(whole)
        if kind == "rows":
            return (u1 - u0, whole[-1])
        return (self.elements[1] - self.elements[0],) if kind == "elements" else (u1 - u0,)

    def select(self, tensor: Tensor, whole: Sequence[int], units: tuple[int, int], origin: int) -> Tensor:
        """The part of ``tensor`` holding ``units`` (a view): a whole state tensor (``origin`` 0) or this
        piece's local part (``origin`` = its first unit)."""
        k0, k1 = units[0] - origin, units[1] - origin
        kind = self.kind(whole)
        if kind == "rows":
            return tensor.reshape(-1, whole[-1])[k0:k1]
        if kind == "scales":
            return tensor.reshape(-1)[k0:k1]
        base = origin * self.unit
        return tensor.reshape(-1)[units[0] * self.unit - base : min(units[1] * self.unit, self.numel) - base]

    def cut_units(self, mp: MatrixPlan) -> list[int]:
        """The units of the parameter cut between two holders (alike on every rank: from the plan)."""
        if self.unit == 1:
            return []
        return sorted({start // self.unit for start in mp.starts[1:] if start % self.unit})


def _span(mp: MatrixPlan, fmt: MomentFormat, start: int | None = None, stop: int | None = None) -> _Span:
    """The span of the piece ``[start, stop)`` of a parameter (default: this rank's piece)."""
    if start is None or stop is None:
        assert mp.piece is not None  # asked only of parameters this rank holds a piece of
        start, stop = mp.piece.param_start, mp.piece.param_start + mp.piece.numel
    shape = tuple(mp.shape)
    if not fmt.quantizes(shape):
        return _Span(mp.numel, 1, False, start, stop)
    if len(shape) >= 2:
        return _Span(mp.numel, shape[-1], True, start, stop)
    return _Span(mp.numel, cast(Any, fmt).block_size, False, start, stop)


class _Piece(NamedTuple):
    """What the optimizer's state initialization sees of a parameter's piece in a quantized full-rank
    partition: its whole shape, the partition's dtype and device, and how its state is cut."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    span: _Span


class _PieceExchange(LocalExchange):
    """A quantized full-rank group's step: elementwise (the cut rows were completed by the layout), stepped
    in one batch (the pieces of a partition share one step counter); at the end, each piece stepped as a
    copy writes its own elements back into the flat partition."""

    batched = True

    def __init__(self, copies: list[tuple[Tensor, list[tuple[Piece, _Span, Tensor]]]]) -> None:
        self.copies = copies

    def finish(self) -> None:
        for flat, pieces in self.copies:
            for piece, span, block in pieces:
                start = piece.param_start - span.elements[0]
                flat[piece.flat_start : piece.flat_start + piece.numel].copy_(block.view(-1)[start : start + piece.numel])


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


def _local_projector(
    mp: MatrixPlan, part: _Partition, rank: int, side: Side, rank_r: int, specs: list[ProjectorTensor], whole: list[Tensor]
) -> list[Tensor]:
    """This holder's pieces of whole projector tensors: of a sharded matrix, its share of each tensor the
    projector keeps aligned with the matrix (:meth:`FragmentLayout.new_state`); all of the others."""
    if not _sharded(part, mp, side):
        return whole
    mine = _my_shard(mp, rank, side, rank_r)
    result = []
    for spec, tensor in zip(specs, whole):
        if spec.sharding == "replicated":
            result.append(tensor)
        elif side is Side.RIGHT:  # its even share of the flattened r x n basis
            result.append(tensor.reshape(-1)[mine.basis[0] : mine.basis[1]])
        else:  # the basis rows its piece touches
            result.append(tensor[mine.basis[0] : mine.basis[1]])
    return result


def _restrict(subspace: Subspace, r0: int, r1: int) -> Subspace:
    """The subspace acting on rows ``r0..r1`` of the matrix (only a left basis depends on rows)."""
    left = None if subspace.left is None else subspace.left[r0:r1]
    return Subspace(subspace.side, left, subspace.right)


def _rows_of(lowrank: Tensor, side: Side, r0: int, r1: int) -> Tensor:
    """The part of ``R`` or ``N`` that rows ``r0..r1`` of the matrix depend on."""
    return lowrank[r0:r1] if side is Side.RIGHT else lowrank


def _refresh_owners(plan: PartitionPlan, world_size: int) -> dict[str, int]:
    """Which holder computes each matrix's projector at a refresh (the same answer on every rank): the
    largest SVDs first, each to its least loaded holder. ZeRO-3 cuts every matrix over every rank, where
    "the lowest holder" would put all of them on rank 0."""
    loads = [0] * world_size
    owners: dict[str, int] = {}
    cost = {mp.name: mp.numel * min(mp.shape) for mp in plan.matrices}
    for mp in sorted(plan.matrices, key=lambda mp: (len(mp.holders) > 1, -cost[mp.name], mp.name)):
        owner = min(mp.holders, key=lambda k: (loads[k], k))
        owners[mp.name] = owner
        loads[owner] += cost[mp.name]
    return owners


def _all_reduce_tensors(
    comm: Communicator,
    device: torch.device,
    tensors: Sequence[Sequence[Tensor | None] | None],
    specs: list[list[ProjectorTensor]],
    default: torch.dtype,
) -> list[list[Tensor]]:
    """Sum, over ranks, lists of whole tensors of the given specs (``None``: contribute zeros), one bucket
    per dtype. Each tensor is written by one rank only, so the sum is exact and alike on every rank."""
    dtypes = sorted({spec.dtype or default for entry in specs for spec in entry}, key=str)
    result: list[list[Tensor | None]] = [[None] * len(entry) for entry in specs]
    for dtype in dtypes:
        slots = [(i, k) for i, entry in enumerate(specs) for k, spec in enumerate(entry) if (spec.dtype or default) == dtype]
        sizes = [math.prod(specs[i][k].shape) for i, k in slots]
        buffer = torch.zeros(sum(sizes), dtype=dtype, device=device)
        offset = 0
        for (i, k), size in zip(slots, sizes):
            entry = tensors[i]
            tensor = None if entry is None else entry[k]
            if tensor is not None:
                buffer[offset : offset + size] = tensor.reshape(-1).to(dtype)
            result[i][k] = buffer[offset : offset + size].view(specs[i][k].shape)
            offset += size
        comm.all_reduce(buffer)
    return cast("list[list[Tensor]]", result)  # every slot is in its dtype's bucket


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



class _Exchange:
    """The collectives of one step of a projected group's partitions (see the module docstring); index
    ``i`` of the step's lists is the ``i``-th block handed out, partition by partition."""

    batched = True  # each phase's collectives are bucketed over the group's matrices

    def __init__(
        self, group: dict[str, Any], partitions: list[tuple[Tensor, _Partition, _Pending]], layout: FragmentLayout
    ) -> None:
        self.group = group
        self.fira = "residual" in group
        # Whether the projector keeps its bases aligned with the matrix (sharded with a sharded matrix)
        # rather than replicated (DCT indices, whose bases are built whole): alike for a group's matrices.
        self.aligned = keeps_aligned(group["projector"])
        self.partitions = []  # (flat, part, {name: index of its block})
        self.entries: list[tuple[_Partition | None, MatrixPlan | None, Tensor]] = []
        self.steps = {id(part): step for _, part, (step, _, _) in partitions}
        #: rank="auto": each partition's rank table (RANKS), updated when a refresh changes ranks.
        self.tables = {id(part): table for _, part, (_, _, table) in partitions}
        for flat, part, (_, pending, _) in partitions:
            names = {}
            for mp, block in pending:
                if mp is not None:
                    names[mp.name] = len(self.entries)
                self.entries.append((part, mp, block))
            self.partitions.append((flat, part, names))
        self.sides = {}
        #: Every matrix's rank as its stored state has it; a rank="auto" refresh moves it to ``targets``
        #: once the new projectors are shared (the stored ones are gathered at the old ranks).
        self.ranks = {}
        for _, part, _ in self.partitions:
            table = self.tables[id(part)]
            for mp in part.plan.matrices:
                self.sides[mp.name] = resolve_side(group["proj_type"], mp.shape)
                self.ranks[mp.name] = _rank_of(group, mp, None if table is None else table[mp.name])
        self.targets: dict[str, int] = {}
        # rank="auto" with the group cut into several partitions stepped one at a time (ZeRO-3 sub-groups):
        # all of them, with the ranks the others hold, and the layout's per-step spectra of the group.
        self.layout = layout
        self.siblings: list[tuple[Tensor, _Partition]] = []
        self.sibling_ranks: dict[str, int] = {}
        self.token: Any = None
        if group["rank"] == AUTO and self.partitions:
            siblings = layout._siblings(self.partitions[0][1].group_index)
            if len(siblings) > 1:
                self.siblings = siblings
                self.token = layout._token(self.partitions[0][1].group_index)
                mine = {id(part) for _, part, _ in self.partitions}
                for flat, part in siblings:
                    if id(part) in mine:
                        continue
                    table = layout._table(flat)
                    for mp in part.plan.matrices:
                        self.sides[mp.name] = resolve_side(group["proj_type"], mp.shape)
                        self.sibling_ranks[mp.name] = 0 if table is None else table[mp.name]
        self._places: dict[str, int] | None = None  # _positions(), computed once
        self.row_lowranks: dict[str, Tensor] = {}  # sharded right side: R's rows of each block (for Fira)
        # The whole gradients, gathered once per step (RefreshGradients), and whether each matrix's was
        # finite, by name (for the matrices of the allocation held elsewhere).
        self.refresh_gradients = RefreshGradients(self._refresh_gradients)
        self._bad: dict[str, bool] = {}
        self._elsewhere: list[tuple[_Partition, MatrixPlan]] = []
        self._elsewhere_spectra: list[Tensor | None] = []

    # --- per matrix ----------------------------------------------------------------------------------

    def whole(self, index: int) -> bool:
        mp = self.entries[index][1]
        return mp is not None and not mp.split

    def shape(self, index: int, block: Tensor) -> tuple[int, int]:
        mp = self.entries[index][1]
        return (0, 0) if mp is None else cast("tuple[int, int]", tuple(mp.shape))  # a projected group: matrices

    def flags(self, indices: Sequence[int], flags: Sequence[Tensor]) -> list[Tensor]:
        # The group's one shared flag (FragmentLayout.begin_step, the step's found_inf) covers every piece.
        return [torch.zeros((), dtype=torch.bool, device=flag.device) for flag in flags]

    def _split(self, part: _Partition, predicate: Any = None) -> list[MatrixPlan]:
        return [mp for mp in part.plan.matrices if mp.split and (predicate is None or predicate(mp))]

    def _is_sharded(self, part: _Partition, mp: MatrixPlan) -> bool:
        return _sharded(part, mp, self.sides[mp.name])

    # --- refresh -------------------------------------------------------------------------------------

    def _whole_gradients(
        self, flat: Tensor, part: _Partition, grad: Tensor, alone_grads: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, bool]]:
        """One partition's refresh gather: the whole gradients of its split matrices (on every rank, one
        bucket all-reduce) and whether each of its matrices' gradients is finite, decided alike on every
        rank (``alone_grads``: the gradients of the matrices held whole here whose flags this rank writes)."""
        plan, comm = part.plan, part.comm
        split = self._split(part)
        alone = [mp for mp in plan.matrices if not mp.split]
        # One bucket: the zero-padded whole gradients of the split matrices, then one "not finite" slot
        # per matrix held whole by one rank (its holder writes it), so that all decide alike.
        buffer = flat.new_zeros(sum(mp.numel for mp in split) + len(alone))
        offset, full = 0, {}
        for mp in split:
            if mp.piece is not None:
                start = offset + mp.piece.param_start
                buffer[start : start + mp.piece.numel] = grad[mp.piece.flat_start : mp.piece.flat_start + mp.piece.numel]
            full[mp.name] = buffer[offset : offset + mp.numel].view(mp.shape)
            offset += mp.numel
        for slot, mp in enumerate(alone):
            if mp.name in alone_grads:
                buffer[offset + slot] = float(not all_finite(alone_grads[mp.name]))
        comm.all_reduce(buffer)
        bad = {mp.name: not all_finite(full[mp.name]) for mp in split}
        bad.update({mp.name: bool(buffer[offset + slot] > 0) for slot, mp in enumerate(alone)})
        # Deferred and skipped refreshes leave the partition's one step counter as it is, so they are
        # decided for the whole partition; a propagated one keeps only the bad matrices' projectors.
        keep_going = self.group["nonfinite"] == "propagate" and self._step_of(flat, part) > 0
        if any(bad.values()) and not keep_going:
            bad = dict.fromkeys(bad, True)
        return full, bad

    def _step_of(self, flat: Tensor, part: _Partition) -> int:
        """A partition's step counter: this step's, or (another partition of a split group, not stepped yet
        in this step) the one its state holds."""
        step = self.steps.get(id(part))
        return self.layout._step_count(flat) if step is None else step

    def _refresh_gradients(self, indices: Sequence[int], grads: Sequence[Tensor]) -> tuple[list[Tensor | None], list[bool]]:
        given = dict(zip(indices, grads))
        wholes: dict[int, Tensor | None] = {}
        finite: dict[int, bool] = {}
        for flat, part, names in self.partitions:
            plan, comm = part.plan, part.comm
            alone_grads = {
                mp.name: given[names[mp.name]]
                for mp in plan.matrices
                if not mp.split and mp.name in names and names[mp.name] in given
            }
            grad = cast(Tensor, flat.grad)  # a partition being stepped has its gradient
            full, bad = self._whole_gradients(flat, part, grad, alone_grads)
            self._bad.update(bad)
            owners = _refresh_owners(plan, comm.world_size)
            for mp in plan.matrices:
                index = names.get(mp.name)
                if index is None or index not in given:
                    continue
                finite[index] = not bad[mp.name]
                if owners[mp.name] != comm.rank:
                    wholes[index] = None
                else:
                    wholes[index] = full[mp.name] if mp.split else given[index]
            for index, (entry_part, entry_mp, _) in enumerate(self.entries):
                if entry_part is part and entry_mp is None and index in given:  # an empty block
                    finite[index], wholes[index] = not any(bad.values()), None
        return [wholes[i] for i in indices], [finite[i] for i in indices]

    def _group_spectra(self, given: dict[int, Tensor | None]) -> dict[str, Tensor | None]:
        """Every matrix's spectrum (``None``: its gradient is not finite) of a group cut into several
        partitions, computed once per step, at the first partition's refresh, and kept by the layout for
        the others: each partition's gradient (:attr:`_Partition.gradient` for those not stepped yet) is
        gathered as a refresh gathers it, the owners compute the spectra and one fp64 all-reduce per
        partition shares them (the partition being stepped uses its refresh's gather and the spectra the
        optimizer computed, ``given``). So every partition's step allocates over the same pool, the whole
        group's, and chooses the same ranks (checked in :meth:`assign_ranks`). The price: one more refresh
        gather, and spectrum, per later partition at a refresh step (its own step computes the spectra
        again, unused). The energies are fractions of each matrix's own energy, which the loss scale and
        the clipping factor (applied later to a partition not yet stepped) leave unchanged but for
        rounding."""
        group_index = self.siblings[0][1].group_index
        entry = self.layout._group_spectra.get(group_index)
        if entry is not None and entry[0] == self.token:
            return entry[1]
        cached: dict[str, Tensor | None] = {}
        names_of = {id(part): names for _, part, names in self.partitions}
        mine = {id(part) for _, part, _ in self.partitions}
        here = min(k for k, (_, part) in enumerate(self.siblings) if id(part) in mine)
        gap = self.group["update_proj_gap"]
        for position, (flat, part) in enumerate(self.siblings):
            # Only the partitions refreshing in this step: this one, and those still to step whose counter
            # says so (a partition that deferred a refresh, nonfinite="skip", lags its siblings by a step).
            # Those before this one in binding order had their turn: they stepped without a refresh (or they
            # would have computed these), or did not step at all.
            if id(part) not in mine and (position < here or not refresh_due(self.layout._step_count(flat), gap)):
                cached.update(dict.fromkeys((mp.name for mp in part.plan.matrices), None))
                continue
            plan, comm = part.plan, part.comm
            sizes = [min(mp.shape) for mp in plan.matrices]
            buffer = torch.zeros(sum(sizes), dtype=torch.float64, device=flat.device)
            if id(part) in mine:  # stepped now: its refresh gathered it, the owners' spectra are given
                names, bad = names_of[id(part)], {mp.name: self._bad[mp.name] for mp in plan.matrices}
                offset = 0
                for mp, size in zip(plan.matrices, sizes):
                    values = given.get(names.get(mp.name, -1))
                    if values is not None and not bad[mp.name]:
                        buffer[offset : offset + size] = values
                    offset += size
                comm.all_reduce(buffer)
                for mp, values in zip(plan.matrices, buffer.cpu().split(sizes)):
                    cached[mp.name] = None if bad[mp.name] else values
                continue
            if flat.grad is None and part.gradient is None:
                raise RuntimeError(
                    f"rank='auto' param group {group_index}: a partition of it has no gradient to allocate the "
                    "group's ranks from at this refresh (bind it with a gradient source: "
                    "FragmentLayout.add_partition(gradient=...))."
                )
            grad = flat.grad if flat.grad is not None else cast(Callable[[], Tensor | None], part.gradient)()
            if grad is None:
                raise RuntimeError(
                    f"rank='auto' param group {group_index}: the gradient source of a partition still to step "
                    "returned no gradient at this refresh."
                )
            held = {mp.name: _block(grad, mp) for mp in plan.matrices if mp.piece is not None and not mp.split}
            full, bad = self._whole_gradients(flat, part, grad, held)
            owners = _refresh_owners(plan, comm.world_size)
            offset = 0
            for mp, size in zip(plan.matrices, sizes):
                if owners[mp.name] == comm.rank and not bad[mp.name] and size > 0:
                    whole = full[mp.name] if mp.split else held[mp.name]
                    buffer[offset : offset + size] = spectrum_of(self.group["projector"], whole, self.sides[mp.name], size)
                offset += size
            comm.all_reduce(buffer)
            for mp, values in zip(plan.matrices, buffer.cpu().split(sizes)):
                cached[mp.name] = None if bad[mp.name] else values
        self.layout._group_spectra[group_index] = (self.token, cached)
        return cached

    def spectra(self, indices: Sequence[int], energies: Sequence[Tensor | None], sizes: Sequence[int]) -> list[Tensor]:
        # One fp64 all-reduce per partition over every matrix of its plan: each refresh owner writes its
        # matrices' spectra into a zero buffer (x + 0 is exact), so every rank has all of them, alike.
        given = {index: values for index, values in zip(indices, energies)}
        result: dict[int, Tensor] = {}
        self._elsewhere, self._elsewhere_spectra = [], []
        if self.siblings:  # a group of several partitions: the whole group's spectra, once per step
            group = self._group_spectra(given)
            mine = {id(part): names for _, part, names in self.partitions}
            for _, part in self.siblings:
                names = mine.get(id(part), {})
                for mp in part.plan.matrices:
                    index = names.get(mp.name)
                    if index is not None and index in given:
                        spectrum = group[mp.name]
                        result[index] = spectrum if spectrum is not None else torch.zeros(min(mp.shape), dtype=torch.float64)
                    elif index is None:
                        self._elsewhere.append((part, mp))
                        self._elsewhere_spectra.append(group[mp.name])
            return [result.get(i, torch.zeros(size, dtype=torch.float64)) for i, size in zip(indices, sizes)]
        for flat, part, names in self.partitions:
            sizes_of = [min(mp.shape) for mp in part.plan.matrices]
            buffer = torch.zeros(sum(sizes_of), dtype=torch.float64, device=flat.device)
            offset = 0
            for mp, size in zip(part.plan.matrices, sizes_of):
                values = given.get(names.get(mp.name, -1))
                if values is not None:
                    buffer[offset : offset + size] = values
                offset += size
            part.comm.all_reduce(buffer)
            for mp, values in zip(part.plan.matrices, buffer.cpu().split(sizes_of)):
                index = names.get(mp.name)
                if index is not None and index in given:
                    result[index] = values
                elif index is None:
                    self._elsewhere.append((part, mp))
                    self._elsewhere_spectra.append(None if self._bad.get(mp.name, True) else values)
        return [result.get(i, torch.zeros(size, dtype=torch.float64)) for i, size in zip(indices, sizes)]

    def _positions(self) -> dict[str, int]:
        """Every matrix's place in the allocation's order, the same on every rank and the one process's: the
        optimizer's parameter order where the plans know it (:attr:`MatrixPlan.ordinal`; ZeRO-1/2 with
        round-robin gradients lists a partition's matrices in another order), else partition order, then
        plan order. A group of several partitions: over all of them."""
        if self._places is None:
            parts = [part for _, part in self.siblings] if self.siblings else [part for _, part, _ in self.partitions]
            matrices = [mp for part in parts for mp in part.plan.matrices]
            if all(mp.ordinal is not None for mp in matrices):
                matrices.sort(key=lambda mp: cast(int, mp.ordinal))
            self._places = {mp.name: place for place, mp in enumerate(matrices)}
        return self._places

    def position(self, index: int) -> int:
        mp = self.entries[index][1]
        return -1 if mp is None else self._positions()[mp.name]  # -1: the empty placeholder (never allocated)

    def elsewhere(self) -> list[Elsewhere]:
        places = self._positions()
        return [
            Elsewhere(
                cast("tuple[int, int]", tuple(mp.shape)),
                self._flat_dtype(part),
                self.ranks[mp.name] if mp.name in self.ranks else self.sibling_ranks[mp.name],
                spectrum,
                places[mp.name],
            )
            for (part, mp), spectrum in zip(self._elsewhere, self._elsewhere_spectra)
        ]

    def _flat_dtype(self, part: _Partition) -> torch.dtype:
        flats = [(flat, other) for flat, other, _ in self.partitions] + self.siblings
        return next(flat.dtype for flat, other in flats if other is part)

    def assign_ranks(self, indices: Sequence[int], ranks: Sequence[int], elsewhere: Sequence[int | None]) -> None:
        chosen: dict[str, int] = {}
        for index, rank in zip(indices, ranks):
            held = self.entries[index][1]
            if held is not None:
                chosen[held.name] = rank
        for (_, mp), maybe in zip(self._elsewhere, elsewhere):
            if maybe is not None:
                chosen[mp.name] = maybe
        if self.siblings:
            # Every partition of the group allocates over the same pool: the first one's choice stands
            # for all, and a later one that chose otherwise would break the budget, so it is an error.
            group_index = self.siblings[0][1].group_index
            entry = self.layout._group_choice.get(group_index)
            if entry is None or entry[0] != self.token:
                self.layout._group_choice[group_index] = (self.token, chosen)
            first = chosen if entry is None or entry[0] != self.token else entry[1]
            differing = sorted(name for name in chosen if first.get(name, chosen[name]) != chosen[name])
            if differing:
                raise RuntimeError(
                    f"rank='auto' param group {group_index}: its partitions allocated different ranks for "
                    f"{differing[:5]} from the same spectra; please report this."
                )
        # The ranks of this step's own matrices (another partition's are committed at its step).
        self.targets.update({name: rank for name, rank in chosen.items() if name in self.ranks})

    def _target(self, name: str) -> int:
        """A matrix's rank after this step's refresh (its current one where it does not change)."""
        return self.targets.get(name, self.ranks[name])

    def gather_projectors(
        self, indices: Sequence[int], specs: Sequence[list[ProjectorTensor]], stored: Sequence[Sequence[Tensor]]
    ) -> list[list[Tensor] | None]:
        given = {index: (spec, list(tensors)) for index, spec, tensors in zip(indices, specs, stored)}
        result: dict[int, list[Tensor] | None] = {}
        for flat, part, names in self.partitions:
            comm = part.comm
            owners = _refresh_owners(part.plan, comm.world_size)
            # A matrix whose pieces of the projector are all of it (held by one rank, or kept whole by every
            # holder) has it at its owner already; sharded ones are summed from exclusive shares.
            sharded = [mp for mp in part.plan.matrices if self._is_sharded(part, mp)]
            if sharded:
                shares: list[list[Tensor | None] | None] = []
                whole_specs = []
                for mp in sharded:
                    index = names.get(mp.name)
                    entry_specs = given[index][0] if index in given else _specs_of(self.group, mp, False, self.ranks[mp.name])
                    whole_specs.append(entry_specs)
                    shares.append(None if index not in given else self._exclusive_shares(part, mp, *given[index]))
                summed = _all_reduce_tensors(comm, flat.device, shares, whole_specs, flat.dtype)
                for mp, tensors in zip(sharded, summed):
                    index = names.get(mp.name)
                    if index in given:
                        result[index] = tensors if owners[mp.name] == comm.rank else None
            for mp in part.plan.matrices:
                index = names.get(mp.name)
                if index in given and index not in result:
                    result[index] = given[index][1] if owners[mp.name] == comm.rank else None
        return [result.get(i) for i in indices]

    def _exclusive_shares(
        self, part: _Partition, mp: MatrixPlan, specs: list[ProjectorTensor], tensors: list[Tensor]
    ) -> list[Tensor | None]:
        """Whole-shaped tensors holding the part of a sharded matrix's projector only this holder writes
        (zeros elsewhere); replicated tensors come from the owner alone."""
        side, rank_r = self.sides[mp.name], self.ranks[mp.name]
        mine = _my_shard(mp, part.comm.rank, side, rank_r)
        owner = _refresh_owners(part.plan, part.comm.world_size)[mp.name] == part.comm.rank
        result: list[Tensor | None] = []
        for spec, tensor in zip(specs, tensors):
            if spec.sharding == "replicated":
                result.append(tensor if owner else None)
                continue
            whole = torch.zeros(spec.shape, dtype=tensor.dtype, device=tensor.device)
            if side is Side.RIGHT:  # even shares of the flattened basis are disjoint
                whole.view(-1)[mine.basis[0] : mine.basis[1]] = tensor.reshape(-1)
            else:  # the rows whose first element it holds partition the rows
                first, rows = mine.first, mine.rows
                whole[first[0] : first[1]] = tensor[first[0] - rows[0] : first[1] - rows[0]]
            result.append(whole)
        return result

    def share_projectors(
        self,
        indices: Sequence[int],
        specs: Sequence[list[ProjectorTensor]],
        new: Sequence[list[Tensor] | None],
        finite: Sequence[bool],
    ) -> list[list[Tensor] | None]:
        # Keyed by index, looked up by names.get (None: a matrix without a block here, never a key).
        computed: dict[int | None, list[Tensor] | None] = dict(zip(indices, new))
        spec_of: dict[int | None, list[ProjectorTensor]] = dict(zip(indices, specs))
        ok = dict(zip(indices, finite))
        result: dict[int, list[Tensor] | None] = {}
        for flat, part, names in self.partitions:
            plan, comm = part.plan, part.comm
            split = self._split(part)
            whole: dict[str, list[Tensor]] = {}
            if split:
                # Each matrix's tensors are written by its owner only (every holder takes part in the sum).
                rotate = rotates(self.group["moment_policy"], self.steps[id(part)])
                entry_specs = [
                    spec_of.get(names.get(mp.name))
                    or _specs_of(self.group, mp, rotate, self._target(mp.name), self.ranks[mp.name])
                    for mp in split
                ]
                tensors = [computed.get(names.get(mp.name)) for mp in split]
                for mp, summed in zip(split, _all_reduce_tensors(comm, flat.device, tensors, entry_specs, flat.dtype)):
                    whole[mp.name] = summed
            for mp in plan.matrices:
                index = names.get(mp.name)
                if index is None or index not in computed:
                    continue
                whole_tensors = whole.get(mp.name, computed[index])
                # A finite refresh has its tensors here: summed for a split matrix, else computed by its one holder.
                result[index] = (
                    _local_projector(
                        mp, part, comm.rank, self.sides[mp.name], self._target(mp.name), spec_of[index],
                        cast("list[Tensor]", whole_tensors),
                    )
                    if ok[index]
                    else None
                )
        # From here on (the rebuilt state, the normal phases) every matrix is at its new rank.
        for _, part, _ in self.partitions:
            table = self.tables[id(part)]
            for mp in part.plan.matrices:
                if mp.name in self.targets:
                    self.ranks[mp.name] = self.targets[mp.name]
                    if table is not None:
                        table[mp.name] = self.targets[mp.name]
        self.targets = {}
        return [result.get(i) for i in indices]

    # --- a normal step -------------------------------------------------------------------------------

    def subspaces(
        self, indices: Sequence[int], specs: Sequence[list[ProjectorTensor]], stored: Sequence[Subspace]
    ) -> list[Subspace]:
        given = dict(zip(indices, stored))
        aligned = self.aligned
        result: dict[int, Subspace] = {}
        for flat, part, names in self.partitions:
            right = [mp for mp in part.plan.matrices if self._is_sharded(part, mp) and self.sides[mp.name] is Side.RIGHT]
            shares = {mp.name: {BASIS_RIGHT: given[names[mp.name]].right} for mp in right if mp.name in names}
            gathered = _gather_right_bases(part.comm, right, shares, self.ranks, flat) if aligned else {}
            for mp in part.plan.matrices:
                index = names.get(mp.name)
                if index is None or index not in given:
                    continue
                sub = given[index]
                if mp.name in gathered:
                    result[index] = Subspace(Side.RIGHT, None, gathered[mp.name])
                elif self._is_sharded(part, mp) and self.sides[mp.name] is Side.LEFT and aligned:
                    result[index] = sub  # the basis rows this piece touches
                else:
                    r0, r1, _ = _rows(mp)
                    result[index] = _restrict(sub, r0, r1)
        return [result.get(i, given[i]) for i in indices]

    def lowranks(self, indices: Sequence[int], sides: Sequence[Side], partials: Sequence[Tensor]) -> list[Tensor]:
        given = dict(zip(indices, partials))
        result: dict[int, Tensor] = {}
        for flat, part, names in self.partitions:
            plan, comm = part.plan, part.comm
            sharded = {mp.name for mp in plan.matrices if self._is_sharded(part, mp)}
            split = [mp for mp in plan.matrices if mp.split and mp.name not in sharded]
            right = [mp for mp in plan.matrices if mp.name in sharded and self.sides[mp.name] is Side.RIGHT]
            left = [mp for mp in plan.matrices if mp.name in sharded and self.sides[mp.name] is Side.LEFT]
            mine = {mp.name: given[names[mp.name]] for mp in plan.matrices if mp.name in names and names[mp.name] in given}
            shapes = {mp.name: _lowrank_shape(mp, self.sides[mp.name], self.ranks[mp.name]) for mp in split}
            # Replicated: the partial projections of the split matrices summed in one bucket.
            buffer = flat.new_zeros(sum(math.prod(shapes[mp.name]) for mp in split))
            views = _views(buffer, split, shapes)
            for mp in split:
                if mp.name in mine:
                    r0, r1, _ = _rows(mp)
                    target = views[mp.name][r0:r1] if self.sides[mp.name] is Side.RIGHT else views[mp.name]
                    target.copy_(mine[mp.name])
            if split:
                comm.all_reduce(buffer)
            # Sharded right: only the rows cut between holders are summed; sharded left: reduce-scatter.
            _exchange_cut_rows(comm, right, mine, self.ranks, flat.dtype, flat.device, owners_only=False)
            columns = _reduce_scatter_columns(comm, left, mine, self.ranks, flat.dtype, flat.device)
            for mp in plan.matrices:
                if mp.name not in mine:
                    continue
                index = names[mp.name]
                if mp in split:
                    result[index] = views[mp.name]
                elif mp.name in columns:
                    result[index] = columns[mp.name]
                elif mp.name in sharded:  # right: the moment rows it owns, of its block's rows of R
                    shard = _my_shard(mp, comm.rank, Side.RIGHT, self.ranks[mp.name])
                    self.row_lowranks[mp.name] = mine[mp.name]
                    t0 = shard.rows[0]
                    result[index] = mine[mp.name][shard.moments[0] - t0 : shard.moments[1] - t0]
                else:
                    result[index] = mine[mp.name]
        return [result.get(i, given[i]) for i in indices]

    def block_terms(
        self, indices: Sequence[int], sides: Sequence[Side], normalized: Sequence[Tensor], lowranks: Sequence[Tensor] | None
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        given_n = dict(zip(indices, normalized))
        given_r = None if lowranks is None else dict(zip(indices, lowranks))
        out_n: dict[int, Tensor] = {}
        out_r: dict[int, Tensor] = {}
        height = 1 if given_r is None else 2
        for flat, part, names in self.partitions:
            plan, comm = part.plan, part.comm
            held = [mp for mp in plan.matrices if mp.name in names and names[mp.name] in given_n]
            right = [mp for mp in plan.matrices if self._is_sharded(part, mp) and self.sides[mp.name] is Side.RIGHT]
            left = [mp for mp in plan.matrices if self._is_sharded(part, mp) and self.sides[mp.name] is Side.LEFT]
            # N's dtype, alike on every rank: quantized moments give fp32 N (a plain moment's N, bf16 say, goes
            # through the fp32 buffer exactly and is cast back below).
            quantized = _quantizing(self.group)
            dtype = torch.float32 if quantized else self.group["moment_dtype"] or flat.dtype
            local_n: dict[str, Tensor] = {}
            for mp in held:
                index = names[mp.name]
                if self._is_sharded(part, mp):
                    continue
                r0, r1, _ = _rows(mp)
                out_n[index] = _rows_of(given_n[index], self.sides[mp.name], r0, r1)
                if given_r is not None:
                    out_r[index] = _rows_of(given_r[index], self.sides[mp.name], r0, r1)
            for mp in right:  # N's rows of the block: its own moment rows, the cut rows from their owners
                if mp.name not in names:
                    continue
                index = names[mp.name]
                shard = _my_shard(mp, comm.rank, Side.RIGHT, self.ranks[mp.name])
                t0, t1 = shard.rows
                rows = torch.zeros(t1 - t0, self.ranks[mp.name], dtype=dtype, device=flat.device)
                rows[shard.moments[0] - t0 : shard.moments[1] - t0] = given_n[index]
                local_n[mp.name] = rows
                if given_r is not None:
                    out_r[index] = self.row_lowranks[mp.name]
            _exchange_cut_rows(comm, right, local_n, self.ranks, dtype, flat.device, owners_only=True)
            for name, rows in local_n.items():
                out_n[names[name]] = rows.to(given_n[names[name]].dtype)
            columns = {}
            for mp in left:
                if mp.name not in names:
                    continue
                index = names[mp.name]
                chunk = given_n[index]
                columns[mp.name] = chunk if given_r is None else torch.cat([chunk, given_r[index].to(dtype)])
            wholes = _gather_columns(comm, left, columns, self.ranks, height, dtype, flat.device)
            for name, both in wholes.items():
                out_n[names[name]] = both[: both.shape[0] // height].to(given_n[names[name]].dtype)
                if given_r is not None:
                    out_r[names[name]] = both[both.shape[0] // height :]
        terms_n = [out_n.get(i, given_n[i]) for i in indices]
        terms_r = None if given_r is None else [out_r.get(i, given_r[i]) for i in indices]
        return terms_n, terms_r

    def residual_norms(self, indices: Sequence[int], residuals: Sequence[Tensor]) -> list[Tensor]:
        # ||S||_F of a split matrix from its holders' partial sums of squares (own elements only).
        return self._norms(indices, residuals, lambda part, mp, block: _fragment(block, mp))

    def lowrank_norms(self, indices: Sequence[int], tensors: Sequence[Tensor]) -> list[Tensor]:
        # A sharded matrix's holders each keep a share of its low-rank tensors; an unsharded split one's
        # holders each keep all of them, so its owner alone contributes.
        def own(part: _Partition, mp: MatrixPlan, tensor: Tensor) -> Tensor | None:
            return tensor if self._is_sharded(part, mp) or mp.holders[0] == part.comm.rank else None

        return self._norms(indices, tensors, own)

    def _norms(self, indices: Sequence[int], tensors: Sequence[Tensor], own: Any) -> list[Tensor]:
        """Frobenius norms per matrix: a whole one's from its own tensor, a split one's from the sums of
        squares of ``own(part, mp, tensor)`` (``None``: nothing) all-reduced over the partition's ranks
        (one bucket per partition, called alike by every rank); the empty placeholder block gets 0."""
        given = dict(zip(indices, tensors))
        result: dict[int, Tensor] = {}
        for flat, part, names in self.partitions:
            split = self._split(part)
            squares = torch.zeros(len(split), dtype=torch.float32, device=flat.device)
            for slot, mp in enumerate(split):
                index = names.get(mp.name)
                if index is not None and index in given:
                    mine = own(part, mp, given[index])
                    if mine is not None:
                        squares[slot] = mine.float().square().sum()
            if split:
                part.comm.all_reduce(squares)
            for slot, mp in enumerate(split):
                index = names.get(mp.name)
                if index is not None and index in given:
                    result[index] = squares[slot].sqrt()
            for mp in part.plan.matrices:
                index = names.get(mp.name)
                if index is not None and index in given and not mp.split:
                    tensor = given[index]
                    result[index] = torch.linalg.vector_norm(tensor, dtype=torch.promote_types(tensor.dtype, torch.float32))
        return [result.get(i, torch.zeros((), device=given[i].device)) for i in indices]

    def finish(self) -> None:
        """Write each cut piece's elements of its updated row block back into the flat partition."""
        for flat, part, names in self.partitions:
            for mp in part.plan.matrices:
                if mp.name in names and not _whole(mp):
                    block = self.entries[names[mp.name]][2]
                    piece = mp.piece
                    assert piece is not None  # names holds the matrices this rank holds a piece of
                    flat[piece.flat_start : piece.flat_start + piece.numel].copy_(_fragment(block, mp))


def _specs_of(
    group: dict[str, Any], mp: MatrixPlan, rotate: bool, rank: int, old_rank: int | None = None
) -> list[ProjectorTensor]:
    """What a refresh of a matrix shares (:func:`~lowrank_optim.projection.refresh_specs`) at ``rank``
    (from ``old_rank`` in a ``rank="auto"`` group), for a rank that does not hold it."""
    shape = cast("tuple[int, int]", tuple(mp.shape))  # a projected group's matrix
    side = resolve_side(group["proj_type"], shape)
    return refresh_specs(group["projector"], shape, rank, side, rotate, old_rank)


def _lowrank_shape(mp: MatrixPlan, side: Side, rank_r: int) -> tuple[int, int]:
    m, n = mp.shape
    return (m, rank_r) if side is Side.RIGHT else (rank_r, n) if side is Side.LEFT else (rank_r, rank_r)
