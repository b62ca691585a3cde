"""GaLoreAdamW: Adam with moments kept in a low-rank gradient subspace (arXiv 2403.03507).

Three layers, as in ``torch.optim.adamw``: the :class:`GaLoreAdamW` class validates arguments and owns
state; :func:`galore_adamw` is the functional entry point that picks an implementation; the
``_single_tensor_*`` / ``_multi_tensor_*`` functions do the arithmetic with the shared pure functions of
:mod:`lowrank_optim.projection`.

Arithmetic of the reference package ``galore-torch`` 1.0 (Hugging Face AdamW style), per step ``t``::

    R = project(G)                          # G itself for params without ``rank``
    M = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R²
    N = M / (sqrt(V) + eps)                 # eps outside the bias correction
    W -= lr · sqrt(1 - b2^t) / (1 - b1^t) · scale · project_back(N)
    W -= lr · weight_decay · W              # after the update, raw lr

The basis is the top-``rank`` SVD of the gradient, refreshed when the per-param step counter *before*
incrementing is a multiple of ``update_proj_gap`` (optimizer steps 1, gap+1, 2·gap+1, ...); the moments
carry over a refresh unchanged unless ``moment_policy="reset"``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..projection import (
    Side,
    Subspace,
    add_project_back_,
    basis_shapes,
    effective_rank,
    lowrank_shape,
    project,
    refresh_svd_basis_,
    resolve_side,
)
from ._state import StateDtypeKeeper
from ._validation import (
    check_adam_hyperparameters,
    check_moment_options,
    check_no_duplicates,
    check_projection_group,
)

__all__ = ["GaLoreAdamW", "galore_adamw"]

# State keys. Bases exist only for the side(s) a parameter's projection uses.
STEP = "step"
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
BASIS_LEFT = "basis_left"  # m x r
BASIS_RIGHT = "basis_right"  # r x n

_NONFINITE_REFRESH = (
    "GaLoreAdamW: a gradient with NaN/Inf arrived at a projector refresh; the previous projector is kept "
    "(or, before the first one exists, that parameter's update is skipped and the refresh deferred). "
    "This warning is shown once per optimizer."
)


class GaLoreAdamW(Optimizer):
    """AdamW whose moments live in a low-rank subspace of each projected gradient (GaLore).

    A drop-in for ``galore_torch.GaLoreAdamW``: param groups that carry the key ``rank`` are projected
    (with their ``update_proj_gap``, ``scale`` and ``proj_type``), all other groups get the same Adam
    arithmetic on full-rank gradients. :func:`lowrank_optim.param_groups` builds the usual two groups.

    Args:
        params: parameters or param groups. A group with ``rank`` must hold 2-D tensors only.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to ``sqrt(V)`` before dividing (reference default 1e-6, not torch's 1e-8).
        weight_decay: decoupled decay ``W -= lr · wd · W`` applied *after* the update (reference order).
        correct_bias: fold Adam's bias corrections into the step size (reference default True).
        update_proj_gap: default refresh period of projected groups that do not set it.
        scale: default multiplier of the back-projected update (``galore_scale``).
        proj_type: default side rule: ``std`` (project the smaller side), ``reverse_std``, ``left``,
            ``right`` or ``full`` (both sides).
        moment_dtype: dtype of the moments; ``None`` keeps the parameter's dtype like the reference
            (e.g. ``torch.float32`` keeps fp32 moments for bf16 weights).
        moment_policy: at a projector refresh, ``keep`` the moments (reference) or ``reset`` them.
        foreach: use the multi-tensor implementation; ``None`` picks it where torch would (CUDA).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        moment_dtype: torch.dtype | None = None,
        moment_policy: str = "keep",
        foreach: bool | None = None,
    ) -> None:
        check_adam_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_moment_options(moment_dtype=moment_dtype, moment_policy=moment_policy)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            moment_dtype=moment_dtype,
            moment_policy=moment_policy,
            foreach=foreach,
        )
        self._warned_nonfinite = False
        super().__init__(params, defaults)
        StateDtypeKeeper(self, self._intended_state_dtype)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating it here so that ``step()`` never meets a bad setting."""
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch raises its own error for sets
            params = list(params)
        param_group["params"] = params
        check_no_duplicates([p[1] if isinstance(p, tuple) else p for p in params], self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        try:
            self._check_group(group, index)
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        where = f" in param group {index}"
        check_adam_hyperparameters(
            lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"], where=where
        )
        check_moment_options(moment_dtype=group["moment_dtype"], moment_policy=group["moment_policy"], where=where)
        if "rank" not in group:
            return
        check_projection_group(group, index)
        clamped = [tuple(p.shape) for p in group["params"] if group["rank"] > min(p.shape)]
        if clamped:
            warnings.warn(
                f"rank {group['rank']} in param group {index} exceeds min(m, n) of {len(clamped)} param(s) "
                f"(e.g. shape {clamped[0]}); their rank is clamped to min(m, n).",
                stacklevel=3,
            )

    @staticmethod
    def _intended_state_dtype(group: dict[str, Any], param: Tensor, key: str) -> torch.dtype | None:
        """Moments are kept in ``moment_dtype``; everything else follows the parameter."""
        if key in (EXP_AVG, EXP_AVG_SQ):
            return group["moment_dtype"] or param.dtype
        return None

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        moment_dtype = group["moment_dtype"] or param.dtype
        # A CPU scalar like torch's Adam: reading it for the refresh decision never syncs a device.
        state[STEP] = torch.tensor(0.0, dtype=torch.float32)
        if "rank" in group:
            side = resolve_side(group["proj_type"], param.shape)
            rank = effective_rank(group["rank"], param.shape)
            moment_shape = lowrank_shape(param.shape, rank, side)
            left_shape, right_shape = basis_shapes(param.shape, rank, side)
            if left_shape is not None:
                state[BASIS_LEFT] = torch.zeros(left_shape, dtype=param.dtype, device=param.device)
            if right_shape is not None:
                state[BASIS_RIGHT] = torch.zeros(right_shape, dtype=param.dtype, device=param.device)
        else:
            moment_shape = param.shape
        state[EXP_AVG] = torch.zeros(moment_shape, dtype=moment_dtype, device=param.device)
        state[EXP_AVG_SQ] = torch.zeros(moment_shape, dtype=moment_dtype, device=param.device)

    def _warn_nonfinite_once(self) -> None:
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(_NONFINITE_REFRESH, RuntimeWarning, stacklevel=4)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            subspaces: list[Subspace | None] = []
            projected = "rank" in group
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients.")
                state = self.state[param]
                if not state:
                    self._init_state(group, param, state)
                params.append(param)
                grads.append(param.grad)
                exp_avgs.append(state[EXP_AVG])
                exp_avg_sqs.append(state[EXP_AVG_SQ])
                steps.append(state[STEP])
                subspaces.append(
                    Subspace(resolve_side(group["proj_type"], param.shape), state.get(BASIS_LEFT), state.get(BASIS_RIGHT))
                    if projected
                    else None
                )
            if not params:
                continue
            beta1, beta2 = group["betas"]
            galore_adamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                subspaces,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                correct_bias=group["correct_bias"],
                update_proj_gap=group["update_proj_gap"],
                scale=group["scale"],
                moment_policy=group["moment_policy"],
                foreach=group["foreach"],
                on_nonfinite_refresh=self._warn_nonfinite_once,
            )
        return loss


def galore_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    subspaces: list[Subspace | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    update_proj_gap: int,
    scale: float,
    moment_policy: str = "keep",
    foreach: bool | None = None,
    on_nonfinite_refresh: Any = None,
) -> None:
    """Functional GaLore-AdamW step over parallel lists; see the module docstring for the math.

    ``subspaces[i]`` is ``None`` for a full-rank parameter, else the side and basis tensors of its
    projection, which are refreshed in place at refresh steps. ``on_nonfinite_refresh`` is called when
    a refresh meets a NaN/Inf gradient (the previous basis is kept).
    """
    if foreach is None:
        foreach = all(p.device.type == "cuda" for p in params) and bool(params)
    impl = _multi_tensor_galore_adamw if foreach else _single_tensor_galore_adamw
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        subspaces,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        correct_bias=correct_bias,
        update_proj_gap=update_proj_gap,
        scale=scale,
        moment_policy=moment_policy,
        on_nonfinite_refresh=on_nonfinite_refresh or (lambda: None),
    )


def _step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    """``lr · sqrt(1 - b2^t) / (1 - b1^t)``: the bias corrections folded into the step size."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def _project_gradient(
    grad: Tensor,
    subspace: Subspace | None,
    step: int,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    update_proj_gap: int,
    moment_policy: str,
    on_nonfinite_refresh: Any,
) -> Tensor | None:
    """Refresh the basis when due, then return ``R`` in the moments' dtype (``None``: skip this param)."""
    if subspace is None:
        return grad if grad.dtype == exp_avg.dtype else grad.to(exp_avg.dtype)
    if step % update_proj_gap == 0:
        if not refresh_svd_basis_(grad, subspace):
            on_nonfinite_refresh()
            if step == 0:  # no basis to fall back on yet: defer the first refresh to the next step
                return None
        elif step > 0 and moment_policy == "reset":
            exp_avg.zero_()
            exp_avg_sq.zero_()
    return project(grad, subspace).to(exp_avg.dtype)


def _single_tensor_galore_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    subspaces: list[Subspace | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    update_proj_gap: int,
    scale: float,
    moment_policy: str,
    on_nonfinite_refresh: Any,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step_t, subspace in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, subspaces
    ):
        step = int(step_t.item())
        lowrank = _project_gradient(
            grad,
            subspace,
            step,
            exp_avg,
            exp_avg_sq,
            update_proj_gap=update_proj_gap,
            moment_policy=moment_policy,
            on_nonfinite_refresh=on_nonfinite_refresh,
        )
        if lowrank is None:
            continue
        step_t += 1
        exp_avg.mul_(beta1).add_(lowrank, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(lowrank, lowrank, value=1.0 - beta2)
        # N = M / (sqrt(V) + eps), written into the denominator's buffer to save a temporary.
        normalized = exp_avg_sq.sqrt().add_(eps)
        torch.div(exp_avg, normalized, out=normalized)
        step_size = _step_size(lr, beta1, beta2, step + 1, correct_bias)
        if subspace is None:
            param.add_(normalized, alpha=-step_size)
        else:
            add_project_back_(param, normalized, subspace, alpha=-step_size * scale)
        if weight_decay > 0.0:
            param.add_(param, alpha=-lr * weight_decay)


def _multi_tensor_galore_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    subspaces: list[Subspace | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    update_proj_gap: int,
    scale: float,
    moment_policy: str,
    on_nonfinite_refresh: Any,
) -> None:
    """The same step with the elementwise moment arithmetic batched into ``torch._foreach_*`` calls.

    Projection and back-projection stay per parameter (they are matmuls); the moment update and the
    normalization run once over all the (low-rank) moments of the group.
    """
    active: list[int] = []
    lowranks: list[Tensor] = []
    for index, (grad, exp_avg, exp_avg_sq, step_t, subspace) in enumerate(
        zip(grads, exp_avgs, exp_avg_sqs, state_steps, subspaces)
    ):
        lowrank = _project_gradient(
            grad,
            subspace,
            int(step_t.item()),
            exp_avg,
            exp_avg_sq,
            update_proj_gap=update_proj_gap,
            moment_policy=moment_policy,
            on_nonfinite_refresh=on_nonfinite_refresh,
        )
        if lowrank is not None:
            active.append(index)
            lowranks.append(lowrank)
    if not active:
        return
    exp_avgs = [exp_avgs[i] for i in active]
    exp_avg_sqs = [exp_avg_sqs[i] for i in active]
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, lowranks, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, lowranks, lowranks, value=1.0 - beta2)
    del lowranks
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, eps)
    for index, exp_avg, update in zip(active, exp_avgs, denominators):
        # Divide per tensor into the denominator's buffer: no second list of temporaries, and the
        # same rounding as the single-tensor path.
        torch.div(exp_avg, update, out=update)
        step_t = state_steps[index]
        step_t += 1
        step_size = _step_size(lr, beta1, beta2, int(step_t.item()), correct_bias)
        subspace = subspaces[index]
        if subspace is None:
            params[index].add_(update, alpha=-step_size)
        else:
            add_project_back_(params[index], update, subspace, alpha=-step_size * scale)
    if weight_decay > 0.0:
        decayed = [params[i] for i in active]
        torch._foreach_add_(decayed, decayed, alpha=-lr * weight_decay)
