"""Per-layer updates give exactly the parameters of a normal run, with and without accumulation."""

from __future__ import annotations

import pytest
import torch

from lowrank_optim import optimizer_state_bytes
from lowrank_optim.models import LlamaConfig
from lowrank_optim.train import PerLayerUpdates
from lowrank_optim.train.methods import METHODS, build_model, build_optimizer, cosine_with_warmup, load_presets

CONFIG = LlamaConfig.from_name_or_path("test")
PRESETS = load_presets("test")  # GaLore/Fira/DCT refresh every 2 updates: 3 updates cross refreshes 1 and 3
UPDATES = 3


def _batches(accumulation: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        [torch.randint(0, CONFIG.vocab_size, (2, 17), generator=generator) for _ in range(accumulation)]
        for _ in range(UPDATES)
    ]


def _train(method: str, accumulation: int, per_layer: bool) -> tuple[dict[str, torch.Tensor], list[float], int]:
    model = build_model(CONFIG, preset=PRESETS[method], seed=0)
    optimizer = build_optimizer(model, PRESETS[method])
    scheduler = cosine_with_warmup(optimizer, UPDATES)
    updates = PerLayerUpdates(optimizer) if per_layer else None
    lrs = []
    for micro_batches in _batches(accumulation):
        for index, batch in enumerate(micro_batches):
            loss = model(batch, labels=batch).loss / accumulation
            if updates is None:
                loss.backward()
            else:
                updates.backward(loss, step=index == accumulation - 1)
        if updates is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert all(param.grad is None for param in model.parameters())
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    params = {name: param.detach().clone() for name, param in model.named_parameters()}
    return params, lrs, optimizer_state_bytes(optimizer)


@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("method", METHODS)
def test_per_layer_run_is_bit_identical_to_a_normal_run(method: str, accumulation: int) -> None:
    normal, normal_lrs, normal_state = _train(method, accumulation, per_layer=False)
    per_layer, per_layer_lrs, per_layer_state = _train(method, accumulation, per_layer=True)
    assert per_layer_lrs == normal_lrs  # the schedule advanced once per update
    assert per_layer_state == normal_state
    initial = build_model(CONFIG, preset=PRESETS[method], seed=0)
    for name, value in normal.items():
        assert torch.equal(per_layer[name], value), name
    # Sanity: training moved the weights (the comparison above is not between two untouched models).
    assert not torch.equal(dict(initial.named_parameters())["lm_head.weight"], normal["lm_head.weight"])


def test_gradients_never_all_exist_together() -> None:
    model = build_model(CONFIG, preset=PRESETS["galore"])
    updates = PerLayerUpdates(build_optimizer(model, PRESETS["galore"]))
    params = list(model.parameters())
    most_alive = 0

    def count(_: torch.Tensor) -> None:
        nonlocal most_alive
        most_alive = max(most_alive, sum(param.grad is not None for param in params))

    for param in params:  # registered after the stepping hooks, so it sees each gradient just freed
        param.register_post_accumulate_grad_hook(count)
    batch = torch.randint(0, CONFIG.vocab_size, (2, 17))
    updates.backward(model(batch, labels=batch).loss)
    assert most_alive == 0


def test_plain_backward_only_accumulates() -> None:
    model = build_model(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters())
    PerLayerUpdates(optimizer)
    before = [param.detach().clone() for param in model.parameters()]
    batch = torch.randint(0, CONFIG.vocab_size, (2, 17))
    model(batch, labels=batch).loss.backward()
    assert all(param.grad is not None for param in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state


def test_global_norm_clipping_is_refused() -> None:
    model = build_model(CONFIG)
    with pytest.raises(ValueError, match=r"clip_grad_norm \(1\.0\) is not supported"):
        PerLayerUpdates(torch.optim.AdamW(model.parameters()), clip_grad_norm=1.0)


def test_galore_torch_per_layer_recipe_is_one_call() -> None:
    """galore-torch's README recipe (one optimizer and one scheduler per parameter, stepped from a
    post-accumulate-grad hook) equals ``PerLayerUpdates(one optimizer)`` with one scheduler, bit for bit."""
    from lowrank_optim import GaLoreAdamW, param_groups
    from lowrank_optim.models import LlamaConfig, LlamaForCausalLM
    from lowrank_optim.train import PerLayerUpdates
    from lowrank_optim.train.methods import cosine_with_warmup

    config = LlamaConfig.from_name_or_path("test")
    batches = [torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(5)]

    def model() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    # galore-torch's recipe, written as its README writes it.
    theirs = model()
    projected = {id(p) for p in param_groups(theirs, rank=4, update_proj_gap=2)[-1]["params"]}
    optimizers, schedulers = {}, {}
    for p in theirs.parameters():
        group = {"params": [p]}
        if id(p) in projected:
            group.update(rank=4, update_proj_gap=2, scale=0.25, proj_type="std")
        optimizers[p] = GaLoreAdamW([group], lr=0.01)
        schedulers[p] = cosine_with_warmup(optimizers[p], len(batches))

    def hook(p: torch.Tensor) -> None:
        if p.grad is None:
            return
        optimizers[p].step()
        optimizers[p].zero_grad()
        schedulers[p].step()

    for p in theirs.parameters():
        p.register_post_accumulate_grad_hook(hook)
    for ids in batches:
        theirs(ids, labels=ids).loss.backward()

    # Ours: one optimizer, one scheduler, one call.
    ours = model()
    optimizer = GaLoreAdamW(param_groups(ours, rank=4, update_proj_gap=2, scale=0.25), lr=0.01)
    scheduler = cosine_with_warmup(optimizer, len(batches))
    updates = PerLayerUpdates(optimizer)
    for ids in batches:
        updates.backward(ours(ids, labels=ids).loss)
        scheduler.step()
    for a, b in zip(theirs.parameters(), ours.parameters()):
        assert torch.equal(a, b)
