"""The one ``torch.library`` fragment that owns the ``lowrank_optim`` operator namespace.

Every module under ``lowrank_optim.ops`` defines its schemas and default kernels on :data:`LIBRARY`
(never on a ``Library`` object of its own), so the namespace is declared in exactly one place and
each op is defined exactly once per process.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["LIBRARY", "NAMESPACE", "check_skip", "define_op", "qualified_name", "run"]

NAMESPACE = "lowrank_optim"

# "FRAGMENT" (not "DEF") so that a compiled extension may also contribute to this namespace.
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def qualified_name(op_name: str) -> str:
    """``"lowrank_optim::<op_name>"``, the form ``torch.library.register_*`` expects."""
    return f"{NAMESPACE}::{op_name}"


#: Each op's pure-PyTorch default kernel, by op name (what ``run(name, fused=False)`` calls).
_DEFAULT_KERNELS: dict[str, Callable[..., Any]] = {}


def define_op(schema: str, default: Callable[..., Any], fake: Callable[..., Any]) -> str:
    """Declare an op of the namespace once: its schema, its default kernel (``CompositeExplicitAutograd``:
    what the dispatcher runs on a device without a compiled kernel) and its fake (meta) kernel. Returns
    the op's name. Compiled kernels register themselves for CPU/CUDA from C++ (``ops._extension``)."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, default, "CompositeExplicitAutograd")
    torch.library.register_fake(qualified_name(name), fake, lib=LIBRARY)
    _DEFAULT_KERNELS[name] = default
    return name


def run(name: str, fused: bool, *args: Any) -> Any:
    """The one decision between an op's kernels. ``fused``: through the dispatcher, which alone picks the
    compiled kernel registered for the tensors' device, or the default kernel where there is none;
    otherwise the default kernel itself (the optimizers' ``fused=False``, and their ``foreach`` paths)."""
    if fused:
        return getattr(torch.ops.lowrank_optim, name)(*args)
    return _DEFAULT_KERNELS[name](*args)


def check_skip(op_name: str, skip: Tensor | None, device: torch.device) -> None:
    """The optional ``skip`` argument of the optimizer ops: a 0-dim bool tensor on the op's device."""
    if skip is None:
        return
    if not isinstance(skip, Tensor) or skip.dim() != 0 or skip.dtype != torch.bool or skip.device != device:
        description = (
            f"a {skip.dim()}-dim {skip.dtype} tensor on {skip.device}" if isinstance(skip, Tensor) else repr(skip)
        )
        raise ValueError(f"{op_name}: skip is {description}; allowed: None or a 0-dim torch.bool tensor on {device}")
