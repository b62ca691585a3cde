"""DeepSpeed entry points: ``initialize(model, config)`` (the config plugin) and its building blocks.

Two ways to use the low-rank optimizers under DeepSpeed ZeRO (stages 0-3):

* ``engine, optimizer, _, _ = lowrank_optim.deepspeed.initialize(model, "ds_config.json")`` with a
  top-level ``"lowrank_optim"`` section in the DeepSpeed config;
* or, for trainers that call ``deepspeed.initialize`` themselves: ``param_groups_for(model, section)``,
  ``optimizer_factory(section)`` as the ``optimizer`` callable, then ``bind(engine)``.

``save_lowrank_state(engine, dir)`` / ``load_lowrank_state(engine, dir)`` keep the optimizer state by
parameter name, so that a run resumes at another number of ranks (or in one process).
"""

from .distributed import (
    LowRankSection,
    bind,
    initialize,
    load_lowrank_state,
    optimizer_factory,
    param_groups_for,
    read_config,
    save_lowrank_state,
)

__all__ = [
    "LowRankSection",
    "bind",
    "initialize",
    "load_lowrank_state",
    "optimizer_factory",
    "param_groups_for",
    "read_config",
    "save_lowrank_state",
]
