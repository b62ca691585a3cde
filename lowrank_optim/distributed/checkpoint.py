"""Optimizer state keyed by parameter name: resume a run on a different number of ranks (or in one process).

DeepSpeed's own checkpoints are rigid (per-rank files, refused at another data-parallel size) and its
universal checkpoints only know flat Adam state. :func:`save_lowrank_state` writes, per parameter name,
exactly the state a single-process optimizer keeps for that parameter:

* projected matrices: ``step``, the low-rank moments and the bases (both reassembled when sharded
  among ranks) or DCT indices, and Fira's ``residual_norm``;
* full-rank parameters: ``step`` and Adam's moments with the parameter's shape (reassembled from the
  pieces of the flat partitions).

Each parameter is written by one rank only (one of the ranks holding a piece of it, in turns) into
``lowrank_state_rank{k}.pt``; files hold only tensors and strings, so ``torch.load(weights_only=True)``
reads them. :func:`load_lowrank_state` reads every file and gives each rank's optimizer the slices its
own layout needs, whatever the number of ranks or the ZeRO stage (a plain optimizer in one process
included). The model weights (the fp32 masters) are not part of it: save them with the model's
``state_dict`` (at ZeRO-3 gathered, e.g. with ``deepspeed.zero.GatheredParameters``) and load them into
the model before ``initialize``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..optim.galore import BASIS_LEFT, BASIS_RIGHT, EXP_AVG, EXP_AVG_SQ, STEP, GaLoreAdamW
from ..projection import Side, basis_shapes, effective_rank, lowrank_shape, resolve_side
from .fragment import MATRICES, SHARD, FragmentLayout, _init_matrix_state, _my_shard, _Partition, _sharded
from .plan import MatrixPlan

__all__ = ["load_lowrank_state", "save_lowrank_state"]

FILE_PREFIX = "lowrank_state_rank"
FORMAT = "lowrank_optim.named_state.v1"


def _is_engine(target: Any) -> bool:
    return hasattr(target, "module") and hasattr(target, "zero_optimization_stage")


def _resolve(target: Any, model: nn.Module | None, where: str) -> tuple[GaLoreAdamW, dict[int, str], int]:
    """``(base optimizer, parameter id -> name, this process's rank)`` for an engine or an optimizer."""
    from .zero import _base_optimizer

    if _is_engine(target):
        if model is not None:
            raise ValueError(f"{where}(engine, ..., model=...): an engine brings its own model; do not pass model.")
        optimizer = _base_optimizer(target)
        names = {id(p): name for name, p in target.module.named_parameters()}
        # Stage-0 fp16/bf16 wrappers step fp32 copies of the model parameters (fp16_groups[i][j] -> fp32_groups[i][j]).
        wrapper = target.optimizer
        if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups") and not isinstance(wrapper, GaLoreAdamW):
            for low, high in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                if isinstance(high, (list, tuple)):
                    names.update({id(h): names[id(p)] for p, h in zip(low, high) if id(p) in names})
        rank = dist.get_rank() if dist.is_initialized() else 0
        return optimizer, names, rank
    if not isinstance(target, GaLoreAdamW):
        raise TypeError(
            f"{where}: target is {type(target).__name__}; pass a DeepSpeed engine or a lowrank_optim optimizer "
            "(GaLoreAdamW, FiraAdamW, DCTAdamW) together with model=."
        )
    if model is None:
        raise ValueError(f"{where}(optimizer, ...): pass model= so that the optimizer's parameters have names.")
    if isinstance(target.layout, FragmentLayout):
        raise ValueError(f"{where}: this optimizer is bound to a DeepSpeed engine; pass the engine instead.")
    return target, {id(p): name for name, p in model.named_parameters()}, 0


def _dense_params(
    optimizer: GaLoreAdamW, names: dict[int, str], where: str
) -> Iterator[tuple[dict[str, Any], Tensor, str]]:
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(
                    f"{where}: a tensor of shape {tuple(param.shape)} in param group {index} is not a parameter of "
                    "the model, so it has no name to key its state by."
                )
            yield group, param, names[id(param)]


def _writer(mp: MatrixPlan, index: int) -> int:
    """The rank that writes a parameter: its holders take turns (at ZeRO-3 every rank holds a piece of
    everything, and the lowest holder would write it all)."""
    return mp.holders[index % len(mp.holders)]


def _collect_fragments(optimizer: GaLoreAdamW, layout: FragmentLayout, rank: int) -> dict[str, dict[str, Tensor]]:
    """What this rank owns, per parameter name. Collective: every rank of each partition calls it."""
    entries: dict[str, dict[str, Tensor]] = {}
    for flat, part in layout.projected_partitions():
        group = optimizer.param_groups[part.group_index]
        state = optimizer.state.get(flat)
        if not state:
            raise RuntimeError(
                "save_lowrank_state: the optimizer has not stepped yet (no state to save); save after a step."
            )
        matrices = state[MATRICES]
        sides = {mp.name: resolve_side(group["proj_type"], mp.shape) for mp in part.plan.matrices}
        shapes = {
            mp.name: lowrank_shape(mp.shape, effective_rank(group["rank"], mp.shape), sides[mp.name])
            for mp in part.plan.matrices
        }
        # Sharded state: holders write their shares into zero-padded whole moments (and SVD bases; each
        # element written by exactly one holder); one all-reduce per dtype.
        sharded = [mp for mp in part.plan.matrices if _sharded(part, mp, sides[mp.name])]
        full_moments: dict[str, list[Tensor]] = {}
        full_bases: dict[str, Tensor] = {}
        if sharded:
            dtype = group["moment_dtype"] or flat.dtype
            sizes = [math.prod(shapes[mp.name]) for mp in sharded]
            buffer = torch.zeros(2 * sum(sizes), dtype=dtype, device=flat.device)
            offset = 0
            for mp, size in zip(sharded, sizes):
                views = [buffer[offset + k * size : offset + (k + 1) * size].view(shapes[mp.name]) for k in range(2)]
                if mp.piece is not None:
                    start, stop = matrices[mp.name][SHARD].tolist()
                    for view, key in zip(views, (EXP_AVG, EXP_AVG_SQ)):
                        chunk = view[start:stop] if sides[mp.name] is Side.RIGHT else view[:, start:stop]
                        chunk.copy_(matrices[mp.name][key])
                full_moments[mp.name] = views
                offset += 2 * size
            part.comm.all_reduce(buffer)
            if group["projector"] != "dct":
                full_bases = _gather_bases(part, group, matrices, sharded, sides, flat)
        for index, mp in enumerate(part.plan.matrices):
            if _writer(mp, index) != rank:
                continue
            entry = {key: value.clone() for key, value in matrices[mp.name].items() if key != SHARD}
            if mp.name in full_moments:
                entry[EXP_AVG], entry[EXP_AVG_SQ] = (t.clone() for t in full_moments[mp.name])
            if mp.name in full_bases:
                entry[BASIS_RIGHT if sides[mp.name] is Side.RIGHT else BASIS_LEFT] = full_bases[mp.name].clone()
            entry[STEP] = state[STEP].clone()
            entries[mp.name] = entry
    for flat, part in layout.full_rank_partitions():
        state = optimizer.state.get(flat)
        if not state:
            raise RuntimeError(
                "save_lowrank_state: the optimizer has not stepped yet (no state to save); save after a step."
            )
        # Every parameter's moments, zero-padded to its full size, summed over the ranks holding pieces.
        dtype = state[EXP_AVG].dtype
        buffer = torch.zeros(2 * sum(mp.numel for mp in part.plan.matrices), dtype=dtype, device=flat.device)
        offset = 0
        views: dict[str, list[Tensor]] = {}
        for mp in part.plan.matrices:
            views[mp.name] = [buffer[offset + k * mp.numel : offset + (k + 1) * mp.numel] for k in range(2)]
            if mp.piece is not None:
                piece = mp.piece
                for view, key in zip(views[mp.name], (EXP_AVG, EXP_AVG_SQ)):
                    view[piece.param_start : piece.param_start + piece.numel] = state[key][
                        piece.flat_start : piece.flat_start + piece.numel
                    ]
            offset += 2 * mp.numel
        part.comm.all_reduce(buffer)
        for index, mp in enumerate(part.plan.matrices):
            if _writer(mp, index) == rank:
                exp_avg, exp_avg_sq = (view.view(mp.shape).clone() for view in views[mp.name])
                entries[mp.name] = {STEP: state[STEP].clone(), EXP_AVG: exp_avg, EXP_AVG_SQ: exp_avg_sq}
    return entries


def _gather_bases(
    part: _Partition,
    group: dict[str, Any],
    matrices: dict[str, dict[str, Tensor]],
    sharded: list[MatrixPlan],
    sides: dict[str, Side],
    flat: Tensor,
) -> dict[str, Tensor]:
    """The whole SVD bases of sharded matrices: right side from the holders' even shares of the flattened
    basis, left side from the rows whose first element each holder holds (its kept rows overlap its
    neighbours' at cut rows). Collective."""
    shapes = {}
    for mp in sharded:
        left, right = basis_shapes(mp.shape, effective_rank(group["rank"], mp.shape), sides[mp.name])
        shapes[mp.name] = right if sides[mp.name] is Side.RIGHT else left
    buffer = flat.new_zeros(sum(math.prod(shape) for shape in shapes.values()))
    views, offset = {}, 0
    for mp in sharded:
        size = math.prod(shapes[mp.name])
        views[mp.name] = buffer[offset : offset + size]
        offset += size
        if mp.piece is None:
            continue
        rank_r = effective_rank(group["rank"], mp.shape)
        mine = _my_shard(mp, part.comm.rank, sides[mp.name], rank_r)
        if sides[mp.name] is Side.RIGHT:
            views[mp.name][mine.basis[0] : mine.basis[1]] = matrices[mp.name][BASIS_RIGHT]
        else:
            (f0, f1), t0 = mine.first, mine.basis[0]
            views[mp.name].view(shapes[mp.name])[f0:f1] = matrices[mp.name][BASIS_LEFT][f0 - t0 : f1 - t0]
    part.comm.all_reduce(buffer)
    return {mp.name: views[mp.name].view(shapes[mp.name]) for mp in sharded}


def save_lowrank_state(target: Any, directory: str | os.PathLike, *, model: nn.Module | None = None) -> None:
    """Write the optimizer state of ``target`` (a DeepSpeed engine, or a plain optimizer with its ``model``)
    into ``directory``, keyed by parameter name. Collective under DeepSpeed: call it on every rank."""
    optimizer, names, rank = _resolve(target, model, "save_lowrank_state")
    directory = Path(directory)
    distributed = _is_engine(target) and dist.is_initialized()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        # A save at more ranks may have left more files: they would be read back as part of this one.
        for stale in directory.glob(f"{FILE_PREFIX}*.pt"):
            stale.unlink()
    if distributed:
        dist.barrier()
    if isinstance(optimizer.layout, FragmentLayout):
        entries = _collect_fragments(optimizer, optimizer.layout, rank)
    elif rank == 0:  # whole tensors: every rank holds the same state
        entries = {}
        for _, param, name in _dense_params(optimizer, names, "save_lowrank_state"):
            if optimizer.state.get(param):
                entries[name] = {key: value.clone() for key, value in optimizer.state[param].items()}
    else:
        entries = {}
    if entries:
        torch.save({"format": FORMAT, "params": entries}, directory / f"{FILE_PREFIX}{rank:05d}.pt")
    if distributed:
        dist.barrier()


def _read(directory: Path) -> dict[str, dict[str, Tensor]]:
    files = sorted(directory.glob(f"{FILE_PREFIX}*.pt"))
    if not files:
        raise FileNotFoundError(f"load_lowrank_state: directory {str(directory)!r} holds no {FILE_PREFIX}*.pt files.")
    entries: dict[str, dict[str, Tensor]] = {}
    for file in files:
        content = torch.load(file, map_location="cpu", weights_only=True)
        if content.get("format") != FORMAT:
            raise ValueError(f"load_lowrank_state: {str(file)!r} has format {content.get('format')!r}, not {FORMAT!r}.")
        entries.update(content["params"])
    return entries


def _entry(entries: dict[str, dict[str, Tensor]], name: str) -> dict[str, Tensor]:
    if name not in entries:
        raise KeyError(f"load_lowrank_state: the saved state has no entry for parameter {name!r}.")
    return entries[name]


def _fill(target: Tensor, saved: Tensor, name: str, key: str) -> None:
    if tuple(target.shape) != tuple(saved.shape):
        raise ValueError(
            f"load_lowrank_state: parameter {name!r} {key} was saved with shape {tuple(saved.shape)} but this "
            f"optimizer needs {tuple(target.shape)} (different rank, proj_type or projector?)."
        )
    target.copy_(saved)


def _partition_step(entries: dict[str, dict[str, Tensor]], part: _Partition) -> Tensor:
    """The one step counter of a flat partition: all its parameters must have been saved at the same step."""
    steps = {int(_entry(entries, mp.name)[STEP].item()) for mp in part.plan.matrices}
    if len(steps) != 1:
        raise ValueError(
            f"load_lowrank_state: the parameters {[mp.name for mp in part.plan.matrices]} share one flat partition "
            f"(one step counter) here but were saved at different steps {sorted(steps)}."
        )
    return torch.tensor(float(steps.pop()), dtype=torch.float32)


def _load_fragments(optimizer: GaLoreAdamW, layout: FragmentLayout, entries: dict[str, dict[str, Tensor]]) -> None:
    for flat, part in layout.projected_partitions():
        group = optimizer.param_groups[part.group_index]
        state = optimizer.state[flat]
        state.clear()
        state[STEP] = _partition_step(entries, part)
        state[MATRICES] = {}
        for mp in part.plan.matrices:
            if mp.piece is None:
                continue
            saved = _entry(entries, mp.name)
            matrix = _init_matrix_state(group, flat, mp, part.comm.rank, part.shard_moments)
            bounds = tuple(matrix[SHARD].tolist()) if SHARD in matrix else None
            side = resolve_side(group["proj_type"], mp.shape)
            rank_r = effective_rank(group["rank"], mp.shape)
            basis = _my_shard(mp, part.comm.rank, side, rank_r).basis if bounds else None
            for key, value in matrix.items():
                if key == SHARD:
                    continue
                source = saved[key]
                if bounds is not None and key in (EXP_AVG, EXP_AVG_SQ):
                    source = source[bounds[0] : bounds[1]] if side is Side.RIGHT else source[:, bounds[0] : bounds[1]]
                if basis is not None and key in (BASIS_LEFT, BASIS_RIGHT):
                    whole = basis_shapes(mp.shape, rank_r, side)[0 if key == BASIS_LEFT else 1]
                    if tuple(source.shape) != whole:
                        raise ValueError(
                            f"load_lowrank_state: parameter {mp.name!r} {key} was saved with shape "
                            f"{tuple(source.shape)} but this optimizer needs {whole} (different rank, proj_type "
                            "or projector?)."
                        )
                    start, stop = basis
                    source = source.reshape(-1)[start:stop] if side is Side.RIGHT else source[start:stop]
                _fill(value, source, mp.name, key)
            state[MATRICES][mp.name] = matrix
    for flat, part in layout.full_rank_partitions():
        group = optimizer.param_groups[part.group_index]
        state = optimizer.state[flat]
        state.clear()
        optimizer._init_state(group, flat, state)
        state[STEP] = _partition_step(entries, part)
        for mp in part.plan.matrices:
            if mp.piece is None:
                continue
            saved = _entry(entries, mp.name)
            piece = mp.piece
            for key in (EXP_AVG, EXP_AVG_SQ):
                if saved[key].numel() != mp.numel:
                    raise ValueError(
                        f"load_lowrank_state: parameter {mp.name!r} {key} has {saved[key].numel()} elements saved, "
                        f"the model's parameter has {mp.numel}."
                    )
                state[key][piece.flat_start : piece.flat_start + piece.numel] = saved[key].reshape(-1)[
                    piece.param_start : piece.param_start + piece.numel
                ]


def _load_dense(optimizer: GaLoreAdamW, names: dict[int, str], entries: dict[str, dict[str, Tensor]]) -> None:
    for group, param, name in _dense_params(optimizer, names, "load_lowrank_state"):
        saved = _entry(entries, name)
        state = optimizer.state[param]
        state.clear()
        optimizer._init_state(group, param, state)
        for key, value in state.items():
            if key not in saved:
                raise KeyError(f"load_lowrank_state: the saved state of parameter {name!r} has no {key!r}.")
            _fill(value, saved[key], name, key)


def load_lowrank_state(target: Any, directory: str | os.PathLike, *, model: nn.Module | None = None) -> None:
    """Give ``target`` (a bound DeepSpeed engine, or a plain optimizer with its ``model``) the state saved by
    :func:`save_lowrank_state` in ``directory``, at any number of ranks. Call it after ``initialize`` (and
    after DeepSpeed's ``load_checkpoint``, if any), before the next step."""
    optimizer, names, _ = _resolve(target, model, "load_lowrank_state")
    entries = _read(Path(directory))
    if isinstance(optimizer.layout, FragmentLayout):
        _load_fragments(optimizer, optimizer.layout, entries)
    else:
        _load_dense(optimizer, names, entries)
