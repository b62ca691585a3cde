"""Where an optimizer's tensors come from: the layout a low-rank optimizer steps its groups through.

The optimizer owns the step (:func:`~lowrank_optim.optim.galore_adamw`, written once); a layout
supplies only what differs between backends: the local block of each parameter, its state tensors
made to match, and the :class:`~lowrank_optim.optim.exchange.Exchange` that combines the pieces of a
matrix. :class:`DenseLayout` (whole tensors, no communication) is the default;
:func:`layout_for` picks another one from the parameters themselves (FSDP2's DTensors, registered by
:mod:`lowrank_optim.distributed.fsdp2`), so an optimizer built the ordinary way on a wrapped model needs
no extra call. Layouts never import the optimizer, and this package imports nothing from
:mod:`lowrank_optim.distributed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol, Sequence, cast

import torch
from torch import Tensor

from .exchange import LOCAL, Exchange

if TYPE_CHECKING:
    from .galore import GaLoreAdamW

__all__ = ["Block", "DenseLayout", "Layout", "SHARDINGS", "layout_for", "register_layout"]

#: How a state tensor lines up with its parameter, which is what a sharded layout splits it by:
#: ``rows`` (its dimension 0 runs along the parameter's rows), ``columns`` (its dimension 1 along the
#: parameter's columns), ``columns_first`` (its dimension 0 along the parameter's columns: a
#: ``columns`` tensor stored transposed, as 8-bit moments store a left projection's, so that a layout
#: splitting the columns hands each process whole stored rows), ``replicated`` (every process keeps all of it).
SHARDINGS: tuple[str, ...] = ("rows", "columns", "columns_first", "replicated")


class Block(NamedTuple):
    """One matrix (or full-rank tensor) as this process steps it: ``param`` and ``grad`` are its local
    block (a view, or a copy the exchange writes back), ``state`` the local pieces of its state tensors,
    ``step`` its step counter (matrices of one flat partition share one), ``shape`` the whole shape."""

    param: Tensor
    grad: Tensor
    state: dict[str, Any]
    step: Tensor
    shape: tuple[int, ...]


#: ``init(like, state)``: fill an empty ``state`` for a tensor like ``like`` (whole shape, dtype, device),
#: making every state tensor with :meth:`Layout.new_state` (the optimizer's ``_init_state``).
StateInit = Callable[[Any, dict[str, Any]], None]


class Layout(Protocol):
    """What the optimizer's step needs from a backend (see the module docstring)."""

    def check_group(self, optimizer: GaLoreAdamW, group: dict[str, Any]) -> bool:
        """Raise if ``group`` holds tensors this layout cannot step; called for every group before any is
        stepped. Returns whether the optimizer should check the group's per-parameter state against what
        it would build now (``False`` where the layout keeps state its own way and checks it itself)."""
        ...

    def blocks(self, group: dict[str, Any], tensor: Tensor, state: dict[str, Any], init: StateInit) -> list[Block]:
        """The matrices (or the full-rank tensor) of ``tensor`` as this process steps them, with their state
        (initialized with ``init`` on first use)."""
        ...

    def begin_step(self, groups: list[dict[str, Any]]) -> Tensor | None:
        """Called once per ``step()`` after every check: an outside "skip every update" flag (0-dim bool,
        for the ``nonfinite="skip"`` groups), or ``None``."""
        ...

    def new_state(
        self, param: Tensor, shape: Sequence[int], dtype: torch.dtype, sharding: str, *, column_major: bool = False
    ) -> Tensor:
        """A zero state tensor of whole shape ``shape`` for ``param``, placed as ``sharding`` says (one of
        :data:`SHARDINGS`); ``column_major`` asks for LAPACK's layout where the layout can keep it."""
        ...

    def exchange(self, group: dict[str, Any], params: list[Tensor]) -> Exchange:
        """The collectives of one step of ``params`` (the group's tensors that have gradients, in order)."""
        ...

    def rebuilt_state(
        self, group: dict[str, Any], tensor: Tensor, state: dict[str, Any], local: dict[str, Any], rank: int, rebuild: StateInit
    ) -> dict[str, Any]:
        """Only for a layout that declares ``steps_adaptive_ranks``: the matrix of ``tensor`` whose block's
        state is ``local`` (as :meth:`blocks` gave it) gets its state rebuilt by ``rebuild(like, state)``
        (``like`` as for ``init``, at the new ``rank``); returns the rebuilt state's local pieces."""
        ...


class DenseLayout:
    """Every tensor in ``param_groups`` is a whole parameter with its real shape; no communication."""

    #: Whether every stored row of a state tensor lies on one process, which quantized moments need (their
    #: blocks run along rows, :mod:`lowrank_optim.optim.moments`); a layout without it refuses them.
    steps_quantized_moments = True
    #: Whether a refresh may rebuild a matrix's state at another rank (``rank="auto"``,
    #: :mod:`lowrank_optim.optim.ranks`); a layout without it refuses such groups.
    steps_adaptive_ranks = True

    def check_group(self, optimizer: GaLoreAdamW, group: dict[str, Any]) -> bool:
        """A projected group must still hold the 2-D matrices it was built with."""
        if "rank" not in group:
            return True
        for position, param in enumerate(group["params"]):
            if param.dim() != 2:
                # DeepSpeed ZeRO replaces a group's parameters by one flat partition after the
                # optimizer was built; projecting that would crash or, worse, silently run as Adam.
                raise RuntimeError(
                    f"{type(optimizer).__name__}: tensor {position} of a projected param group (rank "
                    f"{group['rank']}) has shape {tuple(param.shape)}, not the 2-D matrix it was built with. "
                    "This happens under DeepSpeed ZeRO (flat partitions) or deepspeed.zero.Init: bind the "
                    "optimizer to the engine with lowrank_optim.deepspeed.bind(engine) after "
                    "deepspeed.initialize, or use lowrank_optim.deepspeed.initialize, which does it. "
                    "FSDP1 flattens parameters too: use FSDP2 (torch.distributed.fsdp.fully_shard), or FSDP1 "
                    "with use_orig_params=True."
                )
        return True

    def blocks(self, group: dict[str, Any], tensor: Tensor, state: dict[str, Any], init: StateInit) -> list[Block]:
        if not state:
            init(tensor, state)
        # The optimizer asks for the blocks of parameters that have a gradient only.
        return [Block(tensor, cast(Tensor, tensor.grad), state, state["step"], tuple(tensor.shape))]

    def begin_step(self, groups: list[dict[str, Any]]) -> Tensor | None:
        """Nothing to share: each parameter decides for itself."""
        return None

    def new_state(
        self, param: Tensor, shape: Sequence[int], dtype: torch.dtype, sharding: str, *, column_major: bool = False
    ) -> Tensor:
        if column_major and len(shape) == 2:
            return torch.zeros(tuple(shape)[::-1], dtype=dtype, device=param.device).T
        return torch.zeros(tuple(shape), dtype=dtype, device=param.device)

    def exchange(self, group: dict[str, Any], params: list[Tensor]) -> Exchange:
        return LOCAL

    def rebuilt_state(
        self, group: dict[str, Any], tensor: Tensor, state: dict[str, Any], local: dict[str, Any], rank: int, rebuild: StateInit
    ) -> dict[str, Any]:
        rebuild(tensor, state)  # a whole tensor's block state is its state
        return state


#: Functions that may claim a list of parameters for a layout (see :func:`register_layout`).
_RESOLVERS: list[Callable[[list[Tensor]], "Layout | None"]] = []


def register_layout(resolver: Callable[[list[Tensor]], "Layout | None"]) -> None:
    """Let ``resolver`` claim parameters: it returns a layout for them (e.g. FSDP2's, for DTensors), or
    ``None``, or raises when it recognizes them but cannot step them."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def layout_for(params: list[Tensor]) -> Layout:
    """The layout for an optimizer over ``params``: the first registered resolver's, else :class:`DenseLayout`."""
    for resolver in _RESOLVERS:
        layout = resolver(params)
        if layout is not None:
            return layout
    return DenseLayout()
