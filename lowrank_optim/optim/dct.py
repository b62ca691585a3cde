"""DCTAdamW: GaLoreAdamW over selected DCT-II frequencies instead of an SVD basis (arXiv 2505.17967)."""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from ..projection import Projector
from .galore import GaLoreAdamW

__all__ = ["DCTAdamW"]


class DCTAdamW(GaLoreAdamW):
    """:class:`~lowrank_optim.GaLoreAdamW` whose default ``projector`` is ``"dct"``.

    Each projected matrix keeps the ``rank`` DCT-II frequencies of its projected dimension with the
    largest L1 coefficient norms of the gradient (re-selected every ``update_proj_gap`` steps; moments
    follow their frequencies), so the state holds ``rank`` int64 indices instead of a basis and a refresh
    costs one FFT instead of an SVD. All other arithmetic is GaLore's: refreshes at steps 1, gap+1, ...,
    ``eps`` 1e-6, weight decay after the update and ``scale`` on the update — where the reference
    ``DCTAdamW`` of ``ista-daslab-optimizers`` refreshes at 1, gap, 2·gap, uses eps 1e-8, decays first
    and has no scale. Arguments as :class:`~lowrank_optim.GaLoreAdamW`.
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *args: Any, projector: str | Projector = "dct", **kwargs: Any
    ) -> None:
        super().__init__(params, *args, projector=projector, **kwargs)
