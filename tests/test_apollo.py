"""APOLLOAdamW against the reference package (``apollo-torch`` 1.0.3, installed by ``make test``) and the
fp64 reference of tests/apollo_reference.py: the same trajectories for every configuration apollo-torch
runs, its seeds, APOLLO-Mini, and what we refuse or do differently."""

from __future__ import annotations

import io
import re

import pytest
import torch
from apollo_reference import apollo_reference
from test_apollo_reference import CASES, apollo_adamw, assert_same_trajectory, group_of, run_package, sequence  # noqa: F401
from torch import nn

from lowrank_optim import APOLLOAdamW, GaLoreAdamW

#: Cases where apollo-torch and we differ on purpose: its channel factor follows the weight's shape
#: (a rank-1 broadcast there), ours the unprojected dimension; a rank above min(m, n) is clamped here.
DIFFERENT = {"reverse-std-channel-rank1", "rank-above-dim"}


@pytest.mark.filterwarnings("ignore:rank 10 in param group 0 exceeds")
@pytest.mark.parametrize("case", [case for case in CASES if case not in DIFFERENT])
def test_same_trajectory_as_apollo_torch(apollo_adamw: type, case: str) -> None:  # noqa: F811 - the imported pytest fixture
    shape, keys, kw, growth = CASES[case]
    group = group_of(**keys)
    start, grads = sequence(shape, 8, seed=len(case), growth=growth)
    theirs, _, _ = run_package(apollo_adamw, [start], [[g] for g in grads], group, **kw)
    ours, optimizer, params = run_package(APOLLOAdamW, [start], [[g] for g in grads], group, **kw)
    for step_theirs, step_ours in zip(theirs, ours):
        # The same ops in the same order on the same matrices: equal to a few ulps of the weights.
        torch.testing.assert_close(step_ours[0], step_theirs[0], atol=5e-7, rtol=0)
    options = {k: v for k, v in group.items() if k != "proj"}
    reference = apollo_reference([start], [[g] for g in grads], **options, **kw)
    assert_same_trajectory(ours, reference, [start])


def test_seeds_count_every_parameter_as_apollo_torch_does(apollo_adamw: type) -> None:  # noqa: F811 - the imported pytest fixture
    """apollo-torch's first seed of a matrix is its 1-based position among all parameters given (a bias
    in an earlier plain group counts)."""
    generator = torch.Generator().manual_seed(3)
    starts = [
        torch.randn(5, generator=generator),
        torch.randn(12, 8, generator=generator),
        torch.randn(8, 12, generator=generator),
    ]
    grads = [[torch.randn(s.shape, generator=generator) for s in starts] for _ in range(5)]
    results = []
    for cls in (apollo_adamw, APOLLOAdamW):
        params = [nn.Parameter(s.clone()) for s in starts]
        optimizer = cls([{"params": params[:1]}, {"params": params[1:], **group_of(update_proj_gap=2)}], lr=0.05)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=5e-7, rtol=0)


def test_state_is_plain_tensors_and_resumes_bit_identically() -> None:
    start, grads = sequence((12, 8), 9, seed=4)

    def make(weight):
        return APOLLOAdamW([{"params": [weight], **group_of(update_proj_gap=3)}], lr=0.05)

    straight = nn.Parameter(start.clone())
    optimizer = make(straight)
    for grad in grads:
        straight.grad = grad.clone()
        optimizer.step()
    resumed = nn.Parameter(start.clone())
    optimizer = make(resumed)
    for grad in grads[:5]:
        resumed.grad = grad.clone()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(resumed)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(fresh.state[resumed]) == {"step", "exp_avg", "exp_avg_sq", "projection_seed", "update_norm"}
    for grad in grads[5:]:
        resumed.grad = grad.clone()
        fresh.step()
    assert torch.equal(resumed, straight)


def test_apollo_mini_state_is_a_seed_and_two_rows() -> None:
    weight = nn.Parameter(torch.randn(64, 32))
    optimizer = APOLLOAdamW([{"params": [weight], "rank": 1, "scale_type": "tensor", "scale": 128.0}], lr=0.01)
    weight.grad = torch.randn(64, 32)
    optimizer.step()
    state = optimizer.state[weight]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (64, 1)
    assert state["projection_seed"].shape == () and state["projection_seed"].dtype == torch.int64


@pytest.mark.parametrize(
    "group_update,kwargs,message",
    [
        ({"proj": "qr"}, {}, "Invalid proj in param group 0: 'qr'. Must be one of random, svd."),
        ({"proj": "svd", "projector": "random"}, {}, "Param group 0 sets proj='svd' and projector='random'"),
        ({"scale_type": "row"}, {}, "Invalid scale_type in param group 0: 'row'. Must be one of channel, tensor."),
        ({"scale": -1.0}, {}, "Invalid scale in param group 0: -1.0. Must be >= 0"),
        ({"proj_type": "full"}, {}, "Invalid proj_type in param group 0: 'full'. APOLLOAdamW supports std"),
        ({}, {"gamma": 0.5}, "Invalid gamma: 0.5. Must be a finite number >= 1.0."),
        ({}, {"disable_nl": 1}, "Invalid disable_nl: 1. Must be True or False."),
        (
            {},
            {"moment_policy": "rotate"},
            "Invalid moment_policy in param group 0: 'rotate'. The 'random' projector's basis is not orthonormal",
        ),
    ],
)
def test_bad_arguments_are_refused_at_construction(group_update: dict, kwargs: dict, message: str) -> None:
    weight = nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match=re.escape(message)):
        APOLLOAdamW([{"params": [weight], "rank": 2, **group_update}], **kwargs)


def test_random_projection_with_galore_runs_and_refuses_fira_and_rotate() -> None:
    from lowrank_optim import FiraAdamW

    weight = nn.Parameter(torch.randn(12, 8))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 2}], projector="random", lr=0.01)
    for grad in sequence((12, 8), 4, seed=2)[1]:
        weight.grad = grad.clone()
        optimizer.step()
    assert torch.isfinite(weight).all()
    with pytest.raises(ValueError, match=re.escape("Invalid projector in param group 0: 'random'. FiraAdamW's residual")):
        FiraAdamW([{"params": [weight], "rank": 3}], projector="random")
