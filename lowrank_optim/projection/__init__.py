"""Pure tensor functions for low-rank gradient projection (shared by every optimizer and layout)."""

from .subspace import (
    PROJ_TYPES,
    Side,
    Subspace,
    add_project_back_,
    basis_shapes,
    effective_rank,
    lowrank_shape,
    project,
    project_back,
    resolve_side,
)
from .svd import refresh_svd_basis_, svd_basis

__all__ = [
    "PROJ_TYPES",
    "Side",
    "Subspace",
    "add_project_back_",
    "basis_shapes",
    "effective_rank",
    "lowrank_shape",
    "project",
    "project_back",
    "refresh_svd_basis_",
    "resolve_side",
    "svd_basis",
]
