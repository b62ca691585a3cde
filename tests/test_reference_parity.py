"""GaLoreAdamW against the reference package itself (``galore-torch`` 1.0), on the same inputs.

``make test`` installs ``galore-torch==1.0`` without its dependencies: its ``GaLoreAdamW`` needs only
torch, but its package ``__init__`` imports ``transformers`` (for a version check) and ``bitsandbytes``
(for the 8-bit variant), which are stubbed here for the duration of each test.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from stubs import stub_module, stub_transformers_version_check
from torch import nn

from lowrank_optim import GaLoreAdamW
from lowrank_optim.projection import SVDProjector


@pytest.fixture
def reference_galore(monkeypatch: pytest.MonkeyPatch) -> type:
    stub_transformers_version_check(monkeypatch)
    stub_module(monkeypatch, "bitsandbytes")
    stub_module(monkeypatch, "bitsandbytes.optim")
    stub_module(monkeypatch, "bitsandbytes.optim.optimizer", Optimizer2State=object)
    for name in [name for name in sys.modules if name.startswith("galore_torch")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("galore_torch").GaLoreAdamW


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the reference's own deprecation notice
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_same_trajectory_as_galore_torch(
    reference_galore: type, proj_type: str, shape: tuple[int, int], weight_decay: float
) -> None:
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=generator)
    grads = [torch.randn(shape, generator=generator) for _ in range(7)]
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    group = {"rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type}
    optimizers = [
        # LAPACK's signs, as galore-torch keeps them (our default is the canonical sign).
        GaLoreAdamW([{"params": [ours], **group}], lr=0.01, weight_decay=weight_decay, projector=SVDProjector(sign="lapack")),
        reference_galore([{"params": [theirs], **group}], lr=0.01, weight_decay=weight_decay),
    ]
    for grad in grads:  # refreshes at steps 1, 4 and 7
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    # The projections are bit-identical (our bases have the reference's column-major layout, which
    # matters: MKL's AVX-512 GEMM rounds differently for the two layouts). The weights differ only by
    # the one addmm_ we use instead of a matmul and an add: seen at most 7.2e-7 apart (3 ulp, on an
    # AMD EPYC with AVX-512; 6e-8 on an earlier machine).
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore:rank 8 in param group 0 exceeds")
def test_reverse_std_square_lowrank_crashes_the_reference_but_not_us(reference_galore: type) -> None:
    grad = torch.randn(4, 16)
    group = {"rank": 8, "update_proj_gap": 3, "scale": 0.25, "proj_type": "reverse_std"}
    theirs = nn.Parameter(torch.randn(4, 16))
    theirs.grad = grad
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        reference_galore([{"params": [theirs], **group}], lr=0.01).step()
    ours = nn.Parameter(torch.randn(4, 16))
    ours.grad = grad
    GaLoreAdamW([{"params": [ours], **group}], lr=0.01).step()
    assert torch.isfinite(ours).all()
