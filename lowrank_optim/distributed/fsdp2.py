"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the low-rank step on the DTensor shards of each matrix.

``fully_shard`` turns every parameter into a DTensor sharded on dim 0 over a 1-D mesh: rank ``k`` holds
rows ``[k·c, (k+1)·c)`` of an ``m x n`` matrix (``c = ceil(m / W)``, ``torch.chunk``'s cut; the last ranks
may hold fewer rows, or none). An optimizer built on such parameters gets this layout from
:func:`~lowrank_optim.optim.layout.layout_for` (registered by ``lowrank_optim._layouts``), with no
extra call. Its state is sharded as the
parameter is, as DTensors (which is what lets ``torch.distributed.checkpoint`` save, load and reshard
it): state that runs along the rows (a right-side projection's ``m x r`` moments, a left basis ``m x r``)
is cut like the parameter; state that runs along the columns (a left-side projection's ``r x n``
moments, a right basis ``r x n``) is cut into column chunks; ``r x r`` moments, DCT indices, step
counters and Fira's limiter are replicated.

The collectives of a step (:class:`~lowrank_optim.optim.exchange.Exchange`), each batched over the matrices of a
param group:

* right side (``R = G Pᵀ``, ``m x r``): a row of ``R`` needs only that row of ``G``, so ``R`` is local;
  the basis is all-gathered from its column chunks (``r·n`` elements, like FSDP2 gathering a parameter).
* left side (``R = Pᵀ G = Σ_k P_kᵀ G_k``, ``r x n``): the partial ``r x n`` projections are
  reduce-scattered into each rank's column chunk of the moments, and ``N`` (with ``R`` for Fira) is
  all-gathered back.
* full (``r x r``): the partial projections are all-reduced.
* Fira: ``||S||_F`` from all-reduced partial sums of squares; a skip decision (NaN/Inf) is one
  all-reduced flag per tensor.
* a refresh: each matrix's gradient is gathered on one owner, chosen to balance the SVD (or DCT scoring)
  work over the ranks, which computes the projector and broadcasts only that.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, cast

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from ..optim.exchange import LOCAL, Elsewhere, Exchange, RefreshGradients
from ..optim.layout import Block, StateInit
from ..projection import ProjectorTensor, Side, Subspace, all_finite
from .comm import TorchCommunicator

__all__ = ["FSDP2Layout", "OWNER_POLICIES"]


def _chunk(size: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s chunk of ``size`` (``torch.chunk``'s cut, as DTensor's Shard)."""
    chunk = -(-size // world) if size else 0
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: updates reach it), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, running = [], 1
    for size in reversed(tuple(shape)):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


#: Who computes a refreshing matrix's projector: ``balanced`` (default: the largest SVDs first, each to the
#: least loaded rank) or ``first`` (rank 0 does all, the baseline of ``bench/bench_fsdp2.py``).
OWNER_POLICIES: tuple[str, ...] = ("balanced", "first")


class FSDP2Layout:
    """The layout of parameters that ``fully_shard`` sharded on dim 0 over a 1-D device mesh.

    ``comm.elements`` counts the elements this rank sent in the optimizer's own collectives
    (:class:`~lowrank_optim.distributed.comm.TorchCommunicator`); ``owners`` is one of
    :data:`OWNER_POLICIES`.
    """

    #: State tensors are sharded by whole rows (``new_state``), so quantization blocks, which run along
    #: rows, never straddle two ranks (:mod:`lowrank_optim.optim.moments`).
    steps_quantized_moments = True
    #: A ``rank="auto"`` refresh rebuilds a matrix's state at its new rank with :meth:`new_state`, sharded
    #: as at the first step; the owners' spectra reach every rank (:meth:`_Exchange.spectra`).
    steps_adaptive_ranks = True

    def vector_pieces(self, size: int) -> list[tuple[int, int]]:
        """``[start, stop)`` of every rank's piece of a 1-D state tensor of ``size`` elements: a 1-D
        parameter is split along its one dimension, so its quantized moments work only where the codes'
        and the block scales' pieces fall on the same block boundaries (the optimizer checks)."""
        return [_chunk(size, self.world, rank) for rank in range(self.world)]

    def __init__(self, mesh: Any, owners: str = "balanced") -> None:
        if owners not in OWNER_POLICIES:
            raise ValueError(f"Invalid owners: {owners!r}. Must be one of {', '.join(OWNER_POLICIES)}.")
        self.mesh = mesh
        self.owners = owners
        self.comm = TorchCommunicator(mesh.get_group())
        self.rank, self.world = self.comm.rank, self.comm.world_size

    @classmethod
    def resolve(cls, params: list[Tensor]) -> FSDP2Layout | None:
        """This layout for DTensor parameters (``None`` when there are none); raises for any it cannot step."""
        if not any(isinstance(p, DTensor) for p in params):
            return None
        mesh = next(p for p in params if isinstance(p, DTensor)).device_mesh
        for position, param in enumerate(params):
            _check_param(param, mesh, f"parameter {position} of the optimizer (counted over all its param groups)")
        return cls(mesh)

    def check_group(self, optimizer: Any, group: dict[str, Any]) -> bool:
        index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
        for position, param in enumerate(group["params"]):
            _check_param(param, self.mesh, f"{type(optimizer).__name__}: param {position} of param group {index}", group)
        return True

    def blocks(self, group: dict[str, Any], tensor: Tensor, state: dict[str, Any], init: StateInit) -> list[Block]:
        if not state:
            init(tensor, state)
        local = {key: _local(value) for key, value in state.items()}
        # The optimizer asks for the blocks of parameters that have a gradient only.
        return [Block(_local(tensor), _local(cast(Tensor, tensor.grad)), local, state["step"], tuple(tensor.shape))]

    def begin_step(self, groups: list[dict[str, Any]]) -> Tensor | None:
        return None  # every tensor's flag is combined over its pieces (Exchange.flags)

    def new_state(
        self, param: Tensor, shape: Sequence[int], dtype: torch.dtype, sharding: str, *, column_major: bool = False
    ) -> Tensor:
        shape = tuple(shape)
        if not isinstance(param, DTensor) or sharding == "replicated":
            return torch.zeros(shape, dtype=dtype, device=_local(param).device)
        # columns_first: the columns' chunks, as for "columns", along the stored dimension 0.
        dim = {"rows": 0, "columns": 1, "columns_first": 0}[sharding]
        start, stop = _chunk(shape[dim], self.world, self.rank)
        local_shape = list(shape)
        local_shape[dim] = stop - start
        local = torch.zeros(local_shape, dtype=dtype, device=_local(param).device)
        return DTensor.from_local(
            local, self.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=_strides(shape)
        )

    def rebuilt_state(
        self, group: dict[str, Any], tensor: Tensor, state: dict[str, Any], local: dict[str, Any], rank: int, rebuild: StateInit
    ) -> dict[str, Any]:
        rebuild(tensor, state)  # new DTensors, sharded by new_state as at the first step
        return {key: _local(value) for key, value in state.items()}

    def exchange(self, group: dict[str, Any], params: list[Tensor]) -> Exchange:
        if self.world == 1:
            return LOCAL
        return _Exchange(self, group, params)


def _check_param(param: Tensor, mesh: Any, where: str, group: dict[str, Any] | None = None) -> None:
    """Refuse what this layout cannot step; ``where`` names the tensor, ``group`` is set at ``step()``
    (the optimizer was built on DTensors, so a plain tensor now was put there afterwards)."""
    where = f"{where} (shape {tuple(param.shape)})"
    if not isinstance(param, DTensor):
        if group is not None:
            raise ValueError(
                f"{where} is a plain tensor, but the optimizer was built on FSDP2 (DTensor) parameters: it was "
                "replaced after construction. Keep the parameters fully_shard made (build the optimizer after "
                "wrapping, and do not swap its groups' tensors afterwards)."
            )
        raise ValueError(
            f"{where} is a plain tensor among FSDP2 (DTensor) parameters; allowed: every parameter of the "
            "optimizer sharded by fully_shard on one mesh (apply fully_shard to the root module too)."
        )
    if param.device_mesh != mesh or mesh.ndim != 1:
        raise ValueError(
            f"{where} is sharded over the mesh {param.device_mesh}; allowed: one 1-D mesh for every parameter "
            "(HSDP's 2-D meshes are not supported)."
        )
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"{where} has placements {tuple(param.placements)}; allowed: (Shard(dim=0),), as fully_shard makes.")
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = _chunk(param.shape[0], world, rank) if param.dim() else (0, 0)
    if param.dim() and param.to_local().shape[0] != rows[1] - rows[0]:
        raise RuntimeError(
            f"{where}: rank {rank} holds {param.to_local().shape[0]} rows, not the {rows[1] - rows[0]} of "
            "torch.chunk's cut this layout expects."
        )
    if group is not None and "rank" in group and param.dim() != 2:
        raise RuntimeError(f"{where} of a projected param group is not a 2-D matrix.")


class _Exchange:
    """The collectives of one step of one param group (see the module docstring)."""

    batched = True  # each phase's collectives are bucketed over the group's matrices

    def __init__(self, layout: FSDP2Layout, group: dict[str, Any], params: list[Tensor]) -> None:
        self.comm, self.me, self.world = layout.comm, layout.rank, layout.world
        self.owner_policy = layout.owners
        self.shapes = [tuple(p.shape) for p in params]
        self.dtypes = [p.dtype for p in params]
        # check_group made sure every parameter is a DTensor.
        self.device = cast(DTensor, params[0]).to_local().device if params else torch.device("cpu")
        self.owners: dict[int, int] = {}
        # The whole gradients, gathered once per step (a rank="auto" refresh asks twice).
        self.refresh_gradients = RefreshGradients(self._refresh_gradients)

    def whole(self, index: int) -> bool:
        return False

    def shape(self, index: int, block: Tensor) -> tuple[int, int]:
        return cast("tuple[int, int]", self.shapes[index])  # asked of matrices only

    def finish(self) -> None:
        pass  # the blocks are views of the shards

    def _rows(self, index: int) -> tuple[int, int]:
        return _chunk(self.shapes[index][0], self.world, self.me)

    def _columns(self, index: int) -> tuple[int, int]:
        return _chunk(self.shapes[index][1], self.world, self.me)

    def flags(self, indices: Sequence[int], flags: Sequence[Tensor]) -> list[Tensor]:
        counts = torch.stack([flag.to(torch.float32) for flag in flags])
        self.comm.all_reduce(counts)
        return list((counts > 0).unbind())

    def spectra(self, indices: Sequence[int], energies: Sequence[Tensor | None], sizes: Sequence[int]) -> list[Tensor]:
        # One all-reduce: each owner writes its matrices' spectra into a zero buffer (x + 0 is exact).
        buffer = torch.zeros(sum(sizes), dtype=torch.float64, device=self.device)
        offset = 0
        for values, size in zip(energies, sizes):
            if values is not None:
                buffer[offset : offset + size] = values
            offset += size
        self.comm.all_reduce(buffer)
        return [piece.cpu() for piece in buffer.split(list(sizes))]

    def position(self, index: int) -> int:
        return index  # every rank steps the group's parameters in the same order

    def elsewhere(self) -> list[Elsewhere]:
        return []  # every rank holds a shard of every matrix

    def assign_ranks(self, indices: Sequence[int], ranks: Sequence[int], elsewhere: Sequence[int | None]) -> None:
        pass  # the stored shards' shapes say each matrix's rank

    def _refresh_gradients(self, indices: Sequence[int], grads: Sequence[Tensor]) -> tuple[list[Tensor | None], list[bool]]:
        # Owners: the largest SVDs first, each to the least loaded rank (the same choice on every rank).
        loads = [0] * self.world
        for index in sorted(indices, key=lambda i: (-math.prod(self.shapes[i]) * min(self.shapes[i]), i)):
            owner = 0 if self.owner_policy == "first" else min(range(self.world), key=lambda k: (loads[k], k))
            loads[owner] += math.prod(self.shapes[index]) * min(self.shapes[index])
            self.owners[index] = owner
        wholes: list[Tensor | None] = []
        bad = torch.zeros(len(indices), dtype=torch.float32, device=self.device)  # NCCL has no CPU tensors
        for position, (index, grad) in enumerate(zip(indices, grads)):
            m, n = self.shapes[index]
            chunk = -(-m // self.world)
            padded = grad.new_zeros(chunk, n)
            padded[: grad.shape[0]] = grad
            owner = self.owners[index]
            pieces = [torch.empty_like(padded) for _ in range(self.world)] if owner == self.me else None
            self.comm.gather(pieces, padded, owner)
            whole = None if pieces is None else torch.cat(pieces)[:m]
            if whole is not None and not all_finite(whole):
                bad[position] = 1.0
            wholes.append(whole)
        self.comm.all_reduce(bad)
        return wholes, [not value for value in bad.tolist()]

    def gather_projectors(
        self, indices: Sequence[int], specs: Sequence[list[ProjectorTensor]], stored: Sequence[Sequence[Tensor]]
    ) -> list[list[Tensor] | None]:
        # Aligned tensors are all-gathered (rows as the columns of their transpose): rare (refreshes that
        # warm-start or rotate), and the same collective as every step's right-basis gather.
        slots = [(k, j) for k, entry in enumerate(specs) for j, spec in enumerate(entry) if spec.sharding != "replicated"]
        locals_ = [stored[k][j] if specs[k][j].sharding == "columns" else stored[k][j].T for k, j in slots]
        widths = [
            self.shapes[indices[k]][1] if specs[k][j].sharding == "columns" else self.shapes[indices[k]][0]
            for k, j in slots
        ]
        wholes = dict(zip(slots, self._gather_columns(locals_, widths)))
        result: list[list[Tensor] | None] = []
        for k, (index, entry) in enumerate(zip(indices, specs)):
            if self.owners[index] != self.me:
                result.append(None)
                continue
            tensors = []
            for j, spec in enumerate(entry):
                whole = wholes.get((k, j), stored[k][j])
                tensors.append(whole.T if spec.sharding == "rows" else whole)
            result.append(tensors)
        return result

    def share_projectors(
        self,
        indices: Sequence[int],
        specs: Sequence[list[ProjectorTensor]],
        new: Sequence[list[Tensor] | None],
        finite: Sequence[bool],
    ) -> list[list[Tensor] | None]:
        result: list[list[Tensor] | None] = []
        for index, entry, tensors, ok in zip(indices, specs, new, finite):
            if not ok:
                result.append(None)
                continue
            wholes: list[Tensor | None] = [None] * len(entry)
            dtypes = [spec.dtype or self.dtypes[index] for spec in entry]
            for dtype in sorted(set(dtypes), key=str):  # one broadcast per dtype
                members = [j for j, d in enumerate(dtypes) if d == dtype]
                if tensors is not None:  # the owner: the same cast as a whole-tensor refresh's copy into the state
                    flat = torch.cat([tensors[j].to(dtype).reshape(-1) for j in members])
                else:
                    flat = torch.empty(sum(math.prod(entry[j].shape) for j in members), dtype=dtype, device=self.device)
                self.comm.broadcast(flat, self.owners[index])
                offset = 0
                for j in members:
                    size = math.prod(entry[j].shape)
                    wholes[j] = flat[offset : offset + size].view(entry[j].shape)
                    offset += size
            pieces = []
            # Every slot was filled by its dtype's broadcast.
            for spec, whole in zip(entry, cast("list[Tensor]", wholes)):
                if spec.sharding == "rows":  # m x r: this rank's rows
                    pieces.append(whole[slice(*self._rows(index))])
                elif spec.sharding == "columns":  # r x n: this rank's column chunk
                    pieces.append(whole[:, slice(*self._columns(index))])
                else:
                    pieces.append(whole)
            result.append(pieces)
        return result

    def subspaces(
        self, indices: Sequence[int], specs: Sequence[list[ProjectorTensor]], stored: Sequence[Subspace]
    ) -> list[Subspace]:
        result = list(stored)
        right = []
        for k, (index, entry, sub) in enumerate(zip(indices, specs, stored)):
            if not any(spec.sharding != "replicated" for spec in entry):
                # Whole bases built from replicated tensors (DCT indices): the left one restricted to the rows.
                left = None if sub.left is None else sub.left[slice(*self._rows(index))]
                result[k] = Subspace(sub.side, left, sub.right)
            elif sub.right is not None:  # aligned: left bases are this rank's rows already, right ones chunks
                right.append(k)
        gathered = self._gather_columns(
            [cast(Tensor, stored[k].right) for k in right],  # the indices whose right basis is set
            [self.shapes[indices[k]][1] for k in right],
        )
        for k, whole in zip(right, gathered):
            result[k] = Subspace(stored[k].side, stored[k].left, whole)
        return result

    def lowranks(self, indices: Sequence[int], sides: Sequence[Side], partials: Sequence[Tensor]) -> list[Tensor]:
        result = list(partials)
        left = [k for k, side in enumerate(sides) if side is Side.LEFT]
        for k, local in zip(left, self._reduce_scatter_columns([partials[k] for k in left])):
            result[k] = local
        full = [k for k, side in enumerate(sides) if side is Side.FULL]
        if full:
            summed = self._all_reduce([partials[k] for k in full])
            for k, value in zip(full, summed):
                result[k] = value
        return result

    def block_terms(
        self, indices: Sequence[int], sides: Sequence[Side], normalized: Sequence[Tensor], lowranks: Sequence[Tensor] | None
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        terms_n = list(normalized)
        terms_r = None if lowranks is None else list(lowranks)
        left = [k for k, side in enumerate(sides) if side is Side.LEFT]
        if left:
            tensors = [normalized[k] for k in left] + ([] if lowranks is None else [lowranks[k] for k in left])
            widths = [self.shapes[indices[k]][1] for k in left] * (1 if lowranks is None else 2)
            wholes = self._gather_columns(tensors, widths)
            for position, k in enumerate(left):
                terms_n[k] = wholes[position]
                if terms_r is not None:
                    terms_r[k] = wholes[len(left) + position]
        return terms_n, terms_r

    def lowrank_norms(self, indices: Sequence[int], tensors: Sequence[Tensor]) -> list[Tensor]:
        # Each rank's moment rows (right side) or its share of the reduced R (left side) partition them.
        return self.residual_norms(indices, tensors)

    def residual_norms(self, indices: Sequence[int], residuals: Sequence[Tensor]) -> list[Tensor]:
        if not residuals:  # e.g. a full-rank group (alike on every rank: every matrix is split)
            return []
        squares = torch.stack([r.to(torch.promote_types(r.dtype, torch.float32)).square().sum() for r in residuals])
        self.comm.all_reduce(squares)
        return list(squares.sqrt().unbind())

    # --- batched collectives (one per dtype) ---------------------------------------------------------

    def _all_reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        result: list[Tensor | None] = [None] * len(tensors)
        for _dtype, members in _by_dtype(tensors).items():
            flat = torch.cat([tensors[k].reshape(-1) for k in members])
            self.comm.all_reduce(flat)
            offset = 0
            for k in members:
                result[k] = flat[offset : offset + tensors[k].numel()].view(tensors[k].shape)
                offset += tensors[k].numel()
        return cast("list[Tensor]", result)  # every index is in one dtype's bucket

    def _gather_columns(self, locals_: list[Tensor], widths: list[int]) -> list[Tensor]:
        """Whole ``h x n`` tensors from every rank's column chunk (one all-gather per dtype)."""
        result: list[Tensor | None] = [None] * len(locals_)
        world = self.world
        for _dtype, members in _by_dtype(locals_).items():
            chunks = [-(-widths[k] // world) for k in members]
            padded_chunks = []
            for k, chunk in zip(members, chunks):
                padded = locals_[k].new_zeros(locals_[k].shape[0], chunk)
                padded[:, : locals_[k].shape[1]] = locals_[k]
                padded_chunks.append(padded.reshape(-1))
            mine = torch.cat(padded_chunks)
            everything = mine.new_empty(world * mine.numel())
            self.comm.all_gather(everything, mine)
            everything = everything.view(world, -1)
            offset = 0
            for k, chunk in zip(members, chunks):
                h = locals_[k].shape[0]
                part = everything[:, offset : offset + h * chunk].reshape(world, h, chunk)
                result[k] = part.permute(1, 0, 2).reshape(h, world * chunk)[:, : widths[k]]
                offset += h * chunk
        return cast("list[Tensor]", result)  # every index is in one dtype's bucket

    def _reduce_scatter_columns(self, partials: list[Tensor]) -> list[Tensor]:
        """This rank's column chunk of the sum over ranks of each ``h x n`` tensor (one reduce-scatter per dtype)."""
        result: list[Tensor | None] = [None] * len(partials)
        world = self.world
        for _dtype, members in _by_dtype(partials).items():
            segments, chunks = [], []
            for k in members:
                h, n = partials[k].shape
                chunk = -(-n // world)
                padded = partials[k].new_zeros(h, world * chunk)
                padded[:, :n] = partials[k]
                segments.append(padded.view(h, world, chunk).permute(1, 0, 2).reshape(world, h * chunk))
                chunks.append(chunk)
            send = torch.cat(segments, dim=1).reshape(-1)
            mine = send.new_empty(send.numel() // world)
            self.comm.reduce_scatter(mine, send)
            offset = 0
            for k, chunk in zip(members, chunks):
                h, n = partials[k].shape
                c0, c1 = _chunk(n, world, self.me)
                result[k] = mine[offset : offset + h * chunk].view(h, chunk)[:, : c1 - c0]
                offset += h * chunk
        return cast("list[Tensor]", result)  # every index is in one dtype's bucket


def _by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for k, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(k)
    return groups

