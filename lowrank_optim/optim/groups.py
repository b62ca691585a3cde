"""Param groups the way the GaLore/Fira papers build them."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..targets import find_targets

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module,
    *,
    rank: int | str,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Sequence[str] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a full-rank group and a projected group.

    The projected group holds the 2-D weight of every linear layer that ``target_modules`` selects
    (:func:`lowrank_optim.targets.find_targets`, the rule shared with SLTrain's conversion and the
    integrations; ``None``: :data:`~lowrank_optim.targets.DEFAULT_TARGET_MODULES`, the attention and MLP
    projections of LLaMA, GPT-NeoX, GPT-2, BERT and similar models; the GaLore and Fira scripts use
    ``("attn", "mlp")``); embeddings, ``lm_head``, norms and biases stay full-rank. The defaults are the
    papers' pretraining recipe (gap 200, scale 0.25). ``group_options`` go into the projected group too
    (e.g. ``moment_policy="reset"``; with ``rank="auto"``, ``state_budget=B``: :mod:`lowrank_optim.optim.ranks`).
    ``print(find_targets(model, target_modules))`` shows what is
    projected and what is not. Returns plain dicts:
    ``[{"params": full_rank}, {"params": low_rank, "rank": ..., "update_proj_gap": ..., ...}]``.
    """
    lowrank = [target.weight for target in find_targets(model, target_modules).targets]
    lowrank_ids = {id(p) for p in lowrank}
    full_rank = [p for p in model.parameters() if p.requires_grad and id(p) not in lowrank_ids]
    projected = dict(
        params=lowrank, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, **group_options
    )
    return ([{"params": full_rank}] if full_rank else []) + [projected]
