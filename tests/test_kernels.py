"""Compiled kernels (csrc/) against their pure-PyTorch references, and opcheck for every op.

Each kernel test calls the op (which dispatches to the compiled kernel of the tensors' device) and the
reference function the op registers as its default. Tolerances:

- sparse gather: bitwise; scatter-add: bitwise in fp32, within one bf16 ulp in bf16 (below).
- lowrank_adam_, fp32/fp64: the moments bitwise; ``N`` within 2 ulp, because ATen's vectorized CPU
  ``sqrt`` goes through MKL's VML, which is not correctly rounded, while the kernel's is.
- lowrank_adam_, bf16: within two bf16 ulp after three steps (``rtol=2**-6``): ATen rounds differently in its scalar tail
  loop than in its vector loop, and the kernel follows the vector loop everywhere.
- fira_residual_: the residual within 16 ulp in fp32/fp64 and one ulp in bf16, the limiter state within 1e-5
  relative (CPU) over two steps. phi and ``||S||_F`` are reductions: ATen sums in a different order (and, for
  bf16 input, in fp32) than the kernels (in double), which moves phi by an ulp and the norm by a few, and
  the residual inherits that through phi and the limiter. CUDA: within 32 ulp (bf16: two ulp).
- fira_folded_: the weight within 8 ulp of its magnitude (plus 8 ulp of the moments' dtype of how far it moved:
  the reference rounds the norms of fp32 moments to fp32, the kernel keeps them in double), the limiter state
  within 1e-5 relative over four steps (the kernel sums the channel norms in double, the reference in the
  weights' dtype); a skip leaves both
  bit-for-bit, NaN gradient included.
- dct_topk: the kernel's selection is a valid top-``rank`` of the exactly (fp64) computed scores up to
  the scores' rounding: no unselected score exceeds a selected one by more than 1e-5 relative (ties
  between nearly equal scores may resolve either way); in fp64 it equals the reference's.

Without compiled kernels for a device the kernel tests skip with the load error as the reason.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys

import pytest
import torch
from devices import DEVICES
from test_quant_ops import quant_op_samples
from test_sltrain_factored import spmm_op_samples

from lowrank_optim.ops import kernel_load_error, kernels_available
from lowrank_optim.ops.adam import _adam_default
from lowrank_optim.ops.dct import _dct_topk_default
from lowrank_optim.ops.fira import _fira_default, _folded_default
from lowrank_optim.ops.sparse import _gather_default, _scatter_add_default

OPS = torch.ops.lowrank_optim
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


# (m, n, r): empty, single row, ragged (5461), square; the lowrank tensors are m x r (dim=1) or r x n (dim=0).
FIRA_SHAPES = [(0, 7, 3), (1, 97, 1), (33, 5461, 8), (96, 64, 16)]
FIRA_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
               (torch.float64, torch.float64)]


def _fira_inputs(
    shape: tuple[int, int, int], dim: int, dtype: torch.dtype, lowrank_dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, ...]:
    m, n, r = shape
    lowrank_shape = (m, r) if dim == 1 else (r, n)
    grad = _randn(m, n, dtype=dtype, device=device, seed=10)
    back = _randn(m, n, dtype=dtype, device=device, seed=11)
    lowrank = _randn(*lowrank_shape, dtype=lowrank_dtype, device=device, seed=12)
    normalized = _randn(*lowrank_shape, dtype=lowrank_dtype, device=device, seed=13)
    return grad, back, normalized, lowrank


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", FIRA_SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtypes", FIRA_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_fira_kernel_matches_reference(
    device: str, shape: tuple[int, int, int], dim: int, dtypes: tuple[torch.dtype, torch.dtype], layout: str
) -> None:
    _require_kernels(device)
    dtype, lowrank_dtype = dtypes
    grad, back, normalized, lowrank = _fira_inputs(shape, dim, dtype, lowrank_dtype, device)
    if layout == "transposed":  # non-contiguous inputs and in-place output
        grad, back, normalized, lowrank = (t.t().contiguous().t() for t in (grad, back, normalized, lowrank))
    state, expected_state = (torch.zeros((), device=device) for _ in range(2))
    # The first step, a limited one, then two with the limiter inactive (exactly 1), with and without scale.
    for step, (scale, grows) in enumerate([(1.0, 1.0), (0.25, 3.0), (1.0, 0.5), (0.25, 0.25)]):
        expected, actual = back.clone(), back.clone()
        previous = expected_state.item()
        _fira_default(grad * grows, expected, normalized, lowrank, expected_state, dim, 0.5, 1.01, step == 0, scale)
        if step > 0 and expected.numel() > 0:  # a limited step stores exactly gamma · previous, a free one less
            limited = math.isclose(expected_state.item(), 1.01 * previous, rel_tol=1e-5)
            assert limited == (grows > 1.0), (step, expected_state.item(), previous)
        OPS.fira_residual_(grad * grows, actual, normalized, lowrank, state, dim, 0.5, 1.01, step == 0, scale)
        if dtype == torch.bfloat16:
            tolerance = dict(rtol=2**-7 if device == "cpu" else 2**-6, atol=0.0)
        else:
            tolerance = dict(rtol=(16 if device == "cpu" else 32) * torch.finfo(dtype).eps, atol=0.0)
        torch.testing.assert_close(actual, expected, **tolerance)
        torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=0.0)
        assert actual.stride() == back.stride()


FOLDED_SHAPES = [(0, 7, 2), (1, 97, 1), (7, 1, 1), (33, 300, 8), (300, 64, 16)]
FOLDED_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float64, torch.float32)]


def _folded_inputs(
    shape: tuple[int, int, int], dim: int, dtype: torch.dtype, lowrank_dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, ...]:
    """``(weight, grad, lowrank, normalized, basis)``: an orthonormal basis (the folded update's premise)
    and ``R`` the gradient's projection onto it, as the step hands them over."""
    m, n, r = shape
    size = n if dim == 1 else m
    r = min(r, size)
    q = torch.linalg.qr(_randn(max(size, 1), max(r, 1), dtype=torch.float64, device="cpu", seed=20))[0][:size, :r]
    basis = (q.T if dim == 1 else q).contiguous().to(dtype=dtype, device=device)
    grad = _randn(m, n, dtype=dtype, device=device, seed=21)
    lowrank = (grad @ basis.T if dim == 1 else basis.T @ grad).to(lowrank_dtype)
    normalized = _randn(*lowrank.shape, dtype=lowrank_dtype, device=device, seed=22)
    weight = _randn(m, n, dtype=dtype, device=device, seed=23)
    return weight, grad, lowrank, normalized, basis


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", FOLDED_SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtypes", FOLDED_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_fira_folded_kernel_matches_reference(
    device: str, shape: tuple[int, int, int], dim: int, dtypes: tuple[torch.dtype, torch.dtype], layout: str
) -> None:
    """Four steps (first, limited, free, free with another scale), then a skipped one with a NaN gradient:
    W within 8 ulp of its magnitude, the limiter state within 1e-5 (the norms are summed in another order),
    and a skip leaves both bit-for-bit."""
    _require_kernels(device)
    dtype, lowrank_dtype = dtypes
    weight, grad, lowrank, normalized, basis = _folded_inputs(shape, dim, dtype, lowrank_dtype, device)
    if layout == "transposed":  # non-contiguous inputs and in-place output
        weight, grad = (t.t().contiguous().t() for t in (weight, grad))
    expected, actual = weight.clone(), weight.clone()
    state, expected_state = (torch.zeros((), device=device) for _ in range(2))
    for step, (scale, grows) in enumerate([(0.25, 1.0), (0.25, 3.0), (0.25, 0.5), (1.0, 0.25)]):
        options = (0.25, scale, 1.0, 1.01, step == 0, 0.01)
        _folded_default(expected, grad * grows, lowrank * grows, normalized, basis, expected_state, dim, *options)
        OPS.fira_folded_(actual, grad * grows, lowrank * grows, normalized, basis, state, dim, *options)
        magnitude = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
        moved = (expected - weight).abs().max().item() if expected.numel() else 0.0
        # fp32 moments of fp64 weights: the norms of R are fp32 data, rounded once more by the reference.
        tolerance = 8 * torch.finfo(dtype).eps * magnitude + 8 * torch.finfo(lowrank_dtype).eps * moved
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=tolerance)
        torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=0.0)
    assert actual.stride() == weight.stride()
    if grad.numel():
        poisoned = grad.clone()
        poisoned[0, 0] = float("nan")
        before, before_state = actual.clone(), state.clone()
        skip = torch.tensor(True, device=device)
        OPS.fira_folded_(actual, poisoned, lowrank, normalized, basis, state, dim, 0.25, 0.25, 1.0, 1.01, False, 0.01, skip)
        assert torch.equal(actual, before) and torch.equal(state, before_state)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_reductions_do_not_depend_on_thread_count(dim: int, dtype: torch.dtype) -> None:
    """The CPU kernels' sums (Fira's norms, DCT's scores) are added in a fixed order: bit-identical results
    with 1 and 2 threads. The folded Fira update's weight is the exception: its back-projection is ATen's
    GEMM (``addmm_``), whose MKL kernels round with the thread count on some CPUs (seen on AVX-512 + AMX:
    4.8e-7 at dim 1; bitwise on AVX2), so it is held to a few ulps while its limiter norm stays bitwise."""
    _require_kernels("cpu")
    grad, back, normalized, lowrank = _fira_inputs((300, 777, 24), dim, dtype, torch.float32, "cpu")
    transformed = _randn(300, 777, dtype=torch.float32, device="cpu", seed=15)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            state = torch.ones(())
            outputs = []
            for first, grows in ((True, 1.0), (False, 4.0)):
                out = back.clone()
                OPS.fira_residual_(grad * grows, out, normalized, lowrank, state, dim, 0.5, 1.01, first, 0.5)
                outputs += [out, state.clone()]
            outputs.append(OPS.dct_topk(transformed, 100, dim))
            weight, fgrad, flow, fnorm, fbasis = _folded_inputs((300, 777, 24), dim, torch.float32, torch.float32, "cpu")
            folded_state = torch.ones(())
            for first, grows in ((True, 1.0), (False, 4.0)):
                OPS.fira_folded_(weight, fgrad * grows, flow * grows, fnorm, fbasis, folded_state, dim, 0.25, 0.25, 1.0,
                                 1.01, first, 0.01)
                outputs += [("gemm", weight.clone()), folded_state.clone()]
            results.append(outputs)
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        if isinstance(one, tuple):
            (_, one), (_, two) = one, two
            torch.testing.assert_close(one, two, rtol=0, atol=8 * torch.finfo(one.dtype).eps * one.abs().max().item())
        else:
            assert torch.equal(one, two)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 7), (1, 97), (7, 1), (33, 5461), (300, 64)])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", VALUE_DTYPES + [torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_dct_topk_kernel_matches_reference(
    device: str, shape: tuple[int, int], dim: int, dtype: torch.dtype, layout: str
) -> None:
    _require_kernels(device)
    rows, cols = shape
    if layout == "transposed":
        transformed = _randn(cols, rows, dtype=dtype, device=device, seed=14).t()
    elif layout == "sliced":
        transformed = _randn(rows, cols + 3, dtype=dtype, device=device, seed=14)[:, 1 : cols + 1]
    else:
        transformed = _randn(rows, cols, dtype=dtype, device=device, seed=14)
    size = transformed.shape[1 - dim]
    for rank in sorted({0, min(1, size), size // 3, size}):
        actual = OPS.dct_topk(transformed, rank, dim)
        assert actual.dtype == torch.int64 and actual.shape == (rank,)
        assert bool((actual[1:] > actual[:-1]).all()), "indices must be sorted and unique"
        scores = transformed.double().abs().sum(dim=dim).cpu()
        chosen = torch.zeros(size, dtype=torch.bool)
        chosen[actual.cpu()] = True
        if 0 < rank < size:
            assert scores[~chosen].max() <= scores[chosen].min() * (1 + 1e-5)
        # fp32 sums of 5461 columns come within an ulp of each other (near-ties); empty sums all tie at 0.
        if dtype == torch.float64 and transformed.shape[dim] > 0:
            torch.testing.assert_close(actual, _dct_topk_default(transformed, rank, dim), rtol=0, atol=0)


def _op_samples(device: str) -> list[tuple[object, tuple]]:
    dense = _randn(6, 7, dtype=torch.float32, device=device, seed=7)
    lowrank, exp_avg, exp_avg_sq = _adam_inputs((4, 9), torch.float32, device)
    samples: list[tuple[object, tuple]] = [
        (OPS.lowrank_adam_.default, (lowrank, exp_avg, exp_avg_sq, torch.empty_like(lowrank), 0.9, 0.999, 1e-6)),
        (OPS.lowrank_adam_.default, (lowrank.bfloat16(), exp_avg.bfloat16(), exp_avg_sq.bfloat16(),
                                     torch.empty_like(lowrank, dtype=torch.bfloat16), 0.8, 0.99, 1e-8)),
    ]
    for dim in (0, 1):
        grad, back, normalized, lowrank = _fira_inputs((6, 7, 2), dim, torch.float32, torch.float32, device)
        for first in (True, False):
            state = torch.tensor(1.5, device=device)
            samples.append(
                (OPS.fira_residual_.default, (grad, back.clone(), normalized, lowrank, state, dim, 0.25, 1.01, first, 0.5))
            )
        samples.append((OPS.dct_topk.default, (grad, 3, dim)))
    for dim in (0, 1):
        for dtypes in FOLDED_DTYPES:
            weight, grad, lowrank, normalized, basis = _folded_inputs((6, 7, 2), dim, *dtypes, device)
            for first, skip in ((True, None), (False, None), (False, torch.tensor(False, device=device))):
                state = torch.tensor(1.5, device=device)
                samples.append(
                    (OPS.fira_folded_.default,
                     (weight.clone(), grad, lowrank, normalized, basis, state, dim, 0.25, 0.25, 1.0, 1.01, first, 0.01, skip))
                )
    grad, back, normalized, lowrank = _fira_inputs((6, 7, 2), 1, torch.bfloat16, torch.float32, device)
    samples.append(
        (OPS.fira_residual_.default, (grad, back, normalized, lowrank, torch.tensor(1.0, device=device), 1, 0.5, 1.01,
                                      False, 1.0))
    )
    for index_dtype in INDEX_DTYPES:
        indices = _support(dense.numel(), 0.3, index_dtype, device)
        values = _randn(indices.numel(), dtype=torch.float32, device=device, seed=8)
        samples += [
            (OPS.sparse_scatter_add_.default, (dense.clone(), indices, values, 0.5)),
            (OPS.sparse_gather.default, (dense, indices)),
            (OPS.sparse_gather.default, (dense.t(), indices)),
            (OPS.sparse_gather.default, (dense.clone().requires_grad_(), indices)),
        ]
    samples += spmm_op_samples(device)  # SLTrain's factored-path ops (tests/test_sltrain_factored.py)
    samples += quant_op_samples(device)  # the blockwise 8-bit state ops (tests/test_quant_ops.py)
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
        [sys.executable, "-c", script], env=env, cwd=tests_dir, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


# ATen's capability picks the CPU kernels' variant (csrc/cpu/common.h, kernel_variant): "default" runs
# the unfused one (products rounded as ATen's DEFAULT build rounds them), "avx2" the AVX2+FMA one; this
# machine's own capability (AVX512 here) runs in the main test process. The reference runs under the
# same capability, so each variant is held to the reference it must match.
_VARIANT_CAPABILITIES = ["default", "avx2"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the narrower variants exist on x86 only")
@pytest.mark.parametrize("capability", _VARIANT_CAPABILITIES)
def test_cpu_kernel_variants_match_reference(capability: str) -> None:
    _require_kernels("cpu")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    check = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if check.stdout.strip() != capability.upper():
        pytest.skip(f"this CPU cannot run ATen at {capability!r} (got {check.stdout.strip()!r})")
    tests_dir = os.path.dirname(__file__)
    # The kernels against their references, and the optimizers' fused vs reference trajectories.
    selection = "(cpu and (adam or fira or dct or scatter or gather or thread_count or quantize) and not variants) or fused"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "test_kernels.py", "test_fused.py",
         "test_quant_ops.py", "-k", selection],
        env=env, cwd=tests_dir, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
