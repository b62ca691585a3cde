"""Hugging Face ``Trainer`` with the low-rank optimizers, in every mode it trains in (one process, DDP,
DeepSpeed ZeRO 0-3)::

    from lowrank_optim import GaLoreAdamW
    from lowrank_optim.integrations.transformers import LowRankTrainer

    trainer = LowRankTrainer(
        model=model, args=TrainingArguments(..., learning_rate=1e-2, deepspeed="ds_zero2.json"),
        train_dataset=dataset,
        lowrank_optimizer=GaLoreAdamW,
        lowrank_options={"rank": 128, "update_proj_gap": 200, "scale": 0.25},
    )
    trainer.train()

Why a subclass: with ``deepspeed=...`` the stock ``Trainer`` sets its optimizer to ``None`` and builds
``torch.optim.AdamW`` from ``TrainingArguments`` (lr 5e-5 by default), so ``optimizers=(GaLoreAdamW(...),
None)`` is silently replaced; and a DeepSpeed engine must be bound to the low-rank optimizer
(:func:`lowrank_optim.distributed.bind`) before its first step and before a checkpoint is loaded into it.
:class:`LowRankTrainer` builds the optimizer in :meth:`~LowRankTrainer.create_optimizer`, which every
mode calls, and binds the engine in :meth:`~LowRankTrainer.create_scheduler`, which the ``Trainer`` calls
after DeepSpeed's engine exists and before it resumes from a checkpoint. An optimizer passed as
``optimizers=(optimizer, scheduler)`` is kept in every mode too.

The optimizer's hyperparameters are the ``TrainingArguments``' (one place for each): ``learning_rate``
(the peak of ``lr_scheduler_type``'s schedule), ``weight_decay``, ``adam_beta1``/``adam_beta2`` and
``adam_epsilon`` (as for the ``Trainer``'s own AdamW and its built-in GaLore); ``lowrank_options`` go into
the projected group (``rank``, ``update_proj_gap``, ``scale`` or Fira's ``alpha``, ``proj_type``,
``projector``, ``moment_policy``, ...) and may not repeat them. The projected group is the 2-D weight of
every linear layer that ``target_modules`` selects (:func:`lowrank_optim.targets.find_targets`, the rule
of :func:`lowrank_optim.optim.param_groups`; by default the attention and MLP projections of LLaMA,
GPT-NeoX, GPT-2, BERT and similar models); the other parameters are split as the ``Trainer`` splits them
(no weight decay for biases and norms).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import transformers
from torch import nn

from ..distributed.zero import bind
from ..optim import GaLoreAdamW, param_groups
from ..targets import check_target_modules, find_targets

__all__ = ["LowRankTrainer", "build_optimizer"]

#: ``TrainingArguments`` fields that set the optimizer, and the optimizer argument each one becomes.
FROM_TRAINING_ARGUMENTS: dict[str, str] = {
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "betas": "adam_beta1, adam_beta2",
    "eps": "adam_epsilon",
}


def build_optimizer(
    model: nn.Module,
    args: transformers.TrainingArguments,
    optimizer_cls: type[GaLoreAdamW],
    options: Mapping[str, Any],
    target_modules: Sequence[str] | None = None,
    decay_parameter_names: Sequence[str] | None = None,
) -> GaLoreAdamW:
    """``optimizer_cls`` over ``model``'s trainable parameters with ``args``' hyperparameters (module
    docstring); what :meth:`LowRankTrainer.create_optimizer` builds, usable without a ``Trainer`` (e.g. a
    reference loop). ``decay_parameter_names``: the full-rank parameters that get weight decay (default:
    the ``Trainer``'s rule, every parameter but biases and norms)."""
    _check_optimizer_cls(optimizer_cls)
    _check_options(options)
    # The shared matching rule picks the weights; the group gets only what the user gave, so the
    # optimizer's own defaults (e.g. APOLLO's scale 1, not GaLore's 0.25) fill in the rest.
    grouped = param_groups(model, rank=options["rank"], target_modules=target_modules)
    projected = {"params": grouped[-1]["params"], **options}
    full_rank = grouped[0]["params"] if len(grouped) == 2 else []
    if decay_parameter_names is None:
        # The Trainer's rule without a Trainer: the method reads only its model argument, not self.
        decay_parameter_names = transformers.Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]
    decayed = set(decay_parameter_names)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [
        {"params": [p for p in full_rank if names[id(p)] in decayed], "weight_decay": args.weight_decay},
        {"params": [p for p in full_rank if names[id(p)] not in decayed], "weight_decay": 0.0},
        {**projected, "weight_decay": args.weight_decay},
    ]
    return optimizer_cls(
        [group for group in groups if group["params"]],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )


def _check_options(options: Mapping[str, Any] | None) -> None:
    """``lowrank_options``: the projected group's settings, with its rank, and nothing that comes from
    the ``TrainingArguments`` or that the rule of ``target_modules`` decides."""
    if not options or "rank" not in options:
        raise ValueError(f"lowrank_options ({options!r}) must give the projected group's rank, e.g. {{'rank': 128}}.")
    repeated = sorted(set(options) & set(FROM_TRAINING_ARGUMENTS))
    if repeated:
        raise ValueError(
            f"lowrank_options sets {repeated}, which come from the TrainingArguments "
            f"({', '.join(FROM_TRAINING_ARGUMENTS[key] for key in repeated)}): set them there, so that the "
            "schedule and the logs use the same values."
        )
    if "params" in options:
        raise ValueError("lowrank_options must not give 'params': the projected group holds the target_modules' weights.")


def _check_optimizer_cls(optimizer_cls: Any) -> None:
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, GaLoreAdamW)):
        raise TypeError(
            f"lowrank_optimizer must be a lowrank_optim optimizer class (GaLoreAdamW, FiraAdamW, DCTAdamW, "
            f"APOLLOAdamW), not {optimizer_cls!r}. Any other optimizer: pass it as optimizers=(optimizer, None)."
        )


class LowRankTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with a low-rank optimizer in every mode (module docstring).

    Args (beyond the ``Trainer``'s):
        lowrank_optimizer: the optimizer class (:class:`~lowrank_optim.GaLoreAdamW`, ``FiraAdamW``,
            ``DCTAdamW``, ``APOLLOAdamW``); or ``None`` with ``optimizers=(optimizer, scheduler)``.
        lowrank_options: the projected group's settings; ``rank`` is required.
        target_modules: substrings of the module names whose linear weights are projected (``None``:
            :data:`~lowrank_optim.targets.DEFAULT_TARGET_MODULES`); what was projected is printed once
            (rank 0) when the optimizer is built.
    """

    def __init__(
        self,
        *args: Any,
        lowrank_optimizer: type[GaLoreAdamW] | None = None,
        lowrank_options: Mapping[str, Any] | None = None,
        target_modules: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        given = (kwargs.get("optimizers") or (None, None))[0]
        if lowrank_optimizer is None and given is None:
            raise ValueError(
                "LowRankTrainer needs lowrank_optimizer=<class> (with lowrank_options) or optimizers=(optimizer, "
                "scheduler); without either it would train the Trainer's AdamW."
            )
        if lowrank_optimizer is not None and given is not None:
            raise ValueError("LowRankTrainer got both lowrank_optimizer and optimizers=(optimizer, ...): give one.")
        if lowrank_optimizer is not None:
            _check_optimizer_cls(lowrank_optimizer)
            _check_options(lowrank_options)
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("LowRankTrainer builds its optimizer from lowrank_optimizer: drop optimizer_cls_and_kwargs.")
        check_target_modules(target_modules)  # now, not when train() builds the optimizer
        self._lowrank = (lowrank_optimizer, dict(lowrank_options or {}), target_modules)
        self._given_optimizer = given
        self._bound_engine: Any = None
        super().__init__(*args, **kwargs)
        config = getattr(self.args, "hf_deepspeed_config", None)
        ds = getattr(config, "config", None) or {}
        if "optimizer" in ds:
            raise ValueError(
                f"The DeepSpeed config has an 'optimizer' section ({ds['optimizer'].get('type')!r}): the Trainer would "
                "train DeepSpeed's optimizer instead of the low-rank one. Remove the section."
            )
        if "lowrank_optim" in ds:
            raise ValueError(
                "The DeepSpeed config has a 'lowrank_optim' section, which only lowrank_optim.deepspeed.initialize "
                "reads (the Trainer would pass it to DeepSpeed, which ignores it). With LowRankTrainer, give its "
                "settings as lowrank_optimizer and lowrank_options, and remove the section."
            )

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        """The low-rank optimizer (built once; DeepSpeed's ``deepspeed_init`` clears ``self.optimizer`` and
        calls this, which is where the stock ``Trainer`` would build AdamW)."""
        if self.optimizer is None:
            if self._given_optimizer is not None:
                self.optimizer = self._given_optimizer
            else:
                cls, options, targets = self._lowrank
                assert cls is not None  # __init__ requires lowrank_optimizer when no optimizer was given
                model = self.model if model is None else model
                assert model is not None  # the Trainer holds its model when it builds the optimizer
                self.optimizer = build_optimizer(model, self.args, cls, options, targets, self.get_decay_parameter_names(model))
                if self.is_world_process_zero():
                    print(find_targets(model, targets))
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """Bind a DeepSpeed engine to the low-rank optimizer first: the ``Trainer`` calls this after the
        engine is built and before it loads a checkpoint into it or steps."""
        if self.is_deepspeed_enabled:
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            if engine is not self._bound_engine:
                bind(engine)
                self._bound_engine = engine
        return super().create_scheduler(num_training_steps, optimizer)
