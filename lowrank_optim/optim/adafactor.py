"""GaLoreAdafactor: Adafactor (Shazeer & Stern, 2018, arXiv 1804.04235) on GaLore's projected gradients
(Zhao et al., 2024, arXiv 2403.03507), as the reference package ``galore-torch`` 1.0 computes it: Hugging
Face's ``Adafactor`` with the gradient projected before it and the update projected back after it.

Three layers, as :mod:`~lowrank_optim.optim.galore`: the :class:`GaLoreAdafactor` class validates
arguments and owns state; :func:`galore_adafactor` is the functional entry point over parallel lists;
``_galore_adafactor_impl`` is the step of one tensor, written with the pure functions of
:mod:`lowrank_optim.projection`. Per parameter, at its step ``t`` (1-based)::

    R = project(G)                                      # G itself for params without ``rank``
    rho = lr                                            # relative_step=False
        = min(1e-2, 1/sqrt(t))                          # relative_step=True
        = min(1e-6 · t, 1/sqrt(t))                      # ... and warmup_init=True
    alpha = max(eps2, RMS(W)) · rho                     # scale_parameter=True, else rho
    b2 = 1 - t^decay_rate
    S = R² + eps1
    r = b2 r + (1 - b2) mean_cols(S) ;  c = b2 c + (1 - b2) mean_rows(S)       # R of >= 2 dims: factored
    U = R / sqrt(r cᵀ / mean(r))                        # (one vector V = b2 V + (1 - b2) S, U = R / sqrt(V) for 1-D)
    U = alpha · U / max(1, RMS(U) / clip_threshold)
    M = b1 M + (1 - b1) U ;  U = M                      # only with beta1
    W -= weight_decay · alpha · W                       # before the update
    W -= scale · project_back(U)                        # U itself for params without ``rank``

with ``RMS(X) = ||X||_F / sqrt(numel(X))``. A tensor of more than two dimensions (full-rank groups only)
is factored over its last two, as Hugging Face's. Param groups with ``rank`` are projected exactly as
:class:`~lowrank_optim.GaLoreAdamW`'s: the same group keys (``rank``, ``update_proj_gap``, ``scale``,
``proj_type``, ``projector``), the same projectors (``svd``, ``rsvd``, ``dct``, ``random`` or an object;
``SVDProjector(sign="lapack")`` keeps galore-torch's signs) and the same schedule: the projector is
refreshed when the per-parameter counter *before* incrementing is a multiple of ``update_proj_gap``
(optimizer steps 1, gap+1, 2·gap+1, ...). At a refresh the factors and the first moment carry over as
they are (the reference's ``keep``); a projector whose basis vectors have identities (``dct``) moves the
statistics of the directions that stay selected with them: the first moment, and the factor along the
projected dimension (``c`` for a right projection, ``r`` for a left one, each side's for ``full``).

Quirks of the reference, kept for parity (its arithmetic and order of operations are reproduced, so the
trajectories are bit-identical on CPU with ``SVDProjector(sign="lapack")``):

* ``RMS(W)`` in the step size is the RMS of the *whole* weight, while ``RMS(U)`` in the clipping is that
  of the *projected* update (``r`` columns or rows): for an orthonormal basis ``||back(U)||_F = ||U||_F``,
  so the clipping bounds the RMS of the back-projected update over the weight by ``clip_threshold ·
  sqrt(r / n)`` (right projection; ``sqrt(r / m)`` left), before ``alpha``, not by ``clip_threshold`` as
  for a full-rank weight. The weight's RMS is one norm of ``m x n`` per step.
* The first moment averages the *scaled, clipped* updates ``alpha · U`` (fairseq's and Hugging Face's
  order), so a changing step size (``relative_step``) is mixed into the momentum; ``scale`` multiplies
  after both.
* Weight decay is Hugging Face's: ``W -= weight_decay · alpha · W`` with the step size ``alpha`` of this
  step (including ``RMS(W)`` when ``scale_parameter``), applied to the weight *before* the update.
* ``eps1`` is added to ``R²`` before the averages; ``eps2`` floors the weight's RMS.
* With ``scale_parameter`` the reference's step size is a Python ``max(eps2, RMS)`` of a float and a 0-dim
  tensor, so it is a tensor (fp32 products) when the RMS is larger and a Python float (fp64 products,
  rounded once) otherwise; both roundings are reproduced here, on the device (``torch.where``, no host
  read of the RMS, where the reference reads it).
* fp16/bf16 weights: gradient and weight are computed on in fp32 copies (the weight rounded back after
  each step), and every state tensor is fp32 — the factors and first moment because they follow the fp32
  gradient, the basis because the reference's SVD of the fp32 gradient is never cast back. Here that is
  the state dtype of such parameters (kept fp32 through ``load_state_dict``; ``state["RMS"]`` too).
* The step counter of the reference is a Python int; here a 0-dim fp32 CPU tensor, like torch's
  optimizers (exact up to 2^24 steps). ``state["RMS"]``, which the reference stores and
  ``transformers.AdafactorSchedule`` reads through :meth:`GaLoreAdafactor._get_lr`, is kept as a 0-dim
  tensor (the reference starts it at the int 0; it is overwritten before every use).
* The reference multiplies the back-projected update by ``scale`` even when it is 1 (skipped here: the
  product is exact) and builds the ``m x n`` back-projection before subtracting it (kept: a fused
  ``addmm_`` would round differently).

Reference bugs, not reproduced:

* ``reverse_std`` infers the back-projection side from the low-rank tensor's shape and crashes when that
  tensor is square; the side is decided once from the weight's shape here.
* A 1-D tensor in a group with ``rank`` crashes the reference mid-step; refused at construction here.
* ``lr=None`` with ``relative_step=False`` passes the reference's checks and fails at the first step;
  refused at construction here.
* A gradient with NaN/Inf at a refresh gives an SVD that fails or returns NaN, and that projector stays
  until the next refresh. Here a projector is never built from such a gradient: the previous one is kept
  (the NaN then reaches the weight, as between refreshes, where the reference's and this arithmetic are
  the same), and at a matrix's first refresh, with no projector yet, its update is skipped and the
  refresh retried at the next step. One warning per optimizer says which parameter and what was done.
* The reference keeps a ``GaLoreProjector`` object in the state; here the state is plain tensors under
  fixed keys and the groups' projectors are written as plain values, so ``torch.load(weights_only=True)``
  reads a state dict.

Whole tensors only: parameters that are DTensors (FSDP2's ``fully_shard``, tensor parallelism) or
DeepSpeed ZeRO-3 placeholders (``deepspeed.zero.Init``) are refused at construction, and a projected
group whose tensors are no longer the 2-D matrices it was built with (DeepSpeed ZeRO's flat partitions,
FSDP1's flat parameters) is refused at the step. :class:`~lowrank_optim.GaLoreAdamW` steps those layouts.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Sequence, cast

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from ..projection import (
    Projection,
    Projector,
    Side,
    all_finite,
    effective_rank,
    lowrank_shape,
    project,
    project_back,
    projector_state_dtypes,
    resolve_side,
)
from ..state_keys import EXP_AVG, EXP_AVG_SQ, STEP
from ._state import StateDtypeKeeper, state_mismatch
from ._validation import (
    add_checked_group,
    check_finite_number,
    check_group_keys,
    check_no_duplicates,
    check_param_tensors,
    check_projection_group,
    group_tensors,
    matrix_shape,
    normalize_scalars,
)
from .galore import NONFINITE_REFRESH_OUTCOMES, _projectors_from_state, _projectors_to_state, group_projector

__all__ = ["EXP_AVG_SQ_COL", "EXP_AVG_SQ_ROW", "RMS", "GaLoreAdafactor", "galore_adafactor"]

# State keys of this optimizer only (Hugging Face's names, so a checkpoint reads like Adafactor's).
#: Running average of the mean of ``R² + eps1`` over the last dimension (one entry per row): ``R.shape[:-1]``.
EXP_AVG_SQ_ROW = "exp_avg_sq_row"
#: Running average of the mean of ``R² + eps1`` over the second-to-last dimension: ``R.shape[:-2] + R.shape[-1:]``.
EXP_AVG_SQ_COL = "exp_avg_sq_col"
#: The weight's RMS at its last step (0-dim), which ``transformers.AdafactorSchedule`` reads.
RMS = "RMS"

#: Weight and gradient dtypes the step computes on in fp32 copies (as the reference).
_UPCAST = (torch.float16, torch.bfloat16)

#: Options given as real numbers, normalized to Python floats (numpy scalars, 0-dim tensors).
_REAL_OPTIONS = ("lr", "clip_threshold", "decay_rate", "beta1", "weight_decay")
_FLAGS = ("scale_parameter", "relative_step", "warmup_init")

#: What happened to a parameter whose gradient held a NaN/Inf at a projector refresh.
_NONFINITE_OUTCOMES = {
    "deferred": NONFINITE_REFRESH_OUTCOMES["deferred"],  # GaLoreAdamW's words: the same outcome
    "applied": "the previous projector is kept and the update (with the NaN/Inf) was applied, as between refreshes",
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter of ``dtype`` is stepped in, and its state kept in: fp32 for fp16/bf16."""
    return torch.float32 if dtype in _UPCAST else dtype


def _is_dtensor(tensor: Tensor) -> bool:
    # Read from the class's module, so that checking imports nothing from torch.distributed.
    return any(cls.__module__.startswith("torch.distributed.tensor") for cls in type(tensor).__mro__)


class GaLoreAdafactor(Optimizer):
    """Adafactor whose statistics live in a low-rank subspace of each projected gradient (GaLore).

    A drop-in for ``galore_torch.GaLoreAdafactor`` (same name, signature, defaults and arithmetic; see the
    module docstring for the formulas and the reference's quirks): param groups that carry ``rank`` are
    projected as :class:`~lowrank_optim.GaLoreAdamW`'s are (with their ``update_proj_gap``, ``scale``,
    ``proj_type`` and ``projector``), all other groups get Hugging Face's Adafactor on full-rank gradients.

    Args:
        params: parameters or param groups. A group with ``rank`` must hold 2-D tensors only.
        lr: the external learning rate; must be ``None`` with ``relative_step=True`` (the default), which
            computes its own step size, and given with ``relative_step=False``.
        eps: ``(eps1, eps2)``: added to the squared gradient, and the floor of the weight's RMS in the step
            size (``scale_parameter``).
        clip_threshold: the update is divided by ``max(1, RMS(U) / clip_threshold)`` (``math.inf``: no
            clipping).
        decay_rate: the second-moment averages use ``b2 = 1 - t^decay_rate`` (``<= 0``; the paper's ``-c``).
        beta1: coefficient of the running average of the updates, or ``None`` for none (no first-moment
            state).
        weight_decay: ``W -= weight_decay · alpha · W`` with this step's size ``alpha``, before the update.
        scale_parameter: multiply the step size by ``max(eps2, RMS(W))``.
        relative_step: step size ``min(1e-2, 1/sqrt(t))`` instead of ``lr``.
        warmup_init: step size ``min(1e-6 · t, 1/sqrt(t))`` (needs ``relative_step``).
        update_proj_gap: default refresh period of projected groups that do not set it.
        scale: default multiplier of the back-projected update (``galore_scale``).
        proj_type: default side rule: ``std`` (project the smaller side), ``reverse_std``, ``left``,
            ``right`` or ``full`` (both sides).
        projector: default subspace: a registered name (``svd``, with canonical signs; ``rsvd``; ``dct``;
            ``random``) or a projector object (``SVDProjector(sign="lapack")`` for galore-torch's exact
            signs). A group may set its own.

    The last four are keyword-only (galore-torch has no defaults for them: its groups must set them).
    A step checks everything that can refuse it (sparse or meta gradients, DTensors, projected tensors
    that are no longer 2-D, state that no longer fits its parameter) for every group before it updates
    anything, so a step that raises leaves the parameters and the state as they were.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        projector: str | Projector = "svd",
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            projector=group_projector(projector),
        )
        _normalize_options(defaults)
        check_adafactor_options(defaults)
        check_finite_number("scale", defaults["scale"])
        self._reset_bookkeeping()
        Optimizer.__init__(self, params, defaults)
        self._register_hooks()

    def _reset_bookkeeping(self) -> None:
        self._warned_nonfinite = False
        #: id(param) -> (param group index, position), as the groups were built (for messages).
        self._origin: dict[int, tuple[int, int]] = {}
        #: id(param) -> its 1-based position among all parameters, in the order the groups were given
        #: (what the random projector's first seed depends on, as for GaLoreAdamW).
        self._ordinals: dict[int, int] = {}
        #: What _init_state builds per kind of parameter, for _check_state.
        self._expected_states: dict[tuple, dict[str, tuple[torch.Size, torch.dtype]]] = {}

    def _register_hooks(self) -> None:
        """State dicts hold the groups' projectors as plain values (the hooks GaLoreAdamW registers), and
        loading keeps each state tensor in its intended dtype (fp32 state of bf16 weights, int64 indices)."""
        StateDtypeKeeper(self, self._intended_state_dtype)
        self.register_state_dict_post_hook(_projectors_to_state)
        self.register_load_state_dict_pre_hook(_projectors_from_state, prepend=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also what ``load_state_dict`` calls with the loaded groups. Unpickling (``copy.deepcopy``,
        ``pickle``) restores only ``defaults``, ``state`` and ``param_groups``: the rest is rebuilt."""
        unpickled = "defaults" in state
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if unpickled:
            self._reset_bookkeeping()
            for index, group in enumerate(self.param_groups):
                for position, param in enumerate(group["params"]):
                    self._origin[id(param)] = (index, position)
                    self._ordinals[id(param)] = len(self._ordinals) + 1
            self._register_hooks()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating it here so that ``step()`` never meets a bad setting."""
        tensors = group_tensors(param_group)
        index = len(self.param_groups)
        check_no_duplicates(tensors, self.param_groups)
        _normalize_options(param_group)
        check_group_keys(param_group, [*self.defaults, "rank", "state_budget"], index)
        check_param_tensors(tensors, index)
        _check_whole_tensors(tensors, index)
        if "projector" in param_group:
            param_group["projector"] = group_projector(param_group["projector"], where=f" in param group {index}")
        add_checked_group(self, param_group, lambda group: self._check_group(group, index))
        start = len(self._ordinals)
        for position, param in enumerate(tensors):
            self._origin[id(param)] = (index, position)
            self._ordinals[id(param)] = start + position + 1

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        where = f" in param group {index}"
        check_adafactor_options(group, where)
        check_finite_number("scale", group["scale"], where)
        if "rank" not in group:
            return
        if group["rank"] == "auto":
            raise ValueError(
                f"Invalid rank{where}: 'auto'. {type(self).__name__} keeps one rank per group: allowed is a positive "
                "integer (rank='auto' with a state_budget is offered by GaLoreAdamW, FiraAdamW, DCTAdamW and APOLLOAdamW)."
            )
        check_projection_group(group, index)
        shapes = [matrix_shape(p) for p in group["params"]]
        clamped = [shape for shape in shapes if group["rank"] > min(shape)]
        if clamped:
            warnings.warn(
                f"rank {group['rank']} in param group {index} exceeds min(m, n) of {len(clamped)} param(s) "
                f"(e.g. shape {clamped[0]}); their rank is clamped to min(m, n).",
                stacklevel=5,  # the caller of the constructor (or of add_param_group, one less)
            )

    @staticmethod
    def _get_lr(param_group: dict[str, Any], param_state: dict[str, Any]) -> float:
        """The step size ``alpha`` of the parameter's last step (Hugging Face's ``Adafactor._get_lr``, which
        ``transformers.AdafactorSchedule`` calls to report the learning rate); before any step, that of
        a first step from a zero RMS."""
        step = max(int(param_state.get(STEP, 0)), 1)
        size = _relative_step_size(param_group["lr"], step, param_group["relative_step"], param_group["warmup_init"])
        if param_group["scale_parameter"]:
            size *= max(param_group["eps"][1], float(param_state.get(RMS, 0.0)))
        return size

    @staticmethod
    def _intended_state_dtype(
        group: dict[str, Any], param: Tensor, key: str, state: dict[str, Any] | None = None
    ) -> torch.dtype | None:
        """A projector's fixed-dtype tensors (DCT indices, seeds) keep theirs; everything else is kept in
        the dtype the parameter is stepped in (fp32 for fp16/bf16 weights)."""
        fixed = projector_state_dtypes().get(key)
        return fixed if fixed is not None else compute_dtype(param.dtype)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        """The state of one parameter, zeros (or a projector's initial values) of the shapes the step
        needs: the projected gradient's for a matrix of a group with ``rank``, else the parameter's."""
        dtype = compute_dtype(param.dtype)
        # A CPU scalar like torch's optimizers: reading it for the refresh decision never syncs a device.
        state[STEP] = torch.tensor(0.0, dtype=torch.float32)
        shape: tuple[int, ...] = tuple(param.shape)
        if "rank" in group:
            side = resolve_side(group["proj_type"], param.shape)
            rank = effective_rank(group["rank"], param.shape)
            projector: Projector = group["projector"]
            for spec in projector.tensors(cast("tuple[int, int]", shape), rank, side):
                value = projector.initial(spec, param.device, self._ordinals.get(id(param)))
                if value is None:
                    value = _zeros(spec.shape, spec.dtype or dtype, param.device, column_major=spec.column_major)
                state[spec.key] = value
            shape = lowrank_shape(param.shape, rank, side)
        if group["beta1"] is not None:
            state[EXP_AVG] = torch.zeros(shape, dtype=dtype, device=param.device)
        if len(shape) >= 2:
            state[EXP_AVG_SQ_ROW] = torch.zeros(shape[:-1], dtype=dtype, device=param.device)
            state[EXP_AVG_SQ_COL] = torch.zeros(shape[:-2] + shape[-1:], dtype=dtype, device=param.device)
        else:
            state[EXP_AVG_SQ] = torch.zeros(shape, dtype=dtype, device=param.device)
        state[RMS] = torch.zeros((), dtype=dtype, device=param.device)

    def _expected_state(self, group: dict[str, Any], param: Tensor) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """``{key: (shape, dtype)}`` of the state :meth:`_init_state` builds for ``param`` now (``step`` aside)."""
        options = tuple(group.get(key) for key in ("rank", "proj_type", "projector")) + (group["beta1"] is None,)
        cache_key = (tuple(param.shape), param.dtype, "rank" in group, options)
        expected = self._expected_states.get(cache_key)
        if expected is None:
            built: dict[str, Any] = {}
            self._init_state(group, torch.empty(param.shape, dtype=param.dtype, device="meta"), built)
            expected = {key: (value.shape, value.dtype) for key, value in built.items() if key != STEP}
            self._expected_states[cache_key] = expected
        return expected

    def _check_step(self, group: dict[str, Any], index: int) -> None:
        """Everything that can make a step of ``group`` raise, checked before any group is stepped."""
        name = type(self).__name__
        for position, param in enumerate(group["params"]):
            if _is_dtensor(param):
                raise RuntimeError(f"{name}: {_dtensor_message(position, index, param)}")
            if "rank" in group and param.dim() != 2:
                # DeepSpeed ZeRO replaces a group's parameters by one flat partition after the optimizer
                # was built; projecting that would crash or, worse, silently run as full-rank Adafactor.
                raise RuntimeError(
                    f"{name}: tensor {position} of a projected param group (rank {group['rank']}) has shape "
                    f"{tuple(param.shape)}, not the 2-D matrix it was built with. This happens under DeepSpeed "
                    "ZeRO (flat partitions) or FSDP1 without use_orig_params=True, which replace the parameters "
                    f"after the optimizer was built. {name} steps whole tensors only: use GaLoreAdamW, which "
                    "binds to DeepSpeed ZeRO (lowrank_optim.deepspeed) and steps FSDP2's shards."
                )
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients.")
            if param.is_meta or param.grad.is_meta:
                raise RuntimeError(
                    f"{name}: param {position} of param group {index} (shape {tuple(param.shape)}) is on the "
                    "meta device and has no data to update. Materialize the model first (e.g. "
                    "module.to_empty(device=...) and initialize it), then step."
                )
            if param.grad.shape != param.shape:
                raise RuntimeError(
                    f"{name}: param {position} of param group {index} has shape {tuple(param.shape)} but its "
                    f"gradient has shape {tuple(param.grad.shape)}."
                )
        check_param_tensors(group["params"], index)
        self._check_state(group, index)

    def _check_state(self, group: dict[str, Any], index: int) -> None:
        """The state a parameter already has must still fit it and its group's settings: a model changed
        after the first step (``model.to(dtype or device)``, a resized layer) or a group changed since
        (``beta1``, ``rank``, ``proj_type``, ``projector``) would otherwise fail half-way through a step."""
        for position, param in enumerate(group["params"]):
            state = self.state.get(param)
            if param.grad is None or not state:
                continue
            mismatch = state_mismatch(param, state, self._expected_state(group, param))
            if mismatch is not None:
                key, found, shape, dtype = mismatch
                raise RuntimeError(
                    f"{type(self).__name__}: param {position} of param group {index} is {param.dtype} on "
                    f"{param.device} with shape {tuple(param.shape)}, but its state {key!r} {found} (it needs "
                    f"{dtype} on {param.device} with shape {tuple(shape)}): the parameter or its group's settings "
                    "(beta1, rank, proj_type, projector) changed after the optimizer's first step. Build the "
                    "optimizer for the model and settings as they are now (and load a state dict into it, which "
                    "converts dtypes and devices)."
                )

    @staticmethod
    def _projection(group: dict[str, Any], shape: tuple[int, ...], state: dict[str, Any]) -> Projection | None:
        """The state's view of a matrix's projector (a transient tuple of its state tensors)."""
        if "rank" not in group:
            return None
        side = resolve_side(group["proj_type"], shape)
        rank = effective_rank(group["rank"], shape)
        projector: Projector = group["projector"]
        tensors = tuple(state[spec.key] for spec in projector.tensors(cast("tuple[int, int]", shape), rank, side))
        return Projection(projector, side, rank, tensors)

    def _warn_nonfinite(self, param: Tensor, step: int, outcome: str) -> None:
        """The warning for a refresh that met a NaN/Inf gradient (once per optimizer)."""
        if self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        index, position = self._origin.get(id(param), (-1, -1))
        warnings.warn(
            f"{type(self).__name__}: a gradient with NaN/Inf arrived at a projector refresh of param {position} in "
            f"param group {index} (shape {tuple(param.shape)}) at step {step + 1}: {_NONFINITE_OUTCOMES[outcome]}. "
            "This warning is shown once per optimizer.",
            RuntimeWarning,
            stacklevel=9,  # the caller of step() (through torch's step wrappers)
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss.

        Every group is checked before any is stepped, so a step that raises changes nothing.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._check_step(group, index)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = []
            for param in params:
                state = self.state[param]
                if not state:
                    self._init_state(group, param, state)
                states.append(state)

            def report(i: int, step: int, outcome: str, params: list[Tensor] = params) -> None:
                self._warn_nonfinite(params[i], step, outcome)

            galore_adafactor(
                params,
                [cast(Tensor, p.grad) for p in params],
                [state.get(EXP_AVG) for state in states],
                [state.get(EXP_AVG_SQ_ROW) for state in states],
                [state.get(EXP_AVG_SQ_COL) for state in states],
                [state.get(EXP_AVG_SQ) for state in states],
                [state[RMS] for state in states],
                [state[STEP] for state in states],
                [self._projection(group, tuple(p.shape), state) for p, state in zip(params, states)],
                lr=group["lr"],
                eps=group["eps"],
                clip_threshold=group["clip_threshold"],
                decay_rate=group["decay_rate"],
                beta1=group["beta1"],
                weight_decay=group["weight_decay"],
                scale_parameter=group["scale_parameter"],
                relative_step=group["relative_step"],
                warmup_init=group["warmup_init"],
                update_proj_gap=group["update_proj_gap"],
                scale=group["scale"],
                on_nonfinite_refresh=report,
            )
        return loss


def galore_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor | None],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    rms: list[Tensor],
    state_steps: list[Tensor],
    projections: list[Projection | None],
    *,
    lr: float | None,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    update_proj_gap: int,
    scale: float,
    on_nonfinite_refresh: Callable[[int, int, str], None] | None = None,
) -> None:
    """Functional GaLore-Adafactor step over parallel lists; see the module docstring for the math.

    Per tensor ``i``: ``exp_avgs[i]`` is its first moment (``None`` without ``beta1``); a tensor of two or
    more dimensions (after projection) has the factors ``exp_avg_sq_rows[i]``/``exp_avg_sq_cols[i]`` and
    ``exp_avg_sqs[i]`` ``None``, a smaller one the reverse; ``rms[i]`` (0-dim) receives the weight's RMS;
    ``state_steps[i]`` is its counter before this step; ``projections[i]`` is ``None`` for a full-rank
    tensor, else its projector with its stored tensors (refreshed in place when due). The tensors are
    stepped one at a time, in order (the reference's order: one tensor's temporaries alive at a time).

    ``on_nonfinite_refresh(i, step, outcome)`` is told of a refresh that met a NaN/Inf gradient
    (``outcome``: ``"deferred"`` at the first refresh, whose update is skipped with the counter kept, or
    ``"applied"``: the previous projector kept).
    """
    if lr is None and not relative_step:
        raise ValueError("Invalid learning rate: None. relative_step=False takes its step size from lr: give lr.")
    for i in range(len(params)):

        def report(step: int, outcome: str, i: int = i) -> None:
            if on_nonfinite_refresh is not None:
                on_nonfinite_refresh(i, step, outcome)

        _galore_adafactor_impl(
            params[i],
            grads[i],
            exp_avgs[i],
            exp_avg_sq_rows[i],
            exp_avg_sq_cols[i],
            exp_avg_sqs[i],
            rms[i],
            state_steps[i],
            projections[i],
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            update_proj_gap=update_proj_gap,
            scale=scale,
            report=report,
        )


def _galore_adafactor_impl(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor | None,
    exp_avg_sq_row: Tensor | None,
    exp_avg_sq_col: Tensor | None,
    exp_avg_sq: Tensor | None,
    rms: Tensor,
    state_step: Tensor,
    projection: Projection | None,
    *,
    lr: float | None,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    update_proj_gap: int,
    scale: float,
    report: Callable[[int, str], None],
) -> None:
    """The step of one tensor, in the reference's order of operations (its roundings are the reference's)."""
    step = int(state_step.item())
    # fp16/bf16 gradients are computed on in fp32, before the projection (so the SVD sees fp32).
    if grad.dtype in _UPCAST:
        grad = grad.float()
    subspace = None
    if projection is not None:
        if step % update_proj_gap == 0:
            if all_finite(grad):  # never build a projector from a NaN/Inf gradient
                _refresh_(projection, grad, step, exp_avg, exp_avg_sq_row, exp_avg_sq_col)
            elif step == 0:  # no projector to fall back on: skip the update, retry the refresh next step
                report(step, "deferred")
                return
            else:
                report(step, "applied")
        shape = cast("tuple[int, int]", tuple(param.shape))
        subspace = projection.projector.subspace(
            projection.tensors, projection.side, shape, projection.rank, grad.dtype, grad.device
        )
        grad = project(grad, subspace)
    weight = param.float() if param.dtype in _UPCAST else param  # the reference's p_data_fp32

    step += 1
    state_step += 1
    eps1, eps2 = eps
    weight_rms = _rms(weight)
    rms.copy_(weight_rms)
    relative = _relative_step_size(lr, step, relative_step, warmup_init)
    # alpha = max(eps2, RMS(W)) · rho. The reference takes a Python max of a float and a 0-dim tensor:
    # a tensor product (rounded in the weight's dtype) when the RMS wins, a Python float product (fp64,
    # rounded once when used) otherwise. Both are reproduced on the device: no host read of the RMS.
    alpha: Tensor | float
    if scale_parameter:
        larger = weight_rms > eps2
        alpha = torch.where(larger, weight_rms * relative, eps2 * relative)
    else:
        alpha = 1.0 * relative

    beta2t = 1.0 - math.pow(step, decay_rate)
    update = (grad**2) + eps1
    if exp_avg_sq_row is not None and exp_avg_sq_col is not None:
        exp_avg_sq_row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
        exp_avg_sq_col.mul_(beta2t).add_(update.mean(dim=-2), alpha=(1.0 - beta2t))
        update = _approx_sq_grad(exp_avg_sq_row, exp_avg_sq_col)
        update.mul_(grad)
    else:
        assert exp_avg_sq is not None  # a tensor of fewer than two dimensions has the unfactored moment
        exp_avg_sq.mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
        update = exp_avg_sq.rsqrt().mul_(grad)

    update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))
    update.mul_(alpha)
    if beta1 is not None:
        assert exp_avg is not None  # kept whenever beta1 is set
        exp_avg.mul_(beta1).add_(update, alpha=(1 - beta1))
        update = exp_avg
    if subspace is not None:
        # The m x n back-projection first, then the subtraction, as the reference (an addmm_ would round
        # differently); the reference multiplies by scale even when it is 1, which is exact.
        update = project_back(update, subspace)
        if scale != 1.0:
            update.mul_(scale)

    if weight_decay != 0:
        if scale_parameter:
            # The reference's alpha=-wd · lr, in the same two roundings as lr itself (above), left on the
            # device: W + W · coefficient is bit for bit its add_(W, alpha=coefficient).
            decay = torch.where(larger, alpha * -weight_decay, -weight_decay * (eps2 * relative))
            weight.addcmul_(weight, decay)
        else:
            weight.add_(weight, alpha=-weight_decay * (1.0 * relative))  # alpha, a Python float here
    weight.sub_(update)
    if weight is not param:
        param.copy_(weight)


def _refresh_(
    projection: Projection,
    grad: Tensor,
    step: int,
    exp_avg: Tensor | None,
    exp_avg_sq_row: Tensor | None,
    exp_avg_sq_col: Tensor | None,
) -> None:
    """A new projector from the whole, finite gradient, stored in place; after the first, the statistics
    of the directions that keep their identity follow them (:meth:`Projector.follow_`; GaLore's SVD basis
    leaves them as they are). Only the statistics along a projected dimension can follow: the first
    moment, and the factor indexed by the projected coordinates (``c`` for a right projection, ``r`` for a
    left one, each side's own for ``full``); the other factor averages over those coordinates."""
    projector, side, rank, stored = projection
    shape = cast("tuple[int, int]", tuple(grad.shape))
    previous = list(stored) if projector.uses_previous else None
    new = projector.refresh(grad, rank, side, previous, fused=False, first=step == 0)
    if step > 0:  # the first refresh replaces placeholders, and the statistics are zero
        if exp_avg is not None:
            projector.follow_([exp_avg], stored, new, side)
        if side is Side.RIGHT and exp_avg_sq_col is not None:
            projector.follow_([exp_avg_sq_col], stored, new, Side.RIGHT)
        elif side is Side.LEFT and exp_avg_sq_row is not None:
            projector.follow_([exp_avg_sq_row], stored, new, Side.LEFT)
        elif side is Side.FULL and exp_avg_sq_row is not None and exp_avg_sq_col is not None:
            # Each factor follows its own side's tensors, where the projector keeps one set per side.
            left = [spec.key for spec in projector.tensors(shape, rank, Side.LEFT)]
            right = [spec.key for spec in projector.tensors(shape, rank, Side.RIGHT)]
            if [spec.key for spec in projector.tensors(shape, rank, Side.FULL)] == left + right:
                count = len(left)
                projector.follow_([exp_avg_sq_row], stored[:count], new[:count], Side.LEFT)
                projector.follow_([exp_avg_sq_col], stored[count:], new[count:], Side.RIGHT)
    for tensor, value in zip(stored, new):
        tensor.copy_(value)


def _relative_step_size(lr: float | None, step: int, relative_step: bool, warmup_init: bool) -> float:
    """``rho``: ``lr``, or the relative step ``min(1e-2, 1/sqrt(t))`` (``min(1e-6 · t, 1/sqrt(t))`` with
    ``warmup_init``)."""
    if not relative_step:
        return cast(float, lr)  # validated: given whenever relative_step is off
    min_step = 1e-6 * step if warmup_init else 1e-2
    return min(min_step, 1.0 / math.sqrt(step))


def _rms(tensor: Tensor) -> Tensor:
    """``||X||_F / sqrt(numel(X))`` as a 0-dim tensor (the reference's ``_rms``, same ops)."""
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _approx_sq_grad(exp_avg_sq_row: Tensor, exp_avg_sq_col: Tensor) -> Tensor:
    """``1 / sqrt(V̂)`` of the factored second moment ``V̂ = r cᵀ / mean(r)`` (Shazeer & Stern, 2018, §3),
    as ``rsqrt(r / mean(r))`` times ``rsqrt(c)`` (the reference's order of operations)."""
    r_factor = (exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor)


def _zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device, *, column_major: bool) -> Tensor:
    """A zero tensor, in LAPACK's column-major layout where asked (a projector's bases: with the layout
    of the reference's SVD slices the projections round as the reference's do)."""
    if column_major and len(shape) == 2:
        return torch.zeros(tuple(shape)[::-1], dtype=dtype, device=device).T
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


def _dtensor_message(position: int, index: int, param: Tensor) -> str:
    return (
        f"param {position} of param group {index} (shape {tuple(param.shape)}) is a DTensor (FSDP2's fully_shard "
        "or tensor parallelism). GaLoreAdafactor steps whole tensors only: its factored statistics and "
        "projections need the whole matrix. Use GaLoreAdamW, which steps FSDP2's shards, or build the optimizer "
        "on an unsharded model."
    )


def _check_whole_tensors(params: Iterable[Tensor], index: int) -> None:
    """Refuse parameters that are not whole tensors: DTensors and DeepSpeed ZeRO-3 placeholders."""
    for position, param in enumerate(params):
        if _is_dtensor(param):
            message = _dtensor_message(position, index, param)
            raise ValueError(message[0].upper() + message[1:])
        if hasattr(param, "ds_shape"):
            raise ValueError(
                f"Param {position} of param group {index} (shape {tuple(matrix_shape(param))}) is a DeepSpeed ZeRO-3 "
                "partitioned parameter (deepspeed.zero.Init). GaLoreAdafactor steps whole tensors only: use "
                "GaLoreAdamW with lowrank_optim.deepspeed, or build the model without zero.Init."
            )


def _as_number(value: Any) -> Any:
    """A numpy scalar or a real 0-dim tensor as a Python number; anything else as it is."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
        return value.item()
    if isinstance(value, np.generic) and not isinstance(value, np.bool_):
        return value.item()
    return value


def _normalize_options(options: dict[str, Any]) -> None:
    """Options given as numpy scalars or 0-dim tensors as Python numbers, ``eps`` as a tuple, in place (so
    param groups and state dicts hold plain values); what is still wrong is refused by the checks."""
    normalize_scalars(options)
    for key in _REAL_OPTIONS:
        if key in options:
            options[key] = _as_number(options[key])
    if isinstance(options.get("eps"), (list, tuple)):
        options["eps"] = tuple(_as_number(value) for value in options["eps"])


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)


def check_adafactor_options(options: dict[str, Any], where: str = "") -> None:
    """Validate the Adafactor options of the defaults or of one param group (Hugging Face's checks, and the
    ones it leaves to the first step or never makes)."""
    for flag in _FLAGS:
        if not isinstance(options[flag], bool):
            raise ValueError(f"Invalid {flag}{where}: {options[flag]!r}. Must be True or False.")
    lr, relative = options["lr"], options["relative_step"]
    if lr is None:
        if not relative:
            raise ValueError(
                f"Invalid learning rate{where}: None. relative_step=False takes its step size from lr (times the "
                "weight's RMS with scale_parameter=True): give lr, or set relative_step=True."
            )
    elif not _is_real(lr) or not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate{where}: {lr!r}. Must be None or a finite number >= 0.0.")
    elif relative:
        raise ValueError(
            f"Invalid learning rate{where}: {lr!r}. A manual lr cannot be combined with relative_step=True, which "
            "computes its own step size (min(1e-2, 1/sqrt(t))): pass lr=None, or set relative_step=False (and "
            "usually scale_parameter=False) to use lr."
        )
    if options["warmup_init"] and not relative:
        raise ValueError(f"Invalid warmup_init{where}: True. warmup_init=True requires relative_step=True.")
    eps = options["eps"]
    if not isinstance(eps, tuple) or len(eps) != 2:
        raise ValueError(f"Invalid eps{where}: {eps!r}. Must be a pair (eps1, eps2), e.g. (1e-30, 1e-3).")
    for position, value in enumerate(eps):
        if not _is_real(value) or not 0.0 <= value < math.inf:
            raise ValueError(f"Invalid epsilon value at index {position}{where}: {value!r}. Must be a finite number >= 0.0.")
    clip = options["clip_threshold"]
    if not _is_real(clip) or not clip > 0.0:
        raise ValueError(
            f"Invalid clip_threshold{where}: {clip!r}. Must be a number > 0.0 (math.inf disables the clipping)."
        )
    decay_rate = options["decay_rate"]
    if not _is_real(decay_rate) or not -math.inf < decay_rate <= 0.0:
        raise ValueError(
            f"Invalid decay_rate{where}: {decay_rate!r}. Must be a finite number <= 0.0 (the second-moment "
            "averages use 1 - t^decay_rate, which must stay in [0, 1))."
        )
    beta1 = options["beta1"]
    if beta1 is not None and (not _is_real(beta1) or not 0.0 <= beta1 < 1.0):
        raise ValueError(f"Invalid beta1{where}: {beta1!r}. Must be None or in [0, 1).")
    weight_decay = options["weight_decay"]
    if not _is_real(weight_decay) or not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value{where}: {weight_decay!r}. Must be a finite number >= 0.0.")
