"""SLTrain's factored path: the sparse ops (spmm_add_, spmm_t_add_, sddmm), their kernels, and the layer.

The ops are checked against an fp64 dense reference (``S`` materialised, which only a test may do) for the
compiled kernel of each device and for the pure-PyTorch default. Tolerances: fp32 sums of up to a few
hundred products within 1e-5 (relative to the magnitude of the sum's terms); fp64 within 1e-12; bf16/fp16
are summed in fp32 and rounded once, so within one ulp of the result (``2**-7`` / ``2**-10`` relative) plus
the fp32 sum's error. The layer's two paths must agree with the fp64 dense reference to fp32 rounding.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from devices import DEVICES
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_optim.nn import SLTrainLinear, convert_to_sltrain
from lowrank_optim.nn import sltrain as sltrain_module
from lowrank_optim.nn.sltrain import PATHS, _FactoredSparsePlusLowRankLinear, path_costs
from lowrank_optim.ops import kernel_load_error, kernels_available, sddmm, sparse_row_pointers, spmm_add_, spmm_t_add_
from lowrank_optim.ops.spmm import _sddmm_default, _spmm_add_default, _spmm_t_add_default

OPS = torch.ops.lowrank_optim
KERNELS = ["compiled", "default"]
INDEX_DTYPES = [torch.int32, torch.int64]
# (tokens, out m, in n): empty, one token, ragged token tiles (67, 130 are not multiples of any tile), a
# LLaMA-like ragged width (5461 is too slow for every combination: 333 keeps the shape ragged), and enough
# tokens (>= 256) for the CPU kernel of spmm_t_add_ to gather over the transposed support.
SHAPES = [(0, 5, 7), (1, 9, 13), (67, 33, 40), (130, 20, 333), (300, 24, 50)]
DENSITIES = [0.0, 0.03, 0.3, 1.0]


def _require_compiled(device: str) -> None:
    if not kernels_available(device):
        pytest.skip(f"no compiled kernels for {device}: {kernel_load_error(device)}")
    key = "CPU" if device == "cpu" else "CUDA"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lowrank_optim::spmm_add_", key):
        pytest.skip(f"the compiled {device} kernels predate spmm_add_ (rebuild with `make ext`)")


def _ops(kernel: str, device: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    if kernel == "compiled":
        _require_compiled(device)
        return OPS.spmm_add_, OPS.spmm_t_add_, OPS.sddmm
    return _spmm_add_default, _spmm_t_add_default, _sddmm_default


def _support(m: int, n: int, density: float, dtype: torch.dtype, device: str, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    nnz = int(density * m * n)
    return torch.randperm(m * n, generator=generator)[:nnz].sort().values.to(dtype=dtype, device=device)


def _randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


def _dense_s(indices: Tensor, values: Tensor, m: int, n: int) -> Tensor:
    """The fp64 dense S (repeated indices add up)."""
    dense = torch.zeros(m * n, dtype=torch.float64, device=values.device)
    dense.index_add_(0, indices.long(), values.double())
    return dense.view(m, n)


def _tolerance(dtype: torch.dtype, terms: Tensor) -> dict[str, float]:
    """Within the dtype's rounding of a sum whose terms are ``terms`` (per-element sums of |products|)."""
    scale = float(terms.max()) if terms.numel() else 0.0
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12 * (1 + scale)}
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5 * (1 + scale)}
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    return {"rtol": ulp, "atol": ulp * (1 + scale)}


def _layout(tensor: Tensor, layout: str) -> Tensor:
    """The same values, contiguous or as a transposed (column-major) view."""
    return tensor.t().contiguous().t() if layout == "transposed" else tensor


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{t}x{m}x{n}" for t, m, n in SHAPES])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_ops_match_the_dense_reference(
    device: str, kernel: str, shape: tuple[int, int, int], density: float, dtype: torch.dtype, index_dtype: torch.dtype
) -> None:
    spmm, spmm_t, sampled = _ops(kernel, device)
    tokens, m, n = shape
    indices = _support(m, n, density, index_dtype, device)
    row_ptr = sparse_row_pointers(indices, m, n)
    values = _randn(indices.numel(), dtype=dtype, device=device, seed=1)
    x = _randn(tokens, n, dtype=dtype, device=device, seed=2)
    g = _randn(tokens, m, dtype=dtype, device=device, seed=3)
    s = _dense_s(indices, values, m, n)
    for layout in ("contiguous", "transposed"):
        out = _layout(_randn(tokens, m, dtype=dtype, device=device, seed=4), layout)
        expected = out.double() + x.double() @ s.t()
        spmm(out, _layout(x, layout), values, indices, row_ptr)
        torch.testing.assert_close(out.double(), expected, **_tolerance(dtype, x.double().abs() @ s.abs().t()))

        out = _layout(_randn(tokens, n, dtype=dtype, device=device, seed=5), layout)
        expected = out.double() + g.double() @ s
        spmm_t(out, _layout(g, layout), values, indices, row_ptr)
        torch.testing.assert_close(out.double(), expected, **_tolerance(dtype, g.double().abs() @ s.abs()))

        result = sampled(_layout(g, layout), _layout(x, layout), indices, row_ptr)
        assert result.dtype == dtype and result.shape == indices.shape
        full = g.double().t() @ x.double()
        terms = (g.double().abs().t() @ x.double().abs()).reshape(-1)[indices.long()]
        torch.testing.assert_close(result.double(), full.reshape(-1)[indices.long()], **_tolerance(dtype, terms))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("order", ["shuffled", "repeated"])
def test_any_support_is_computed_correctly(device: str, kernel: str, order: str) -> None:
    """A support that is not strictly increasing (never SLTrain's) runs the entry-by-entry loops."""
    spmm, spmm_t, sampled = _ops(kernel, device)
    m, n, tokens = 12, 10, 70
    indices = _support(m, n, 0.4, torch.int32, device)
    if order == "repeated":
        indices = torch.cat([indices, indices[::3]])
    indices = indices[torch.randperm(indices.numel(), generator=torch.Generator().manual_seed(7)).to(device)]
    row_ptr = sparse_row_pointers(indices, m, n)
    values = _randn(indices.numel(), dtype=torch.float64, device=device, seed=1)
    x = _randn(tokens, n, dtype=torch.float64, device=device, seed=2)
    g = _randn(tokens, m, dtype=torch.float64, device=device, seed=3)
    s = _dense_s(indices, values, m, n)
    out = torch.zeros(tokens, m, dtype=torch.float64, device=device)
    spmm(out, x, values, indices, row_ptr)
    torch.testing.assert_close(out, x @ s.t(), rtol=1e-12, atol=1e-12)
    out = torch.zeros(tokens, n, dtype=torch.float64, device=device)
    spmm_t(out, g, values, indices, row_ptr)
    torch.testing.assert_close(out, g @ s, rtol=1e-12, atol=1e-12)
    expected = torch.stack([(g[:, int(i) // n] * x[:, int(i) % n]).sum() for i in indices.tolist()])
    torch.testing.assert_close(sampled(g, x, indices, row_ptr), expected, rtol=1e-12, atol=1e-12)


def test_compiled_kernels_do_not_depend_on_the_thread_count() -> None:
    """Every output is summed by one task in a fixed order, however the work is split."""
    _require_compiled("cpu")
    m, n, tokens = 300, 257, 200
    indices = _support(m, n, 0.05, torch.int32, "cpu")
    row_ptr = sparse_row_pointers(indices, m, n)
    values = _randn(indices.numel(), dtype=torch.float32, device="cpu", seed=1)
    x = _randn(tokens, n, dtype=torch.float32, device="cpu", seed=2)
    g = _randn(tokens, m, dtype=torch.float32, device="cpu", seed=3)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            forward, backward = torch.zeros(tokens, m), torch.zeros(tokens, n)
            OPS.spmm_add_(forward, x, values, indices, row_ptr)
            OPS.spmm_t_add_(backward, g, values, indices, row_ptr)
            results.append((forward, backward, OPS.sddmm(g, x, indices, row_ptr)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for first, second in zip(results[0], other):
            assert torch.equal(first, second)


def test_spmm_t_add_gathers_and_scatters_to_the_same_bits() -> None:
    """From 256 tokens on the CPU kernel transposes the support and gathers; below it scatters. Each output
    is summed over the rows in the same order either way."""
    _require_compiled("cpu")
    m, n = 300, 257
    indices = _support(m, n, 0.05, torch.int32, "cpu")
    row_ptr = sparse_row_pointers(indices, m, n)
    values = _randn(indices.numel(), dtype=torch.float32, device="cpu", seed=1)
    g = _randn(300, m, dtype=torch.float32, device="cpu", seed=3)
    gathered, scattered = torch.zeros(300, n), torch.zeros(200, n)
    OPS.spmm_t_add_(gathered, g, values, indices, row_ptr)
    OPS.spmm_t_add_(scattered, g[:200], values, indices, row_ptr)
    assert torch.equal(gathered[:200], scattered)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the narrower variants exist on x86 only")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_variants_match_the_reference(capability: str) -> None:
    """ATen's capability picks the kernels' variant (csrc/cpu/common.h): run the kernel tests under each."""
    _require_compiled("cpu")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    check = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if check.stdout.strip() != capability.upper():
        pytest.skip(f"this CPU cannot run ATen at {capability!r} (got {check.stdout.strip()!r})")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "test_sltrain_factored.py", "-k",
         "compiled and cpu and (dense_reference or any_support) or thread_count"],
        env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.split("\n")[-2], result.stdout[-2000:]


# ---- errors: the same type and message from every kernel -----------------------------------------------


def _message(call: Callable[[], object]) -> tuple[type, str]:
    with pytest.raises((TypeError, ValueError, IndexError, RuntimeError)) as info:
        call()
    return type(info.value), str(info.value).split("\n")[0]


def _bad_args() -> dict[str, tuple[str, tuple, str]]:
    """case: (op, args, expected message fragment)."""
    idx = torch.tensor([1, 5, 6, 11], dtype=torch.int32)  # S is 3 x 4: rows 0, 1, 1, 2
    ptr = torch.tensor([0, 1, 3, 4], dtype=torch.int32)
    v, x, g = torch.ones(4), torch.ones(5, 4), torch.ones(5, 3)
    return {
        "index dtype": ("spmm_add_", (torch.zeros(5, 3), x, v, idx.float(), ptr),
                        "spmm_add_: flat_indices.dtype=torch.float32; allowed: torch.int32, torch.int64"),
        "index dims": ("sddmm", (g, x, idx.view(2, 2), ptr), "sddmm: flat_indices.shape=(2, 2); must be 1-D"),
        "row_ptr dtype": ("spmm_t_add_", (torch.zeros(5, 4), g, v, idx, ptr.long()),
                          "spmm_t_add_: row_ptr.dtype=torch.int64 must equal flat_indices.dtype=torch.int32"),
        "row_ptr empty": ("spmm_add_", (torch.zeros(5, 3), x, v, idx, ptr[:0]),
                          "spmm_add_: row_ptr.shape=(0,); must be 1-D with m + 1 >= 1 entries (m: the rows of S)"),
        "out dims": ("spmm_add_", (torch.zeros(15), x, v, idx, ptr),
                     "spmm_add_: out.shape=(15,); must be 2-D (tokens x features)"),
        "input dtype": ("spmm_add_", (torch.zeros(5, 3), x.int(), v, idx, ptr),
                        "spmm_add_: input.dtype=torch.int32; allowed: torch.float32, torch.float64, torch.bfloat16, "
                        "torch.float16"),
        "values dtype": ("spmm_add_", (torch.zeros(5, 3), x, v.double(), idx, ptr),
                         "spmm_add_: values.dtype=torch.float64 must equal out.dtype=torch.float32"),
        "grad dtype": ("spmm_t_add_", (torch.zeros(5, 4), g.double(), v, idx, ptr),
                       "spmm_t_add_: grad.dtype=torch.float64 must equal out.dtype=torch.float32"),
        "sddmm dtype": ("sddmm", (g, x.bfloat16(), idx, ptr),
                        "sddmm: input.dtype=torch.bfloat16 must equal grad.dtype=torch.float32"),
        "values length": ("spmm_add_", (torch.zeros(5, 3), x, v[:3], idx, ptr),
                          "spmm_add_: values.shape=(3,) must equal flat_indices.shape=(4,)"),
        "tokens": ("spmm_add_", (torch.zeros(4, 3), x, v, idx, ptr),
                   "spmm_add_: out.shape=(4, 3) and input.shape=(5, 4) must have the same number of rows (tokens)"),
        "rows of S": ("spmm_add_", (torch.zeros(5, 2), x, v, idx, ptr),
                      "spmm_add_: out.shape[1]=2 must equal row_ptr.numel() - 1 = 3 (the rows of S)"),
        "rows of S (t)": ("spmm_t_add_", (torch.zeros(5, 4), torch.ones(5, 2), v, idx, ptr),
                          "spmm_t_add_: grad.shape[1]=2 must equal row_ptr.numel() - 1 = 3 (the rows of S)"),
        "rows of S (sddmm)": ("sddmm", (torch.ones(5, 2), x, idx, ptr),
                              "sddmm: grad.shape[1]=2 must equal row_ptr.numel() - 1 = 3 (the rows of S)"),
        "sddmm tokens": ("sddmm", (g, torch.ones(4, 4), idx, ptr),
                         "sddmm: grad.shape=(5, 3) and input.shape=(4, 4) must have the same number of rows (tokens)"),
        "alias": ("spmm_add_", (x[:, :3], x, v, idx, ptr), "spmm_add_: out shares memory with input; out must be a "
                  "separate tensor"),
        "out of range": ("spmm_add_", (torch.zeros(5, 3), x, v, torch.tensor([1, 5, 6, 12], dtype=torch.int32), ptr),
                         "spmm_add_: flat_indices[3]=12 is out of range for S of shape (3, 4) (12 elements); allowed: "
                         "0 <= index < 12"),
        "negative": ("sddmm", (g, x, torch.tensor([-1, 5, 6, 11], dtype=torch.int32), ptr),
                     "sddmm: flat_indices[0]=-1 is out of range for S of shape (3, 4) (12 elements)"),
        "row_ptr wrong": ("spmm_t_add_", (torch.zeros(5, 4), g, v, idx, torch.tensor([0, 2, 3, 4], dtype=torch.int32)),
                          "spmm_t_add_: row_ptr[1]=2, but the support has 1 entries in rows < 1; row_ptr must be "
                          "sparse_row_pointers(flat_indices, 3, 4)"),
        "row_ptr wrong (unsorted)": ("spmm_add_", (torch.zeros(5, 3), x, v, idx.flip(0), torch.tensor([0, 1, 2, 4],
                                     dtype=torch.int32)),
                                     "spmm_add_: row_ptr[2]=2, but the support has 3 entries in rows < 2"),
    }


_DEFAULTS = {"spmm_add_": _spmm_add_default, "spmm_t_add_": _spmm_t_add_default, "sddmm": _sddmm_default}


@pytest.mark.parametrize("case", sorted(_bad_args()))
def test_bad_arguments_raise_the_same_clear_error_from_every_kernel(case: str) -> None:
    op, args, expected = _bad_args()[case]
    default = _message(lambda: _DEFAULTS[op](*args))
    assert expected in default[1], default
    assert default[0] in (TypeError, ValueError, IndexError)
    if "out of range" in case or case == "negative":
        assert default[0] is IndexError
    if kernels_available("cpu") and torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_optim::{op}", "CPU"):
        assert _message(lambda: getattr(OPS, op)(*args)) == default
    public = {"spmm_add_": spmm_add_, "spmm_t_add_": spmm_t_add_, "sddmm": sddmm}[op]
    assert _message(lambda: public(*args)) == default


def test_a_failed_check_writes_nothing() -> None:
    out = torch.zeros(5, 3)
    bad = torch.tensor([1, 5, 6, 12], dtype=torch.int32)
    for call in (OPS.spmm_add_, _spmm_add_default):
        with pytest.raises(IndexError):
            call(out, torch.ones(5, 4), torch.ones(4), bad, torch.tensor([0, 1, 3, 4], dtype=torch.int32))
        assert torch.count_nonzero(out) == 0


def test_sparse_row_pointers() -> None:
    indices = torch.tensor([1, 5, 6, 11], dtype=torch.int64)
    row_ptr = sparse_row_pointers(indices, 3, 4)
    assert row_ptr.dtype == torch.int64 and row_ptr.tolist() == [0, 1, 3, 4]
    assert sparse_row_pointers(indices.flip(0), 3, 4).tolist() == [0, 1, 3, 4]  # any order: counts
    assert sparse_row_pointers(indices[:0], 3, 4).tolist() == [0, 0, 0, 0]
    with pytest.raises(IndexError, match=r"sparse_row_pointers: flat_indices\[3\]=11 is out of range for S of shape "
                                         r"\(2, 4\) \(8 elements\); allowed: 0 <= index < 8"):
        sparse_row_pointers(indices, 2, 4)
    with pytest.raises(TypeError, match=r"flat_indices.dtype=torch.float32; allowed: torch.int32, torch.int64"):
        sparse_row_pointers(indices.float(), 3, 4)
    with pytest.raises(ValueError, match=r"flat_indices.shape=\(2, 2\); must be 1-D"):
        sparse_row_pointers(indices.view(2, 2), 3, 4)
    with pytest.raises(ValueError, match=r"sparse_row_pointers: in_features=0; allowed: an int >= 1"):
        sparse_row_pointers(indices, 3, 0)


def spmm_op_samples(device: str) -> list[tuple[Any, tuple]]:
    samples: list[tuple[Any, tuple]] = []
    m, n, tokens = 6, 7, 5
    for index_dtype in INDEX_DTYPES:
        indices = _support(m, n, 0.3, index_dtype, device)
        row_ptr = sparse_row_pointers(indices, m, n)
        for dtype in (torch.float32, torch.bfloat16):
            values = _randn(indices.numel(), dtype=dtype, device=device, seed=1)
            x = _randn(tokens, n, dtype=dtype, device=device, seed=2)
            g = _randn(tokens, m, dtype=dtype, device=device, seed=3)
            for check in (True, False):
                samples += [
                    (OPS.spmm_add_.default, (torch.zeros(tokens, m, dtype=dtype, device=device), x, values, indices,
                                             row_ptr, check)),
                    (OPS.spmm_t_add_.default, (torch.zeros(tokens, n, dtype=dtype, device=device), g, values, indices,
                                               row_ptr, check)),
                    (OPS.sddmm.default, (g, x, indices, row_ptr, check)),
                ]
        samples.append((OPS.sddmm.default, (g.t().contiguous().t(), x, indices, row_ptr)))
    return samples


# opcheck of these samples, with and without compiled code: tests/test_kernels.py (one table for every op).


# ---- the layer ---------------------------------------------------------------------------------------


def _trained_layer(in_features: int = 40, out_features: int = 28, rank: int = 6, **kwargs: Any) -> SLTrainLinear:
    """A layer whose B is non-zero, as after some training (a fresh layer has B = 0)."""
    layer = SLTrainLinear(in_features, out_features, rank=rank, seed=3, **kwargs)
    with torch.no_grad():
        layer.B.copy_(torch.randn(layer.B.shape, generator=torch.Generator().manual_seed(4)))
    return layer


def _reference_output(layer: SLTrainLinear, x: Tensor) -> Tensor:
    """fp64 y = x Wᵀ + bias with the dense W composed from the layer's parameters (differentiable)."""
    B, A, values = layer.B.double(), layer.A.double(), layer.values.double()
    scale = layer.scale.double() if isinstance(layer.scale, Tensor) else layer.scale
    sparse = torch.zeros(layer.out_features * layer.in_features, dtype=torch.float64)
    sparse = sparse.index_add(0, layer.indices.long(), values).view(layer.out_features, layer.in_features)
    bias = layer.bias.double() if layer.bias is not None else None
    return nn.functional.linear(x.double(), scale * (B @ A) + sparse, bias)


@pytest.mark.parametrize("path", ["dense", "factored"])
@pytest.mark.parametrize("trainable_scale", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_both_paths_match_the_fp64_dense_reference(path: str, trainable_scale: bool, bias: bool) -> None:
    layer = _trained_layer(bias=bias, trainable_scale=trainable_scale, delta=0.1, path=path)
    x = torch.randn(3, 70, 40, generator=torch.Generator().manual_seed(5), requires_grad=True)
    grad_out = torch.randn(3, 70, 28, generator=torch.Generator().manual_seed(6))
    params = [x, *layer.parameters()]
    output = layer(x)
    grads = torch.autograd.grad(output, params, grad_out)
    reference = _reference_output(layer, x)
    expected = torch.autograd.grad(reference, params, grad_out.double())
    assert output.dtype == torch.float32 and output.shape == (3, 70, 28)
    torch.testing.assert_close(output.double(), reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        assert got.dtype == torch.float32
        # want: computed in fp64, rounded once to the parameter's dtype by autograd (far below 1e-5).
        # Gradients of the parameters sum over 210 tokens: their scale is that of the sum's terms.
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_paths_agree_to_fp32_rounding() -> None:
    layer = _trained_layer(bias=True, trainable_scale=True)
    x = torch.randn(130, 40, generator=torch.Generator().manual_seed(7), requires_grad=True)
    results = {}
    for path in ("dense", "factored"):
        layer.path = path
        output = layer(x)
        results[path] = [output, *torch.autograd.grad(output.square().sum(), [x, *layer.parameters()])]
    for dense, factored in zip(results["dense"], results["factored"]):
        torch.testing.assert_close(factored, dense, rtol=1e-5, atol=1e-5 * float(dense.detach().abs().max()))


@pytest.mark.parametrize("path", ["dense", "factored"])
@pytest.mark.parametrize("trainable_scale", [False, True])
def test_gradcheck_fp64(path: str, trainable_scale: bool) -> None:
    layer = _trained_layer(9, 7, 2, delta=0.3, bias=True, trainable_scale=trainable_scale, dtype=torch.float64,
                           path=path)
    names = [name for name, _ in layer.named_parameters()]
    inputs = [torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)]
    inputs += [param.detach().clone().requires_grad_() for param in layer.parameters()]

    def function(x: Tensor, *params: Tensor) -> Tensor:
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(function, tuple(inputs))


def test_factored_function_gradcheck_with_a_float_scale() -> None:
    layer = _trained_layer(9, 7, 2, delta=0.3, dtype=torch.float64)
    row_ptr = sparse_row_pointers(layer.indices, 7, 9)
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    B, A, values = (t.detach().clone().requires_grad_() for t in (layer.B, layer.A, layer.values))
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def function(x: Tensor, B: Tensor, A: Tensor, values: Tensor, bias: Tensor) -> Tensor:
        return _FactoredSparsePlusLowRankLinear.apply(x, B, A, values, layer.indices, row_ptr, 0.25, bias)

    assert torch.autograd.gradcheck(function, (x, B, A, values, bias))


def test_factored_path_computes_only_the_requested_gradients() -> None:
    layer = _trained_layer(path="factored")
    layer.A.requires_grad_(False)
    layer.values.requires_grad_(False)
    x = torch.randn(5, 40)
    layer(x).sum().backward()
    assert layer.A.grad is None and layer.values.grad is None
    assert layer.B.grad is not None and torch.count_nonzero(layer.B.grad) > 0


def test_path_is_validated_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"path='sparse'; allowed: 'auto', 'dense', 'factored'"):
        SLTrainLinear(8, 6, rank=2, seed=0, path="sparse")
    layer = SLTrainLinear(8, 6, rank=2, seed=0)
    assert layer.path == "auto" and "path='auto'" in repr(layer)
    with pytest.raises(ValueError, match=r"path=None; allowed: 'auto', 'dense', 'factored'"):
        layer.path = None  # type: ignore[assignment]
    assert layer.path == "auto"
    assert PATHS == ("auto", "dense", "factored")


def test_convert_to_sltrain_sets_the_path() -> None:
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 16))
    with pytest.raises(ValueError, match=r"path='fast'; allowed: 'auto', 'dense', 'factored'"):
        convert_to_sltrain(model, rank=2, target_modules=["0", "2"], path="fast")
    assert all(isinstance(module, nn.Linear) for module in (model[0], model[2]))  # refused before any change
    convert_to_sltrain(model, rank=2, target_modules=["0", "2"], path="factored")
    assert [module.path for module in model.modules() if isinstance(module, SLTrainLinear)] == ["factored"] * 2
    dense = SLTrainLinear.from_linear(nn.Linear(16, 12), rank=2, seed=0, path="dense")
    assert dense.path == "dense"


def test_path_costs_follow_the_documented_formula() -> None:
    m, n, r, nnz, t, kappa = 5461, 2048, 512, 335_523, 256, 4.0
    dense, factored = path_costs(t, n, m, r, nnz, sparse_flop_cost=kappa)
    assert dense == 4 * m * n * r + 3 * t * m * n
    assert factored == t * (r * (3 * m + 4 * n) + 3 * kappa * nnz)


def test_auto_path_follows_the_cost_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # rank 48 of 64 x 64: factored wins only below T* = 4·m·n·r / (r·(3m + 4n) + 3·kappa·nnz − 3·m·n).
    layer = SLTrainLinear(64, 64, rank=48, delta=0.03, seed=0)
    m = n = 64
    kappa = 2.0
    crossover = 4 * m * n * 48 / (48 * (3 * m + 4 * n) + 3 * kappa * layer.values.numel() - 3 * m * n)
    monkeypatch.setattr(sltrain_module, "SPARSE_FLOP_COST", {})
    assert layer.path_for(1, backward=True) == "dense"  # no measured kappa: dense
    monkeypatch.setattr(sltrain_module, "SPARSE_FLOP_COST", {("cpu", torch.float32): kappa})
    monkeypatch.setattr(sltrain_module, "_has_compiled_sparse_kernels", lambda device: True)
    assert layer.path_for(int(crossover) - 1, backward=True) == "factored"
    assert layer.path_for(int(crossover) + 1, backward=True) == "dense"
    assert layer.path_for(1, backward=True, dtype=torch.float64) == "dense"  # no kappa for fp64
    assert layer.path_for(1, backward=False) == "dense"  # evaluation: what merge_sltrain's export computes
    monkeypatch.setattr(sltrain_module, "_has_compiled_sparse_kernels", lambda device: False)
    assert layer.path_for(1, backward=True) == "dense"  # the default kernels are never chosen by auto
    layer.path = "factored"
    assert layer.path_for(10**9, backward=True) == "factored"


def test_forward_runs_the_path_that_path_for_names(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    factored_apply = _FactoredSparsePlusLowRankLinear.apply
    dense_apply = sltrain_module._SparsePlusLowRankLinear.apply
    monkeypatch.setattr(_FactoredSparsePlusLowRankLinear, "apply", lambda *a: calls.append("factored") or factored_apply(*a))
    monkeypatch.setattr(sltrain_module._SparsePlusLowRankLinear, "apply", lambda *a: calls.append("dense") or dense_apply(*a))
    layer = _trained_layer()
    x = torch.randn(4, 40)
    for path in ("dense", "factored"):
        layer.path = path
        layer(x)
    monkeypatch.setattr(sltrain_module, "SPARSE_FLOP_COST", {("cpu", torch.float32): 1.0})
    monkeypatch.setattr(sltrain_module, "_has_compiled_sparse_kernels", lambda device: True)
    layer.path = "auto"
    layer(x)  # 4 tokens: the composition of W dominates the dense cost
    assert calls == ["dense", "factored", "factored"]
    with torch.no_grad():
        layer(x)  # no gradient: auto runs the dense path
    x.requires_grad_(False)
    for param in layer.parameters():
        param.requires_grad_(False)
    layer(x)  # nothing requires a gradient: no backward follows either
    assert calls == ["dense", "factored", "factored", "dense", "dense"]


class _Allocations(TorchDispatchMode):
    """The largest number of elements of any tensor an ATen op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        output = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(output):
            if isinstance(leaf, Tensor):
                self.largest = max(self.largest, leaf.numel())
        return output


def test_factored_path_never_forms_an_out_by_in_matrix() -> None:
    """Forward and backward of the factored path allocate nothing of out·in elements; the dense path does
    (the control that shows the probe sees such a matrix)."""
    layer = _trained_layer(96, 80, 4, bias=True, trainable_scale=True)
    x = torch.randn(8, 96, requires_grad=True)  # 8 tokens: every activation is far below 80 x 96
    largest = {}
    for path in ("dense", "factored"):
        layer.path = path
        with _Allocations() as probe:
            layer(x).sum().backward()
        largest[path] = probe.largest
    assert largest["dense"] >= 80 * 96
    assert largest["factored"] < 80 * 96 // 4


def test_factored_path_saves_x_and_the_factors_only() -> None:
    layer = _trained_layer(96, 80, 4, bias=True, path="factored")
    x = torch.randn(2, 8, 96, requires_grad=True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        layer(x)
    nnz = layer.values.numel()
    assert sorted(saved) == sorted([(2, 8, 96), (80, 4), (4, 96), (nnz,), (nnz,), (81,)])


def test_row_pointer_follows_a_changed_support() -> None:
    layer = _trained_layer(path="factored")
    x = torch.randn(6, 40)
    layer(x)
    first = layer._row_ptr
    assert first is not None
    with torch.no_grad():
        new = sltrain_module.sample_support(28, 40, 0.03, torch.Generator().manual_seed(99))
        layer.indices.copy_(new)  # in place: its version counter moves
    torch.testing.assert_close(layer(x).double(), _reference_output(layer, x), rtol=1e-5, atol=1e-5)
    assert layer._row_ptr is not first
    assert torch.equal(layer._row_ptr, sparse_row_pointers(new.to(torch.int32), 28, 40))


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_autocast_bf16_on_cpu(path: str) -> None:
    layer = _trained_layer(bias=True, trainable_scale=True, delta=0.1, path=path)
    x = torch.randn(70, 40, generator=torch.Generator().manual_seed(8), requires_grad=True)
    params = [x, *layer.parameters()]
    expected_out = layer(x)
    expected = torch.autograd.grad(expected_out.square().sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(x)
        assert output.dtype == torch.bfloat16
        grads = torch.autograd.grad(output.float().square().sum(), params)  # backward inside autocast, too
    for got, want in zip([output, *grads], [expected_out, *expected]):
        assert got.shape == want.shape
        assert got.dtype == (torch.bfloat16 if got is output else torch.float32)
        # bf16 operands (8 bits of mantissa): a few parts in a thousand of the tensor's norm.
        error = (got.float() - want).norm() / want.norm()
        assert error < 2e-2, float(error)
        assert error > 0  # it did run in bf16


def test_autocast_leaves_fp64_alone() -> None:
    layer = _trained_layer(dtype=torch.float64, path="factored")
    x = torch.randn(3, 40, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(x)
    assert output.dtype == torch.float64
    torch.testing.assert_close(output, _reference_output(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_mixed_dtypes_without_autocast_raise_a_clear_error(path: str) -> None:
    layer = _trained_layer(path=path)
    message = (r"SLTrainLinear: input dtype torch.bfloat16 differs from the parameters' dtype torch.float32; cast the "
               r"input \(or the layer\), or run it under torch.autocast")
    with pytest.raises(TypeError, match=message):
        layer(torch.randn(3, 40, dtype=torch.bfloat16))
