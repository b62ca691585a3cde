"""Per-layer updates follow the optimizer's groups as they are at each backward, not as at construction.

``load_state_dict`` replaces the group dicts (a resumed run's scheduler then writes the lr into the new
ones) and ``add_param_group`` adds parameters; the old code kept the first groups, so a resumed per-layer
run trained at a stale lr and added parameters were never stepped, both silently.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_optim import GaLoreAdamW
from lowrank_optim.train import PerLayerUpdates


def _run(per_layer: bool, change) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    optimizer = GaLoreAdamW(
        [{"params": [model[0].bias, model[2].bias]}, {"params": [model[0].weight], "rank": 2}], lr=0.05
    )
    updates = PerLayerUpdates(optimizer) if per_layer else None
    change(model, optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        loss = model(torch.randn(5, 6, generator=generator)).square().mean()
        if updates is None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            updates.backward(loss)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _reload_and_change_lr(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(optimizer.state_dict())  # as a resumed run does
    for group in optimizer.param_groups:
        group["lr"] = 0.002  # as its scheduler then does


def _add_a_group(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.add_param_group({"params": [model[2].weight], "rank": 2})


def test_the_lr_of_groups_replaced_by_load_state_dict_is_used() -> None:
    per_layer, normal = _run(True, _reload_and_change_lr), _run(False, _reload_and_change_lr)
    assert all(torch.equal(per_layer[name], value) for name, value in normal.items())


def test_parameters_of_a_group_added_later_are_stepped() -> None:
    per_layer, normal = _run(True, _add_a_group), _run(False, _add_a_group)
    assert all(torch.equal(per_layer[name], value) for name, value in normal.items())
    untouched = _run(False, lambda model, optimizer: None)
    assert not torch.equal(per_layer["2.weight"], untouched["2.weight"])


def test_pretrain_with_per_layer_updates_resumes_bit_identically(tmp_path) -> None:
    """End to end: the resumed half of a per-layer run follows the schedule as the uninterrupted run does
    (before, it kept the lr of the run's first update)."""
    import pytest

    from lowrank_optim.data import TokenStream, stdlib_corpus
    from lowrank_optim.models import LlamaConfig
    from lowrank_optim.train.methods import load_presets
    from lowrank_optim.train.pretrain import TrainSettings, pretrain

    config, preset = LlamaConfig.from_name_or_path("test"), load_presets("test")["galore"]
    stream = TokenStream(stdlib_corpus(100_000), 16)
    settings = TrainSettings(
        steps=6, batch_size=2, seq_len=16, eval_batches=1, measure_memory=False, per_layer=True, log_every=1
    )
    whole = pretrain(config, preset, stream, settings, log=lambda line: None)

    class Interrupted(Exception):
        pass

    def stop_at_update_4(line: str) -> None:
        if "update 4/" in line:  # logged after update 4, i.e. after update 3's checkpoint was written
            raise Interrupted

    path = tmp_path / "ckpt.pt"
    with pytest.raises(Interrupted):
        pretrain(config, preset, stream, settings, checkpoint=path, checkpoint_every=3, log=stop_at_update_4)
    resumed = pretrain(config, preset, stream, settings, checkpoint=path, resume=True, log=lambda line: None)
    assert resumed["train_curve"] == whole["train_curve"]
    assert resumed["final_eval_loss"] == whole["final_eval_loss"]
