"""Accelerate (with a DeepSpeed plugin under torchrun, or one process) training the tiny LLaMA with
GaLoreAdamW through lowrank_optim.integrations.accelerate.prepare; for tests/test_hf_trainer.py.

``python accelerate_case.py OUT STAGE``: STAGE -1 is one process without DeepSpeed; the final parameters
go to ``OUT/accelerate_<STAGE>.pt`` (rank 0). Global batch 8, split over the ranks.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import hf_trainer as cases  # noqa: E402
from teardown import end_worker  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore")
    from accelerate import Accelerator, DeepSpeedPlugin

    from lowrank_optim import GaLoreAdamW, param_groups
    from lowrank_optim.integrations.accelerate import prepare

    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    plugin = None
    if stage >= 0:
        plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=1)
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=cases.GLOBAL_BATCH // world,
                                       train_batch_size=cases.GLOBAL_BATCH)
    # cpu=True would make Accelerate drop the DeepSpeed plugin (it trains plain DDP then).
    accelerator = Accelerator(cpu=plugin is None, deepspeed_plugin=plugin)
    model = cases.tiny_model()
    optimizer = GaLoreAdamW(param_groups(model, rank=4, update_proj_gap=3), lr=1e-2)
    model, optimizer = prepare(accelerator, model, optimizer)
    data = cases.dataset()
    share = cases.GLOBAL_BATCH // world
    for step in range(cases.STEPS):
        rows = data[step * cases.GLOBAL_BATCH : (step + 1) * cases.GLOBAL_BATCH][rank * share : (rank + 1) * share]
        ids = torch.stack([row["input_ids"] for row in rows])
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
    module = getattr(model, "module", model)
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            params = [p.detach().float().clone() for p in module.parameters()]
    else:
        params = [p.detach().float().clone() for p in module.parameters()]
    if rank == 0:
        torch.save(params, out / f"accelerate_{stage}.pt")
    if world > 1:
        end_worker()


if __name__ == "__main__":
    main()
