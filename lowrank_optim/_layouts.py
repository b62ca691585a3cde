"""Registers the layouts an optimizer finds from its parameters (:func:`lowrank_optim.optim.layout.layout_for`).

Imported by the package itself, so that ``GaLoreAdamW(model.parameters())`` on a model wrapped with
FSDP2's ``fully_shard`` steps its shards with no extra call, while :mod:`lowrank_optim.optim` itself
imports nothing from :mod:`lowrank_optim.distributed`.
"""

import torch.distributed

if torch.distributed.is_available():
    from .distributed import fsdp2  # noqa: F401
