"""Hugging Face ``Trainer`` cases for tests/test_hf_trainer.py, one process or under torchrun with DeepSpeed.

``python hf_trainer.py OUT CASE...``: each case trains the tiny LLaMA and saves its final parameters to
``OUT/<case>.pt`` (rank 0). Cases: ``plain`` (one process, global batch 8), ``zero<S>`` (DeepSpeed ZeRO-S,
4 sequences per rank), ``zero<S>:ckpt`` (save at step 3, resume in a new Trainer, final parameters),
``<case>:fira`` for FiraAdamW and ``<case>:auto`` for ``rank="auto"`` (:data:`AUTO_BUDGET`; the final ranks
follow the parameters); ``zero0:bf16`` saves the optimizer's step counts instead (DeepSpeed's stage-0 bf16
wrapper steps once while it is built; bind undoes it).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from teardown import end_worker

STEPS = 6
GLOBAL_BATCH = 8
#: rank="auto": the bytes of rank-dependent state of the tiny model's 14 projected matrices (rank 4 everywhere
#: would hold 21,504): unequal ranks.
AUTO_BUDGET = 20_000


def tiny_model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def dataset(count: int = 64) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, 64, (16,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def arguments(out: Path, world: int, stage: int | None, **changes):
    import transformers

    settings = dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world, learning_rate=1e-2,
        weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, dataloader_drop_last=True, seed=0, disable_tqdm=True,
    )
    if stage is not None:
        settings["deepspeed"] = {
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
            "bf16": {"enabled": "auto"},
        }
    settings.update(changes)
    return transformers.TrainingArguments(**settings)


def trainer(out: Path, world: int, stage: int | None, fira: bool = False, auto: bool = False, **changes):
    from lowrank_optim import FiraAdamW, GaLoreAdamW
    from lowrank_optim.integrations.transformers import LowRankTrainer

    options: dict = {"rank": 4, "update_proj_gap": 3}
    options.update({"alpha": 0.5} if fira else {"scale": 0.5})
    if auto:
        options.update(rank="auto", state_budget=AUTO_BUDGET)
    return LowRankTrainer(
        model=tiny_model(), args=arguments(out, world, stage, **changes), train_dataset=dataset(),
        lowrank_optimizer=FiraAdamW if fira else GaLoreAdamW, lowrank_options=options,
    )


def parameters(run) -> list[torch.Tensor]:
    model = run.model
    if run.is_deepspeed_enabled and run.accelerator.deepspeed_engine_wrapped.engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return [p.detach().float().clone() for p in model.parameters()]
    return [p.detach().float().clone() for p in model.parameters()]


def run_case(out: Path, case: str, world: int) -> list[torch.Tensor]:
    name, *options = case.split(":")
    stage = None if name == "plain" else int(name.removeprefix("zero"))
    fira = "fira" in options
    auto = "auto" in options
    work = out / case.replace(":", "_")
    if "bf16" in options:  # the optimizer's step counts: DeepSpeed's warm-up step must not be one of them
        run = trainer(work, world, stage, fira, bf16=True)
        run.train()
        base = run.accelerator.deepspeed_engine_wrapped.engine.basic_optimizer  # ours
        return [torch.tensor(sorted({float(state["step"]) for state in base.state.values()}))]
    if "ckpt" in options:
        first = trainer(work, world, stage, fira, auto, save_strategy="steps", save_steps=3)
        first.train()
        resumed = trainer(work, world, stage, fira, auto, save_strategy="steps", save_steps=3)
        resumed.train(resume_from_checkpoint=str(work / "checkpoint-3"))
        return parameters(first) + parameters(resumed)
    run = trainer(work, world, stage, fira, auto)
    run.train()
    if auto:  # the ranks it ended with, after the parameters
        base = run.optimizer.optimizer if stage is None else run.accelerator.deepspeed_engine_wrapped.engine.basic_optimizer
        ranks = [value for state in base.state.values() for value in state.get("ranks", {}).values()]
        ranks += [state["matrix_rank"] for state in base.state.values() if "matrix_rank" in state]
        return parameters(run) + [torch.tensor(sorted(ranks))]
    return parameters(run)


def main() -> None:
    warnings.filterwarnings("ignore")
    out = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for case in sys.argv[2:]:
        result = run_case(out, case, world)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(result, out / f"{case}.pt")
    if world > 1:
        end_worker()


if __name__ == "__main__":
    main()
