"""Param groups the way the GaLore/Fira papers build them."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module,
    *,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Sequence[str] = ("attn", "mlp"),
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a full-rank group and a projected group.

    The projected group holds the 2-D ``weight`` of every ``nn.Linear`` whose qualified module name
    contains one of ``target_modules`` (the pretraining scripts of GaLore and Fira use
    ``("attn", "mlp")``); embeddings, ``lm_head``, norms and biases stay full-rank. The defaults are
    the papers' pretraining recipe (gap 200, scale 0.25). ``group_options`` go into the projected
    group too (e.g. ``moment_policy="reset"``). Returns plain dicts:
    ``[{"params": full_rank}, {"params": low_rank, "rank": ..., "update_proj_gap": ..., ...}]``.
    """
    if isinstance(target_modules, str):
        raise TypeError(f"target_modules must be a sequence of strings, not the string {target_modules!r}.")
    lowrank_ids: set[int] = set()
    lowrank = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(target in name for target in target_modules):
            if module.weight.requires_grad and id(module.weight) not in lowrank_ids:
                lowrank_ids.add(id(module.weight))
                lowrank.append(module.weight)
    if not lowrank:
        linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        raise ValueError(
            f"target_modules {tuple(target_modules)} match no nn.Linear module of the model "
            f"(its Linear modules include {linear_names[:5]})."
        )
    full_rank = [p for p in model.parameters() if p.requires_grad and id(p) not in lowrank_ids]
    projected = dict(
        params=lowrank, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, **group_options
    )
    return ([{"params": full_rank}] if full_rank else []) + [projected]
