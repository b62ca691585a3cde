"""The one ``torch.library`` fragment that owns the ``lowrank_optim`` operator namespace.

Every module under ``lowrank_optim.ops`` defines its schemas and default kernels on :data:`LIBRARY`
(never on a ``Library`` object of its own), so the namespace is declared in exactly one place and
each op is defined exactly once per process.
"""

from __future__ import annotations

import torch

__all__ = ["LIBRARY", "NAMESPACE", "qualified_name"]

NAMESPACE = "lowrank_optim"

# "FRAGMENT" (not "DEF") so that a compiled extension may also contribute to this namespace.
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def qualified_name(op_name: str) -> str:
    """``"lowrank_optim::<op_name>"``, the form ``torch.library.register_*`` expects."""
    return f"{NAMESPACE}::{op_name}"
