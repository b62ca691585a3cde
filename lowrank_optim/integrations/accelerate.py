"""Hugging Face Accelerate with the low-rank optimizers::

    from lowrank_optim.integrations.accelerate import prepare

    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2))  # or no plugin
    model, optimizer, loader = prepare(accelerator, model, GaLoreAdamW(param_groups(model, rank=128)), loader)

:func:`prepare` is ``accelerator.prepare`` followed, when Accelerate built a DeepSpeed engine, by
:func:`lowrank_optim.distributed.bind` of that engine (ZeRO's flat partitions; at stage 0 with bf16/fp16
it undoes the zero-gradient step DeepSpeed's wrapper takes while it is built, which a plain
``accelerator.prepare`` leaves in: a silent extra step). Without DeepSpeed (one process, DDP) it is
``accelerator.prepare`` itself. Call it once, with the optimizer among the objects.
"""

from __future__ import annotations

from typing import Any

from ..distributed.zero import bind
from ..optim.galore import GaLoreAdamW

__all__ = ["prepare"]


def prepare(accelerator: Any, *objects: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*objects, **kwargs)``, then bind a DeepSpeed engine it built to the low-rank
    optimizer among ``objects`` (which must hold exactly one :class:`~lowrank_optim.GaLoreAdamW` or
    subclass)."""
    ours = [obj for obj in objects if isinstance(obj, GaLoreAdamW)]
    if len(ours) != 1:
        raise ValueError(
            f"prepare(accelerator, ...) needs exactly one lowrank_optim optimizer among the objects; got {len(ours)} "
            f"({', '.join(type(obj).__name__ for obj in objects)})."
        )
    prepared = accelerator.prepare(*objects, **kwargs)
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is not None:
        bind(wrapped.engine)
    return prepared
