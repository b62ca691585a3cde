"""Checks that need a CUDA device; skipped (with the reason) on machines without one."""

from __future__ import annotations

import io

import pytest
import torch
from devices import CUDA_MARKS
from torch import nn

from lowrank_optim import GaLoreAdamW

pytestmark = CUDA_MARKS


@pytest.mark.parametrize("moment_dtype", [None, torch.float32])
def test_state_saved_on_cpu_follows_params_to_cuda_and_keeps_dtypes(moment_dtype: torch.dtype | None) -> None:
    weights = [nn.Parameter(torch.randn(12, 8, dtype=torch.bfloat16)) for _ in range(2)]
    optimizer = GaLoreAdamW([{"params": weights, "rank": 4, "update_proj_gap": 2}], moment_dtype=moment_dtype)
    for _ in range(3):
        for w in weights:
            w.grad = torch.randn_like(w)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)

    cuda_weights = [nn.Parameter(w.detach().cuda()) for w in weights]
    resumed = GaLoreAdamW([{"params": cuda_weights, "rank": 4, "update_proj_gap": 2}], moment_dtype=moment_dtype)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for w in cuda_weights:
        state = resumed.state[w]
        assert state["basis_right"].device == w.device and state["basis_right"].dtype == torch.bfloat16
        assert state["exp_avg"].device == w.device
        assert state["exp_avg"].dtype == (moment_dtype or torch.bfloat16)
        w.grad = torch.randn_like(w)
    resumed.step()  # and it runs there, picking the foreach path on CUDA


def test_cuda_step_matches_cpu_step() -> None:
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(64, 32, generator=generator)
    grads = [torch.randn(64, 32, generator=generator) for _ in range(5)]
    results = []
    for device in ("cpu", "cuda"):
        weight = nn.Parameter(start.clone().to(device))
        # One refresh only: cuSOLVER and LAPACK may pick opposite signs for singular vectors, which
        # is harmless at the first refresh (zero moments) but not when moments carry over.
        optimizer = GaLoreAdamW([{"params": [weight], "rank": 8, "update_proj_gap": 100}], lr=0.01)
        for grad in grads:
            weight.grad = grad.to(device)
            optimizer.step()
        results.append(weight.detach().cpu())
    # Different SVD and matmul kernels: equal to fp32 rounding, not bitwise.
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("name", ["galore", "fira", "dct"])
def test_nonfinite_skip_between_refreshes_never_syncs(name: str, fused: bool | None) -> None:
    """The skip decision stays on the device: a NaN at a non-refresh step under sync-debug "error"."""
    from lowrank_optim import DCTAdamW, FiraAdamW

    optimizer_class = {"galore": GaLoreAdamW, "fira": FiraAdamW, "dct": DCTAdamW}[name]
    weight = nn.Parameter(torch.randn(64, 32, device="cuda"))
    bias = nn.Parameter(torch.randn(64, device="cuda"))
    optimizer = optimizer_class(
        [{"params": [bias]}, {"params": [weight], "rank": 8, "update_proj_gap": 100}], lr=0.01, fused=fused
    )
    for _ in range(2):
        weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
        optimizer.step()
    before = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
    weight.grad[3, 3] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(weight, before[0])
    for key, value in before[1].items():
        if key != "step":
            assert torch.equal(optimizer.state[weight][key], value), key
    assert optimizer.skipped_updates() == {(1, 0): 1}


@pytest.mark.parametrize("bad", [4096, -1, 2**40])
def test_cuda_sparse_ops_raise_on_out_of_range_indices(bad: int) -> None:
    from lowrank_optim.ops import kernels_available

    if not kernels_available("cuda"):
        pytest.skip("CUDA kernels not built")
    dense = torch.zeros(64, 64, device="cuda")
    indices = torch.tensor([1, 2, bad], device="cuda")
    with pytest.raises(IndexError, match=f"flat_indices\\[2\\]={bad} is out of range"):
        torch.ops.lowrank_optim.sparse_scatter_add_(dense, indices, torch.ones(3, device="cuda"), 1.0)
    with pytest.raises(IndexError, match=f"flat_indices\\[2\\]={bad} is out of range"):
        torch.ops.lowrank_optim.sparse_gather(dense, indices)
    assert not dense.any()
    repeated = torch.tensor([5, 5, 3], device="cuda")
    torch.ops.lowrank_optim.sparse_scatter_add_(dense, repeated, torch.ones(3, device="cuda"), 1.0)
    assert dense.view(-1)[5].item() == 2.0 and dense.view(-1)[3].item() == 1.0


def test_sltrain_forward_and_backward_never_sync_once_the_support_is_checked() -> None:
    from lowrank_optim.nn import SLTrainLinear

    layer = SLTrainLinear(64, 48, rank=8, seed=0, device="cuda")
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # the first forward checks the support on the device (one sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(layer.values.grad).all()
