"""Optimizer state keyed by parameter name: resume a run on a different number of ranks (or in one process).

DeepSpeed's own checkpoints are rigid (per-rank files, refused at another data-parallel size) and its
universal checkpoints only know flat Adam state. :func:`save_lowrank_state` writes, per parameter name,
exactly the state a single-process optimizer keeps for that parameter:

* projected matrices: ``step``, the low-rank moments and the bases (both reassembled when sharded
  among ranks) or DCT indices, and Fira's ``residual_norm``; in a ``rank="auto"`` group also the matrix's
  rank (``matrix_rank``, a 0-d int64 tensor), at which the loader rebuilds its state;
* full-rank parameters: ``step`` and Adam's moments with the parameter's shape (reassembled from the
  pieces of the flat partitions).

Each parameter is written by one rank only (one of the ranks holding a piece of it, in turns) into
``lowrank_state_rank{k}.{generation}.pt``, and rank 0 then writes the manifest ``lowrank_state.json``
(generation, world size, every file with its size and SHA-256): a save replaces the previous one only
as a whole (see :func:`save_lowrank_state`). Files hold only tensors and strings, so
``torch.load(weights_only=True)`` reads them. :func:`load_lowrank_state` verifies and reads every file the
manifest names and gives each rank's optimizer the slices its own layout needs, whatever the number of
ranks or the ZeRO stage (a plain optimizer in one process included); it also reads directories saved
before manifests existed (``lowrank_state_rank{k:05d}.pt``, no manifest). The model weights (the fp32
masters) are not part of it: save them with the model's ``state_dict`` (at ZeRO-3 gathered, e.g. with
``deepspeed.zero.GatheredParameters``) and load them into the model before ``initialize``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._io import atomic_save, atomic_write_text, file_sha256
from ..optim.galore import GaLoreAdamW, _moment_placement, matrix_shape
from ..optim.ranks import AUTO, charged_bytes
from ..projection import ProjectorTensor, Side, basis_shapes, keeps_aligned, resolve_side
from ..state_keys import BASIS_LEFT, BASIS_RIGHT, EXP_AVG, EXP_AVG_SQ, MATRIX_RANK, STEP
from .fragment import (
    MATRICES,
    RANKS,
    SHARD,
    FragmentLayout,
    _all_reduce_tensors,
    _init_matrix_state,
    _my_shard,
    _Partition,
    _Piece,
    _quantizing,
    _rank_of,
    _sharded,
    _span,
)
from .plan import MatrixPlan

__all__ = ["load_lowrank_state", "save_lowrank_state"]

FILE_PREFIX = "lowrank_state_rank"
#: The content of each per-rank file (unchanged since before the manifest): ``{"format", "params"}``.
FORMAT = "lowrank_optim.named_state.v1"
#: The manifest of a save: which files (by rank), their sizes and SHA-256s; rank 0 writes it last.
MANIFEST = "lowrank_state.json"
MANIFEST_FORMAT = "lowrank_optim.named_state.manifest.v1"


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
) -> Iterator[tuple[int, dict[str, Any], Tensor, str]]:
    """``(group index, group, parameter, name)`` of every parameter (the index from the enumeration: a
    lookup by ``param_groups.index(group)`` would compare the groups' tensors)."""
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(
                    f"{where}: a tensor of shape {tuple(param.shape)} in param group {index} is not a parameter of "
                    "the model, so it has no name to key its state by."
                )
            yield index, group, param, names[id(param)]


def _writer(mp: MatrixPlan, index: int) -> int:
    """The rank that writes a parameter: its holders take turns (at ZeRO-3 every rank holds a piece of
    everything, and the lowest holder would write it all)."""
    return mp.holders[index % len(mp.holders)]


def _moment_specs(
    group: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype, rank: int | None = None
) -> list[ProjectorTensor]:
    """The whole state tensors of a parameter's moments in its group's ``moment_format`` (plain moments, or
    8-bit codes and scales), as the optimizer's ``_init_state`` builds them for a parameter of ``dtype``
    (``rank``: a ``rank="auto"`` matrix's own)."""
    moment_shape, sharding = _moment_placement(group, shape, rank)
    return group["moment_format"].tensors(moment_shape, group["moment_dtype"] or dtype, sharding)


def _summable(specs: list[ProjectorTensor], default: torch.dtype) -> list[ProjectorTensor]:
    """``specs`` in a dtype an all-reduce sums exactly: 8-bit codes travel as fp32 (every code is exact)."""
    return [spec._replace(dtype=torch.float32) if spec.dtype == torch.uint8 else spec._replace(dtype=spec.dtype or default)
            for spec in specs]


def _shard_view(tensor: Tensor, sharding: str, start: int, stop: int) -> Tensor:
    """A sharded matrix's share ``[start, stop)`` of a whole moment tensor (``SHARD``): rows of ``R`` (right
    side), columns of ``R`` (left side; rows of quantized moments, which store them transposed)."""
    return tensor[:, start:stop] if sharding == "columns" else tensor[start:stop]


def _saved_value(value: Any) -> Any:
    """A state value as the files keep it: tensors cloned, a ``rank="auto"`` matrix's ``matrix_rank`` (a
    plain int in the optimizer) as a 0-d int64 tensor."""
    return torch.tensor(value, dtype=torch.int64) if isinstance(value, int) else value.clone()


def _saved_rank(group: dict[str, Any], index: int, entries: dict[str, dict[str, Tensor]], name: str, shape: Sequence[int]) -> int:
    """The rank a matrix of a ``rank="auto"`` group was saved at, checked against its shape."""
    saved = _entry(entries, name)
    if MATRIX_RANK not in saved:
        raise ValueError(
            f"load_lowrank_state: parameter {name!r} was saved without a {MATRIX_RANK!r} (from a group with a fixed "
            f"rank), but param group {index} has rank='auto'. Allowed: a save of a rank='auto' group, or this "
            "group with the rank it was saved with."
        )
    value = saved[MATRIX_RANK]
    largest = min(shape)
    rank = int(value.item()) if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() else None
    if rank is None or not 0 <= rank <= largest:
        raise ValueError(
            f"load_lowrank_state: parameter {name!r} has {MATRIX_RANK} {value!r} saved; allowed: an integer in "
            f"[0, {largest}] for its shape {tuple(shape)}."
        )
    return rank


def _check_budget(
    optimizer: GaLoreAdamW, group: dict[str, Any], index: int, matrices: list[tuple[tuple[int, ...], torch.dtype, int]]
) -> None:
    """The saved ranks of a ``rank="auto"`` group must fit its ``state_budget`` (a resume with a smaller budget
    would hold more until the next refresh): charged as a refresh charges them, at least the rank-1 cost."""

    def cost(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[int], int]:
        like = torch.empty(shape, dtype=dtype, device="meta")
        return lambda rank: optimizer.rank_state_bytes(group, like, rank)

    held = sum(charged_bytes(cost(shape, dtype), rank) for shape, dtype, rank in matrices)
    if held > group["state_budget"]:
        raise ValueError(
            f"load_lowrank_state: the saved ranks of param group {index} hold {held} bytes of state, more than its "
            f"state_budget {group['state_budget']}; allowed: a state_budget of at least {held} (the budget the "
            "save was made with, or more)."
        )


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
        table: dict[str, int] | None = state.get(RANKS)  # rank="auto": every matrix's rank
        ranks = {mp.name: _rank_of(group, mp, None if table is None else table[mp.name]) for mp in part.plan.matrices}
        sides = {mp.name: resolve_side(group["proj_type"], mp.shape) for mp in part.plan.matrices}
        # Sharded state: holders write their shares into zero-padded whole moments (and SVD bases; each
        # element written by exactly one holder); one all-reduce per dtype.
        sharded = [mp for mp in part.plan.matrices if _sharded(part, mp, sides[mp.name])]
        full_moments: dict[str, dict[str, Tensor]] = {}
        full_bases: dict[str, Tensor] = {}
        if sharded:
            specs = [_moment_specs(group, mp.shape, flat.dtype, ranks[mp.name]) for mp in sharded]
            shares: list[list[Tensor | None] | None] = []
            for mp, entry_specs in zip(sharded, specs):
                if mp.piece is None:
                    shares.append(None)
                    continue
                start, stop = matrices[mp.name][SHARD].tolist()
                wholes: list[Tensor | None] = []
                for spec in _summable(entry_specs, flat.dtype):
                    whole = torch.zeros(spec.shape, dtype=spec.dtype, device=flat.device)
                    _shard_view(whole, spec.sharding, start, stop).copy_(matrices[mp.name][spec.key])
                    wholes.append(whole)
                shares.append(wholes)
            summed = _all_reduce_tensors(
                part.comm, flat.device, shares, [_summable(entry, flat.dtype) for entry in specs], flat.dtype
            )
            for mp, entry_specs, tensors in zip(sharded, specs, summed):
                full_moments[mp.name] = {
                    spec.key: tensor.to(spec.dtype or flat.dtype) for spec, tensor in zip(entry_specs, tensors)
                }
            if keeps_aligned(group["projector"]):
                full_bases = _gather_bases(part, matrices, sharded, sides, ranks, flat)
        for index, mp in enumerate(part.plan.matrices):
            if _writer(mp, index) != rank:
                continue
            entry = {key: _saved_value(value) for key, value in matrices[mp.name].items() if key != SHARD}
            if table is not None:  # also held here: its state's matrix_rank, the same value
                entry[MATRIX_RANK] = torch.tensor(table[mp.name], dtype=torch.int64)
            if mp.name in full_moments:
                entry.update({key: value.clone() for key, value in full_moments[mp.name].items()})
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
        if MATRICES in state:  # quantized moments, per piece
            entries.update(_collect_pieces(optimizer.param_groups[part.group_index], flat, part, state, rank))
            continue
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


def _collect_pieces(
    group: dict[str, Any], flat: Tensor, part: _Partition, state: dict[str, Any], rank: int
) -> dict[str, dict[str, Tensor]]:
    """The whole moments (codes and scales) of a quantized full-rank partition's parameters: each holder
    writes the rows (1-D: blocks) whose first element it holds (``_Span.first``; a row cut between holders
    is kept by both, alike), one all-reduce per dtype. Collective."""
    fmt = group["moment_format"]
    specs = [_moment_specs(group, mp.shape, flat.dtype) for mp in part.plan.matrices]
    shares: list[list[Tensor | None] | None] = []
    for mp, entry_specs in zip(part.plan.matrices, specs):
        if mp.piece is None:
            shares.append(None)
            continue
        span = _span(mp, fmt)
        wholes: list[Tensor | None] = []
        for spec in _summable(entry_specs, flat.dtype):
            whole = torch.zeros(spec.shape, dtype=spec.dtype, device=flat.device)
            local = state[MATRICES][mp.name][spec.key]
            span.select(whole, spec.shape, span.first, 0).copy_(span.select(local, spec.shape, span.first, span.units[0]))
            wholes.append(whole)
        shares.append(wholes)
    summed = _all_reduce_tensors(part.comm, flat.device, shares, [_summable(e, flat.dtype) for e in specs], flat.dtype)
    entries = {}
    for index, (mp, entry_specs, tensors) in enumerate(zip(part.plan.matrices, specs, summed)):
        if _writer(mp, index) == rank:
            entry = {spec.key: tensor.to(spec.dtype or flat.dtype) for spec, tensor in zip(entry_specs, tensors)}
            entries[mp.name] = {STEP: state[STEP].clone(), **entry}
    return entries


def _gather_bases(
    part: _Partition,
    matrices: dict[str, dict[str, Tensor]],
    sharded: list[MatrixPlan],
    sides: dict[str, Side],
    ranks: dict[str, int],
    flat: Tensor,
) -> dict[str, Tensor]:
    """The whole SVD bases of sharded matrices: right side from the holders' even shares of the flattened
    basis, left side from the rows whose first element each holder holds (its kept rows overlap its
    neighbours' at cut rows). Collective."""
    shapes: dict[str, tuple[int, int]] = {}
    for mp in sharded:
        left, right = basis_shapes(mp.shape, ranks[mp.name], sides[mp.name])
        shape = right if sides[mp.name] is Side.RIGHT else left
        assert shape is not None  # the side in use has its basis
        shapes[mp.name] = shape
    buffer = flat.new_zeros(sum(math.prod(shape) for shape in shapes.values()))
    views, offset = {}, 0
    for mp in sharded:
        size = math.prod(shapes[mp.name])
        views[mp.name] = buffer[offset : offset + size]
        offset += size
        if mp.piece is None:
            continue
        mine = _my_shard(mp, part.comm.rank, sides[mp.name], ranks[mp.name])
        if sides[mp.name] is Side.RIGHT:
            views[mp.name][mine.basis[0] : mine.basis[1]] = matrices[mp.name][BASIS_RIGHT]
        else:
            (f0, f1), t0 = mine.first, mine.basis[0]
            views[mp.name].view(shapes[mp.name])[f0:f1] = matrices[mp.name][BASIS_LEFT][f0 - t0 : f1 - t0]
    part.comm.all_reduce(buffer)
    return {mp.name: views[mp.name].view(shapes[mp.name]) for mp in sharded}


def _collect(optimizer: GaLoreAdamW, names: dict[int, str], rank: int) -> dict[str, dict[str, Tensor]]:
    """What this rank writes, per parameter name (collective under DeepSpeed)."""
    if isinstance(optimizer.layout, FragmentLayout):
        return _collect_fragments(optimizer, optimizer.layout, rank)
    entries: dict[str, dict[str, Tensor]] = {}
    # Decided alike on every rank (the state is replicated), before anything is written: an empty save
    # would otherwise replace a good one by a manifest that names no file.
    if not any(optimizer.state.get(param) for group in optimizer.param_groups for param in group["params"]):
        raise RuntimeError("save_lowrank_state: the optimizer has not stepped yet (no state to save); save after a step.")
    if rank == 0:  # whole tensors: every rank holds the same state
        for _, _, param, name in _dense_params(optimizer, names, "save_lowrank_state"):
            if optimizer.state.get(param):
                entries[name] = {key: _saved_value(value) for key, value in optimizer.state[param].items()}
    return entries


def _all_gather(value: Any, distributed: bool) -> list[Any]:
    """Every rank's ``value`` (a small picklable object), on every rank."""
    if not distributed:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _remove(paths: Any) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def save_lowrank_state(target: Any, directory: str | os.PathLike, *, model: nn.Module | None = None) -> None:
    """Write the optimizer state of ``target`` (a DeepSpeed engine, or a plain optimizer with its ``model``)
    into ``directory``, keyed by parameter name. Collective under DeepSpeed: call it on every rank.

    Atomic as a set: the files of this save get a fresh generation id in their names and are written
    atomically (``.._io.atomic_save``); only when every rank's file is in place does rank 0 replace the
    manifest ``lowrank_state.json`` (atomically too), and only then are the files of earlier saves
    removed. A save that fails or is killed at any point leaves the previous save loadable: its
    manifest still names its files. A failure on any rank is raised on every rank (no rank waits forever).
    """
    optimizer, names, rank = _resolve(target, model, "save_lowrank_state")
    directory = Path(directory)
    distributed = _is_engine(target) and dist.is_initialized()
    generation = [secrets.token_hex(8) if rank == 0 else None]
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if distributed:
        dist.broadcast_object_list(generation, src=0)  # also the barrier after the mkdir
    entries = _collect(optimizer, names, rank)
    mine: dict[str, Any] | None = None
    local_error: Exception | None = None  # raised as it is on the rank where it happened
    if entries:
        name = f"{FILE_PREFIX}{rank:05d}.{generation[0]}.pt"
        try:
            written = atomic_save({"format": FORMAT, "params": entries}, directory / name, checksum=True)
            mine = {"name": name, "rank": rank, "bytes": written.size, "sha256": written.sha256}
        except Exception as error:  # told to every rank below, then raised everywhere
            local_error = error
            mine = {"name": name, "rank": rank, "error": f"{type(error).__name__}: {error}"}
    reports = [report for report in _all_gather(mine, distributed) if report is not None]
    failed = [report for report in reports if "error" in report]
    new_files = [directory / report["name"] for report in reports]
    outcome: list[str | None] = [None]
    if failed:
        outcome[0] = "; ".join(f"rank {report['rank']}: {report['error']}" for report in failed)
    elif rank == 0:
        manifest = {
            "format": MANIFEST_FORMAT,
            "generation": generation[0],
            "world_size": dist.get_world_size() if distributed else 1,
            "file_format": FORMAT,
            "files": [{key: report[key] for key in ("name", "rank", "bytes", "sha256")} for report in reports],
        }
        try:
            atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        except Exception as error:
            local_error = error
            outcome[0] = f"rank 0: {type(error).__name__}: {error}"
        else:
            # The new set is the one loaded now; earlier generations (and a pre-manifest save's files) go.
            _remove(path for path in directory.glob(f"{FILE_PREFIX}*.pt") if path not in new_files)
    if distributed:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        if rank == 0:  # this save's files are named by no manifest: remove them
            _remove(new_files)
        if local_error is not None:
            raise local_error
        raise OSError(
            f"save_lowrank_state: saving into {str(directory)!r} failed ({outcome[0]}); the previous save there "
            "(if any) is unchanged"
        )


def _legacy_files(directory: Path) -> list[Path]:
    """The files of a save made before the manifest existed: exactly ``lowrank_state_rankNNNNN.pt``. Files
    with a generation id in their name belong to a manifest (or to a save killed before it wrote one) and
    are never read as part of a legacy set."""
    pattern = re.compile(rf"^{FILE_PREFIX}\d+\.pt$")
    return sorted(path for path in directory.glob(f"{FILE_PREFIX}*.pt") if pattern.match(path.name))


def _manifest_files(directory: Path, manifest_path: Path) -> list[Path]:
    """The files the manifest names, each verified (present, its size, its SHA-256) before it is read."""
    shown = str(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"load_lowrank_state: manifest {shown!r} cannot be read ({error}).") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"load_lowrank_state: manifest {shown!r} has format {found!r}, not {MANIFEST_FORMAT!r}.")
    files = []
    for item in manifest.get("files", []):
        path = directory / item["name"]
        if not path.is_file():
            raise FileNotFoundError(f"load_lowrank_state: {str(path)!r}, named by manifest {shown!r}, is missing.")
        size = path.stat().st_size
        if size != item["bytes"]:
            raise ValueError(
                f"load_lowrank_state: {str(path)!r} has {size} bytes, the manifest recorded {item['bytes']} "
                "(truncated or replaced)."
            )
        digest = file_sha256(path)
        if digest != item["sha256"]:
            raise ValueError(
                f"load_lowrank_state: {str(path)!r} is corrupted: SHA-256 {digest[:16]}..., the manifest recorded "
                f"{item['sha256'][:16]}...."
            )
        files.append(path)
    return files


def _read(directory: Path) -> dict[str, dict[str, Tensor]]:
    manifest_path = directory / MANIFEST
    if manifest_path.exists():
        files = _manifest_files(directory, manifest_path)
        if not files:
            raise FileNotFoundError(f"load_lowrank_state: manifest {str(manifest_path)!r} names no state file.")
    else:
        files = _legacy_files(directory)
        if not files:
            raise FileNotFoundError(
                f"load_lowrank_state: directory {str(directory)!r} holds no {FILE_PREFIX}*.pt files "
                f"(and no {MANIFEST} manifest)."
            )
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


def _saved(saved: dict[str, Tensor], name: str, key: str) -> Tensor:
    if key not in saved:
        raise KeyError(
            f"load_lowrank_state: the saved state of parameter {name!r} has no {key!r} (saved with another "
            "moment_format or projector?)."
        )
    return saved[key]


def _check_whole(saved: Tensor, shape: Sequence[int], name: str, key: str) -> None:
    if tuple(saved.shape) != tuple(shape):
        raise ValueError(
            f"load_lowrank_state: parameter {name!r} {key} was saved with shape {tuple(saved.shape)} but this "
            f"optimizer needs {tuple(shape)} (different rank, proj_type, projector or moment_format?)."
        )


def _fill(target: Tensor, saved: Tensor, name: str, key: str) -> None:
    if target.dtype.is_floating_point != saved.dtype.is_floating_point:
        # 8-bit codes copied into plain moments (or floats into codes) would load silently wrong values.
        raise ValueError(
            f"load_lowrank_state: parameter {name!r} {key} was saved as {saved.dtype} but this optimizer keeps it "
            f"as {target.dtype} (saved with another moment_format?)."
        )
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


# The loaders below build every parameter's (or flat partition's) new state in fresh dicts and touch
# nothing of the optimizer; load_lowrank_state assigns them only once all were built. So a missing entry
# or a shape mismatch, even at the last parameter, leaves the optimizer's state exactly as it was. The
# price: old and new state coexist for the duration of the load.
_NewStates = list[tuple[Tensor, dict[str, Any]]]


def _build_fragments(
    optimizer: GaLoreAdamW, layout: FragmentLayout, entries: dict[str, dict[str, Tensor]]
) -> _NewStates:
    built: _NewStates = []
    # rank="auto": the saved ranks of each group's matrices, over all its partitions (ZeRO-3 sub-groups).
    auto: dict[int, list[tuple[tuple[int, ...], torch.dtype, int]]] = {}
    for flat, part in layout.projected_partitions():
        group = optimizer.param_groups[part.group_index]
        state: dict[str, Any] = {STEP: _partition_step(entries, part), MATRICES: {}}
        table: dict[str, int] | None = None
        if group["rank"] == AUTO:
            # Every matrix of the partition, held here or not (every rank reads every file): its rank table.
            table = {mp.name: _saved_rank(group, part.group_index, entries, mp.name, mp.shape) for mp in part.plan.matrices}
            auto.setdefault(part.group_index, []).extend((mp.shape, flat.dtype, table[mp.name]) for mp in part.plan.matrices)
            state[RANKS] = table
        for mp in part.plan.matrices:
            if mp.piece is None:
                continue
            saved = _entry(entries, mp.name)
            rank_r = _rank_of(group, mp, None if table is None else table[mp.name])
            init = functools.partial(optimizer._init_state, group)
            matrix = _init_matrix_state(init, group, flat, mp, part, None if table is None else rank_r)
            bounds = tuple(matrix[SHARD].tolist()) if SHARD in matrix else None
            side = resolve_side(group["proj_type"], mp.shape)
            basis = _my_shard(mp, part.comm.rank, side, rank_r).basis if bounds else None
            moments = {spec.key: spec for spec in _moment_specs(group, mp.shape, flat.dtype, rank_r)}
            for key, value in matrix.items():
                if key in (SHARD, MATRIX_RANK):  # the rank was built in; the shard is this layout's
                    continue
                source = _saved(saved, mp.name, key)
                if bounds is not None and key in moments:
                    _check_whole(source, moments[key].shape, mp.name, key)
                    source = _shard_view(source, moments[key].sharding, *bounds)
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
        built.append((flat, state))
    for index, matrices in auto.items():
        _check_budget(optimizer, optimizer.param_groups[index], index, matrices)
    for flat, part in layout.full_rank_partitions():
        group = optimizer.param_groups[part.group_index]
        if _quantizing(group):
            built.append((flat, _build_pieces(optimizer, group, flat, part, entries)))
            continue
        state = {}
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
        built.append((flat, state))
    return built


def _build_pieces(
    optimizer: GaLoreAdamW, group: dict[str, Any], flat: Tensor, part: _Partition, entries: dict[str, dict[str, Tensor]]
) -> dict[str, Any]:
    """The state of a quantized full-rank partition: each piece's rows (1-D: blocks) of the saved whole moments."""
    fmt = group["moment_format"]
    state: dict[str, Any] = {STEP: _partition_step(entries, part), MATRICES: {}}
    for mp in part.plan.matrices:
        if mp.piece is None:
            continue
        saved = _entry(entries, mp.name)
        span = _span(mp, fmt)
        piece: dict[str, Any] = {}
        like: Any = _Piece(tuple(mp.shape), flat.dtype, flat.device, span)  # what FragmentLayout.new_state places
        optimizer._init_state(group, like, piece)
        piece.pop(STEP, None)
        for spec in _moment_specs(group, mp.shape, flat.dtype):
            source = _saved(saved, mp.name, spec.key)
            _check_whole(source, spec.shape, mp.name, spec.key)
            _fill(piece[spec.key], span.select(source, spec.shape, span.units, 0), mp.name, spec.key)
        state[MATRICES][mp.name] = piece
    return state


def _build_dense(optimizer: GaLoreAdamW, names: dict[int, str], entries: dict[str, dict[str, Tensor]]) -> _NewStates:
    built: _NewStates = []
    auto: dict[int, list[tuple[tuple[int, ...], torch.dtype, int]]] = {}
    for index, group, param, name in _dense_params(optimizer, names, "load_lowrank_state"):
        saved = _entry(entries, name)
        state: dict[str, Any] = {}
        if group.get("rank") == AUTO:  # built at the saved rank
            state[MATRIX_RANK] = _saved_rank(group, index, entries, name, matrix_shape(param))
            auto.setdefault(index, []).append((matrix_shape(param), param.dtype, state[MATRIX_RANK]))
        optimizer._init_state(group, param, state)
        for key, value in state.items():
            if key == MATRIX_RANK:
                continue
            if key not in saved:
                raise KeyError(f"load_lowrank_state: the saved state of parameter {name!r} has no {key!r}.")
            _fill(value, saved[key], name, key)
        built.append((param, state))
    for index, matrices in auto.items():
        _check_budget(optimizer, optimizer.param_groups[index], index, matrices)
    return built


def load_lowrank_state(target: Any, directory: str | os.PathLike, *, model: nn.Module | None = None) -> None:
    """Give ``target`` (a bound DeepSpeed engine, or a plain optimizer with its ``model``) the state saved by
    :func:`save_lowrank_state` in ``directory``, at any number of ranks. Call it after ``initialize`` (and
    after DeepSpeed's ``load_checkpoint``, if any), before the next step.

    The manifest's files are verified (sizes, SHA-256) before they are read; a directory written before
    manifests existed (``lowrank_state_rankNNNNN.pt`` only) is read as it was. If anything fails (a
    damaged file, a missing parameter, a shape mismatch) the optimizer's state is left as it was."""
    optimizer, names, _ = _resolve(target, model, "load_lowrank_state")
    entries = _read(Path(directory))
    if isinstance(optimizer.layout, FragmentLayout):
        built = _build_fragments(optimizer, optimizer.layout, entries)
    else:
        built = _build_dense(optimizer, names, entries)
    for tensor, state in built:  # nothing below can fail: the assignment is all or nothing
        current = optimizer.state[tensor]
        current.clear()
        current.update(state)
