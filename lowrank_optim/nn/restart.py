"""High-rank restarts (Glentis et al., arXiv 2505.22922): momentum reset and learning-rate re-ramp.

Every ``T`` updates the reference refactorizes SLTrain's factors (:func:`~lowrank_optim.nn.refactorize_`),
restarts Adam from zero moments and step counts, and ramps the learning rate from 0.001x back to the
schedule over 10 updates. :class:`HighRankRestart` makes that one call per update::

    scheduler = LRRewarmup(get_cosine_schedule(optimizer, ...), warmup_steps=10)
    restarts = HighRankRestart(model, optimizer, every=T, scheduler=scheduler)
    for batch in loader:
        model(batch).loss.backward()
        optimizer.step()
        scheduler.step()
        restarts.step()  # after scheduler.step(): the next update then runs at 0.001x
        optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .sltrain import SLTrainLinear, refactorize_

__all__ = ["MOMENT_KEYS", "HighRankRestart", "LRRewarmup", "reset_momentum_"]

# Moment buffers of torch.optim.Adam/AdamW (max_exp_avg_sq only with amsgrad) and of our Adam-family
# optimizers. Projection bases and any other state entry are deliberately not in this list.
MOMENT_KEYS: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
STEP_KEY = "step"


@torch.no_grad()
def reset_momentum_(
    optimizer: Optimizer,
    params: Iterable[Tensor] | None = None,
    *,
    keys: Sequence[str] = MOMENT_KEYS,
    reset_step: bool = True,
) -> list[Tensor]:
    """Zero the moment buffers named in ``keys`` and the step count of ``params`` (default: all).

    Rule, per parameter with state: every tensor entry whose key is in ``keys`` is zeroed in place;
    ``step`` is set to 0 (in place when it is a tensor) when ``reset_step``; every other entry — e.g.
    GaLore's projection bases — is left alone. Restarting the step count restarts Adam's bias
    correction; for GaLore it also makes the next update refresh the projector (``step % gap == 0``).
    Parameters without state yet are skipped. A state holding none of ``keys`` raises, so that an
    optimizer with differently named buffers is not silently left un-reset. Returns the parameters
    that were reset.
    """
    keys = tuple(keys)
    managed = [param for group in optimizer.param_groups for param in group["params"]]
    if params is None:
        targets = managed
    else:
        managed_ids = {id(param) for param in managed}
        targets = list(params)
        for position, param in enumerate(targets):
            if id(param) not in managed_ids:
                raise ValueError(
                    f"params[{position}] (shape {tuple(param.shape)}) is not in any param group of "
                    f"{type(optimizer).__name__}"
                )
    reset: list[Tensor] = []
    for param in targets:
        state = optimizer.state.get(param)
        if not state:
            continue
        present = [key for key in keys if key in state]
        if not present:
            raise KeyError(
                f"the {type(optimizer).__name__} state of a parameter of shape {tuple(param.shape)} has none of "
                f"keys={keys}; its keys are {sorted(state)}; pass keys= naming its moment buffers"
            )
        for key in present:
            state[key].zero_()
        if reset_step and STEP_KEY in state:
            step = state[STEP_KEY]
            if isinstance(step, Tensor):
                step.zero_()
            else:
                state[STEP_KEY] = type(step)(0)
        reset.append(param)
    return reset


class LRRewarmup:
    """Wraps an LR scheduler and, after :meth:`restart`, re-ramps the learning rate to its schedule.

    The ``k``-th update after a restart (``k = 0, 1, …``) runs at ``lr_sched · m(k)`` with
    ``m(k) = start_factor + (1 − start_factor) · k / warmup_steps`` for ``k < warmup_steps`` and
    ``m = 1`` afterwards; ``lr_sched`` is the wrapped scheduler's value for that update.
    (arXiv 2505.22922's code ramps towards the schedule's value at ``restart + warmup_steps``; following
    the moving schedule instead differs by one cosine step's worth over 10 updates.)

    Use it in place of the wrapped scheduler: call :meth:`step` once per update, after
    ``optimizer.step()``, and :meth:`restart` after that :meth:`step`. The wrapped scheduler always sees
    its own unscaled learning rate, so recursive schedulers (``CosineAnnealingLR``, ``ExponentialLR``)
    and closed-form ones (``LambdaLR``) both compose correctly.
    """

    def __init__(self, scheduler: LRScheduler, *, warmup_steps: int = 10, start_factor: float = 1e-3) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps!r} is outside the allowed range [1, inf)")
        if not 0.0 < start_factor <= 1.0:
            raise ValueError(f"start_factor={start_factor!r} is outside the allowed range (0, 1]")
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer
        self.warmup_steps = warmup_steps
        self.start_factor = start_factor
        self.steps_since_restart: int | None = None  # None: no ramp in progress

    def multiplier(self) -> float:
        """``m(k)`` for the next update."""
        k = self.steps_since_restart
        if k is None or k >= self.warmup_steps:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * k / self.warmup_steps

    def restart(self) -> None:
        """Start a ramp: the next update runs at ``start_factor`` times the scheduled rate."""
        self.steps_since_restart = 0
        self._set_group_lrs(self.multiplier())

    def step(self) -> None:
        """Advance the wrapped scheduler by one update, then apply the ramp multiplier."""
        self._set_group_lrs(1.0)  # hand the wrapped scheduler back its own value before it steps
        self.scheduler.step()
        if self.steps_since_restart is not None:
            self.steps_since_restart += 1
            if self.steps_since_restart >= self.warmup_steps:
                self.steps_since_restart = None
        self._set_group_lrs(self.multiplier())

    def get_last_lr(self) -> list[float]:
        """The learning rates the next update will use (ramp included)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "steps_since_restart": self.steps_since_restart}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.steps_since_restart = state_dict["steps_since_restart"]
        self._set_group_lrs(self.multiplier())

    def _set_group_lrs(self, multiplier: float) -> None:
        for group, scheduled_lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = scheduled_lr * multiplier


class HighRankRestart:
    """Every ``every`` updates: :func:`refactorize_` the model, :func:`reset_momentum_`, re-ramp the LR.

    ``reset_params=None`` resets every parameter of the optimizer, as the reference does by building a
    new optimizer; ``scheduler=None`` skips the re-ramp, ``refactorize=False`` the refactorization (for
    models without :class:`SLTrainLinear`). Call :meth:`step` once per optimizer update, after
    ``scheduler.step()``; it returns whether a restart happened. Its counter is in :meth:`state_dict`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        every: int,
        scheduler: LRRewarmup | None = None,
        reset_params: Iterable[Tensor] | None = None,
        moment_keys: Sequence[str] = MOMENT_KEYS,
        refactorize: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is outside the allowed range [1, inf)")
        if refactorize and not any(isinstance(module, SLTrainLinear) for module in model.modules()):
            raise ValueError(
                f"refactorize=True but {type(model).__name__} contains no SLTrainLinear; "
                "convert it first or pass refactorize=False"
            )
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.scheduler = scheduler
        self.reset_params = None if reset_params is None else list(reset_params)
        self.moment_keys = tuple(moment_keys)
        self.refactorize = refactorize
        self.num_updates = 0

    def step(self) -> bool:
        self.num_updates += 1
        if self.num_updates % self.every:
            return False
        if self.refactorize:
            refactorize_(self.model)
        reset_momentum_(self.optimizer, self.reset_params, keys=self.moment_keys)
        if self.scheduler is not None:
            self.scheduler.restart()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = state_dict["num_updates"]
