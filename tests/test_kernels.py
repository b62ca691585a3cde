"""Compiled kernels (csrc/) against their pure-PyTorch references, and opcheck for every op.

Each kernel test calls the op (which dispatches to the compiled kernel of the tensors' device) and the
reference function the op registers as its default. Tolerances:

- sparse gather: bitwise; scatter-add: bitwise in fp32, within one bf16 ulp in bf16 (below).
- lowrank_adam_, fp32/fp64: the moments bitwise; ``N`` within 2 ulp, because ATen's vectorized CPU
  ``sqrt`` goes through MKL's VML, which is not correctly rounded, while the kernel's is.
- lowrank_adam_, bf16: within two bf16 ulp after three steps (``rtol=2**-6``): ATen rounds differently in its scalar tail
  loop than in its vector loop, and the kernel follows the vector loop everywhere.

Without compiled kernels for a device the kernel tests skip with the load error as the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lowrank_optim.ops import kernel_load_error, kernels_available
from lowrank_optim.ops.adam import _adam_default
from lowrank_optim.ops.sparse import _gather_default, _scatter_add_default

OPS = torch.ops.lowrank_optim
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is available here"),
        ],
    ),
]
INDEX_DTYPES = [torch.int32, torch.int64]
VALUE_DTYPES = [torch.float32, torch.bfloat16]
# (rows, cols): empty, single row, ragged (5461 = LLaMA-1B's intermediate size), square.
DENSE_SHAPES = [(0, 7), (1, 97), (33, 5461), (64, 64)]


def _require_kernels(device: str) -> None:
    if not kernels_available(device):
        pytest.skip(f"no compiled kernels for {device}: {kernel_load_error(device)}")


def _support(numel: int, density: float, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    nnz = int(density * numel)
    return torch.randperm(numel, generator=generator)[:nnz].sort().values.to(dtype=dtype, device=device)


def _randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_scatter_add_kernel_matches_reference(
    device: str, shape: tuple[int, int], index_dtype: torch.dtype, value_dtype: torch.dtype
) -> None:
    _require_kernels(device)
    dense = _randn(*shape, dtype=value_dtype, device=device, seed=1)
    indices = _support(dense.numel(), 0.3, index_dtype, device)
    values = _randn(indices.numel(), dtype=value_dtype, device=device, seed=2)
    expected = dense.clone()
    _scatter_add_default(expected, indices, values, -0.75)
    OPS.sparse_scatter_add_(dense, indices, values, -0.75)
    # bf16: index_add_ may round alpha · value to bf16 before adding (its scalar loop does), the kernel
    # rounds once; the two differ by at most one bf16 ulp of the operands (values are ~N(0, 1)).
    tolerance = dict(rtol=2**-7, atol=2**-7) if value_dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(dense, expected, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_gather_kernel_matches_reference(
    device: str, shape: tuple[int, int], index_dtype: torch.dtype, value_dtype: torch.dtype, layout: str
) -> None:
    _require_kernels(device)
    rows, cols = shape
    if layout == "transposed":
        dense = _randn(cols, rows, dtype=value_dtype, device=device, seed=3).t()
    elif layout == "sliced":
        dense = _randn(rows, cols + 5, dtype=value_dtype, device=device, seed=3)[:, 2 : cols + 2]
    else:
        dense = _randn(rows, cols, dtype=value_dtype, device=device, seed=3)
    assert (layout == "contiguous") == dense.is_contiguous() or dense.numel() <= cols
    indices = _support(dense.numel(), 0.3, index_dtype, device)
    torch.testing.assert_close(OPS.sparse_gather(dense, indices), _gather_default(dense, indices), rtol=0, atol=0)


def _adam_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    lowrank = _randn(*shape, dtype=dtype, device=device, seed=4)
    exp_avg = _randn(*shape, dtype=dtype, device=device, seed=5)
    exp_avg_sq = _randn(*shape, dtype=dtype, device=device, seed=6).square()
    return lowrank, exp_avg, exp_avg_sq


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (1, 7), (13, 5461), (512, 67), (256, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_adam_kernel_matches_reference(
    device: str, shape: tuple[int, int], dtype: torch.dtype, transposed: bool
) -> None:
    _require_kernels(device)
    lowrank, exp_avg, exp_avg_sq = _adam_inputs(shape, dtype, device)
    if transposed:  # non-contiguous inputs and in-place outputs
        lowrank, exp_avg, exp_avg_sq = (t.t().contiguous().t() for t in (lowrank, exp_avg, exp_avg_sq))
    expected = [t.clone() for t in (exp_avg, exp_avg_sq)] + [torch.empty_like(exp_avg)]
    normalized = torch.empty_like(exp_avg)
    for _ in range(3):  # moments feed back: later steps see the kernel's own rounding
        _adam_default(lowrank, *expected, 0.9, 0.999, 1e-6)
        OPS.lowrank_adam_(lowrank, exp_avg, exp_avg_sq, normalized, 0.9, 0.999, 1e-6)
    if dtype == torch.bfloat16:
        tolerance = dict(rtol=2**-6, atol=1e-5)
        moment_tolerance = tolerance
    else:
        ulp = torch.finfo(dtype).eps
        tolerance = dict(rtol=2 * ulp, atol=0.0)
        moment_tolerance = dict(rtol=0.0, atol=0.0) if device == "cpu" else tolerance
    torch.testing.assert_close(exp_avg, expected[0], **moment_tolerance)
    torch.testing.assert_close(exp_avg_sq, expected[1], **moment_tolerance)
    torch.testing.assert_close(normalized, expected[2], **tolerance)


def _op_samples(device: str) -> list[tuple[object, tuple]]:
    dense = _randn(6, 7, dtype=torch.float32, device=device, seed=7)
    lowrank, exp_avg, exp_avg_sq = _adam_inputs((4, 9), torch.float32, device)
    samples: list[tuple[object, tuple]] = [
        (OPS.lowrank_adam_.default, (lowrank, exp_avg, exp_avg_sq, torch.empty_like(lowrank), 0.9, 0.999, 1e-6)),
        (OPS.lowrank_adam_.default, (lowrank.bfloat16(), exp_avg.bfloat16(), exp_avg_sq.bfloat16(),
                                     torch.empty_like(lowrank, dtype=torch.bfloat16), 0.8, 0.99, 1e-8)),
    ]
    for index_dtype in INDEX_DTYPES:
        indices = _support(dense.numel(), 0.3, index_dtype, device)
        values = _randn(indices.numel(), dtype=torch.float32, device=device, seed=8)
        samples += [
            (OPS.sparse_scatter_add_.default, (dense.clone(), indices, values, 0.5)),
            (OPS.sparse_gather.default, (dense, indices)),
            (OPS.sparse_gather.default, (dense.t(), indices)),
            (OPS.sparse_gather.default, (dense.clone().requires_grad_(), indices)),
        ]
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device: str) -> None:
    """Schema, fake kernel and autograd registration agree with whichever kernel the device dispatches to."""
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


def test_package_runs_its_ops_without_compiled_code() -> None:
    """With loading disabled the ops fall back to their references, and the load error says why."""
    script = (
        "import torch, lowrank_optim\n"
        "from lowrank_optim.ops import kernels_available, kernel_load_error\n"
        "assert not kernels_available('cpu')\n"
        "assert 'LOWRANK_OPTIM_NO_EXTENSIONS' in kernel_load_error('cpu'), kernel_load_error('cpu')\n"
        "import test_kernels\n"
        "for op, args in test_kernels._op_samples('cpu'):\n"
        "    torch.library.opcheck(op, args)\n"
    )
    env = {**os.environ, "LOWRANK_OPTIM_NO_EXTENSIONS": "1"}
    tests_dir = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tests_dir, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
