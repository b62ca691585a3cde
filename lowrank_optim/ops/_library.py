"""The one ``torch.library`` fragment that owns the ``lowrank_optim`` operator namespace.

Every module under ``lowrank_optim.ops`` defines its schemas and default kernels on :data:`LIBRARY`
(never on a ``Library`` object of its own), so the namespace is declared in exactly one place and
each op is defined exactly once per process.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LIBRARY", "NAMESPACE", "check_skip", "qualified_name"]

NAMESPACE = "lowrank_optim"

# "FRAGMENT" (not "DEF") so that a compiled extension may also contribute to this namespace.
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def qualified_name(op_name: str) -> str:
    """``"lowrank_optim::<op_name>"``, the form ``torch.library.register_*`` expects."""
    return f"{NAMESPACE}::{op_name}"


def check_skip(op_name: str, skip: Tensor | None, device: torch.device) -> None:
    """The optional ``skip`` argument of the optimizer ops: a 0-dim bool tensor on the op's device."""
    if skip is None:
        return
    if not isinstance(skip, Tensor) or skip.dim() != 0 or skip.dtype != torch.bool or skip.device != device:
        description = (
            f"a {skip.dim()}-dim {skip.dtype} tensor on {skip.device}" if isinstance(skip, Tensor) else repr(skip)
        )
        raise ValueError(f"{op_name}: skip is {description}; allowed: None or a 0-dim torch.bool tensor on {device}")
