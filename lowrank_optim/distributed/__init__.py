"""Layouts for DeepSpeed ZeRO: low-rank optimizers on fragments (ZeRO-1/2) and shards (ZeRO-3) of matrices.

The only subpackage that touches DeepSpeed, and only lazily (``plugin.initialize`` imports it); the rest
reads the attributes of an engine that already exists.
"""

from .checkpoint import load_lowrank_state, save_lowrank_state
from .comm import Communicator, TorchCommunicator
from .fragment import FragmentLayout
from .plan import MatrixPlan, PartitionPlan, Piece, zero3_plans, zero12_plans
from .plugin import LowRankSection, initialize, optimizer_factory, param_groups_for, read_config
from .zero import bind

__all__ = [
    "Communicator",
    "FragmentLayout",
    "LowRankSection",
    "MatrixPlan",
    "PartitionPlan",
    "Piece",
    "TorchCommunicator",
    "bind",
    "initialize",
    "load_lowrank_state",
    "optimizer_factory",
    "param_groups_for",
    "read_config",
    "save_lowrank_state",
    "zero12_plans",
    "zero3_plans",
]
