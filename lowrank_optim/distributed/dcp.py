"""``torch.distributed.checkpoint`` (DCP) with ``rank="auto"`` groups: make the state the shapes it was saved with.

DCP loads in place: ``get_state_dict`` hands it the optimizer's state tensors, and it fills each with the
saved tensor of the same key, refusing one of another shape. A ``rank="auto"`` matrix's state follows
its rank (:mod:`lowrank_optim.optim.ranks`), which a fresh optimizer does not know yet. So before
``dcp.load``, :func:`match_saved_ranks` reads the saved ranks (small integers, one DCP read) and rebuilds
each matrix whose rank differs at the saved one (:meth:`GaLoreAdamW.set_matrix_rank`), putting the new
tensors into the state dict that ``dcp.load`` then fills::

    model_state, optim_state = get_state_dict(model, optimizer)
    match_saved_ranks(optimizer, optim_state, checkpoint_id)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

Whole shapes are saved, so this works at any number of ranks (resharding).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

from ..optim.ranks import AUTO
from ..state_keys import MATRIX_RANK

__all__ = ["match_saved_ranks"]

#: What a rank reads as when the checkpoint has none for a matrix (DCP leaves a missing entry as it was).
_MISSING = -1


def match_saved_ranks(
    optimizer: Any, optim_state_dict: dict[str, Any], checkpoint_id: str | os.PathLike[str], *, key: str = "optim"
) -> int:
    """Rebuild the state of every ``rank="auto"`` matrix of ``optimizer`` whose saved rank differs, and
    put its new tensors into ``optim_state_dict`` (what ``get_state_dict`` returned, keyed by parameter
    names), so that ``dcp.load`` can fill them. ``key``: where the optimizer's state sits in the saved
    dict (``{"optim": optim_state, ...}`` above). Returns how many matrices were rebuilt. Call it on
    every rank (it reads the checkpoint collectively, as ``dcp.load`` does)."""
    groups, saved_groups = optimizer.param_groups, optim_state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise ValueError(
            f"match_saved_ranks: optim_state_dict has {len(saved_groups) if isinstance(saved_groups, list) else 'no'} "
            f"param groups, the optimizer {len(groups)}; allowed: the dict get_state_dict(model, optimizer) returned."
        )
    auto = [
        (param, name)
        for group, saved in zip(groups, saved_groups)
        if group.get("rank") == AUTO
        for param, name in zip(group["params"], saved["params"])
    ]
    if not auto:
        return 0
    request = {key: {"state": {name: {MATRIX_RANK: _MISSING} for _, name in auto}}}
    # A partial load leaves a rank that is not in the checkpoint as it was, which is then refused by name.
    dcp.load(request, checkpoint_id=checkpoint_id, planner=DefaultLoadPlanner(allow_partial_load=True))
    rebuilt = 0
    for param, name in auto:
        rank = request[key]["state"][name][MATRIX_RANK]
        if rank == _MISSING:
            raise ValueError(
                f"match_saved_ranks: the checkpoint {os.fspath(checkpoint_id)!r} has no {key}.state.{name}.{MATRIX_RANK}: "
                "it was not saved from a rank='auto' group (or key names another entry). Allowed: a checkpoint "
                "of the same rank='auto' configuration."
            )
        state = optimizer.state.get(param)
        if not state or name not in optim_state_dict.get("state", {}):
            raise ValueError(
                f"match_saved_ranks: {name} has no state to load into yet; allowed: the state dict of "
                "get_state_dict(model, optimizer), which initializes every parameter's state first."
            )
        if state[MATRIX_RANK] == rank:
            continue
        optimizer.set_matrix_rank(param, rank)
        entry = optim_state_dict["state"][name]
        for stale in [k for k in entry if k not in state]:
            del entry[stale]
        entry.update(state)
        rebuilt += 1
    return rebuilt
