"""Blockwise 8-bit quantization ops (lowrank_optim/ops/quant.py): the code maps, the quantization rules,
the 8-bit Adam update, and the compiled kernels against the defaults.

Tolerances:

- the defaults against the plain references written here: bitwise (codes, absmax, dequantized values and
  ``N``). The references compute the same fp32 operations (the moment update with the same ATen ops as
  ``update_moments_``, whose fused multiply-adds are ATen's), through other code paths (padding instead of
  views, indexing instead of ``index_select``).
- the CPU kernels against the defaults: codes and absmaxes bitwise, so the dequantized moments too; ``N``
  within 2 ulp (ATen's vectorized ``sqrt`` is not correctly rounded, the kernel's is).
- the round trip: within half the map's largest gap times the block's absmax (plus 2 ulp of rounding).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
from devices import DEVICES
from torch import Tensor

from lowrank_optim.ops import kernel_load_error, kernels_available
from lowrank_optim.ops.quant import (
    MAX_BLOCK_SIZE,
    _dequantize_default,
    absmax_shape,
    blockwise_adam_,
    dequantize_blockwise,
    quantize_blockwise_,
    signed_code_map,
    unsigned_code_map,
)

OPS = torch.ops.lowrank_optim
MAPS = {"signed": signed_code_map, "unsigned": unsigned_code_map}
# (shape, block_size): 1-D, ragged last block, B = 1, B > n, 3-D, the largest B, an empty tensor.
BLOCK_CASES = [((7,), 4), ((1000,), 256), ((3, 300), 128), ((5, 17), 1), ((4, 10), 64), ((2, 3, 65), 16),
               ((2, 4096), MAX_BLOCK_SIZE), ((3, 0), 8), ((0, 5), 2)]


def _require_kernels(device: str) -> None:
    if not kernels_available(device):
        pytest.skip(f"no compiled kernels for {device}: {kernel_load_error(device)}")


def _randn(*shape: int, seed: int, device: str = "cpu") -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _case_id(case: tuple[tuple[int, ...], int]) -> str:
    return f"{'x'.join(map(str, case[0]))}-B{case[1]}"


def _equal(actual: Tensor, expected: Tensor) -> None:
    """Bitwise (NaN equal to NaN)."""
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0, equal_nan=True)


# ---- plain references: the formulas of ops/quant.py's docstring, written independently -------------


def _reference_quantize(x: Tensor, code_map: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    n = x.shape[-1]
    blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(x, (0, blocks * block_size - n))  # zeros change no maximum
    grouped = padded.reshape(*x.shape[:-1], blocks, block_size)
    absmax = grouped.abs().amax(dim=-1)
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = (grouped / divisor.unsqueeze(-1)).reshape(*x.shape[:-1], blocks * block_size)[..., :n].contiguous()
    thresholds = (code_map[:-1] + code_map[1:]) * 0.5
    codes = torch.searchsorted(thresholds, normalized, right=False)
    codes = torch.where(normalized.isnan(), code_map.numel() - 1, codes)
    return codes.to(torch.uint8), absmax


def _reference_dequantize(codes: Tensor, absmax: Tensor, code_map: Tensor, block_size: int) -> Tensor:
    n = codes.shape[-1]
    return code_map[codes.long()] * absmax.repeat_interleave(block_size, dim=-1)[..., :n]


def _reference_adam(
    lowrank: Tensor, state: tuple[Tensor, ...], beta1: float, beta2: float, eps: float, block_size: int
) -> tuple[Tensor, ...]:
    """``(codes_M, absmax_M, codes_V, absmax_V, N)`` after one step."""
    m = _reference_dequantize(state[0], state[1], signed_code_map(lowrank.device), block_size)
    v = _reference_dequantize(state[2], state[3], unsigned_code_map(lowrank.device), block_size)
    m = m.mul(beta1).add(lowrank, alpha=1.0 - beta1)
    v = v.mul(beta2).addcmul(lowrank, lowrank, value=1.0 - beta2)
    normalized = m / (v.sqrt() + eps)
    return (*_reference_quantize(m, signed_code_map(lowrank.device), block_size),
            *_reference_quantize(v, unsigned_code_map(lowrank.device), block_size), normalized)


# ---- the maps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MAPS)
def test_code_maps(kind: str) -> None:
    code_map = MAPS[kind]()
    assert code_map.dtype == torch.float32 and code_map.dim() == 1
    assert code_map.numel() == (255 if kind == "signed" else 256)
    assert bool((code_map[1:] > code_map[:-1]).all()), "sorted, no duplicates"
    assert code_map[-1].item() == 1.0
    nonzero = code_map[code_map != 0]
    smallest = torch.tensor(1e-6 if kind == "signed" else 1e-7, dtype=torch.float32)
    assert nonzero.numel() == code_map.numel() - 1
    assert torch.equal(nonzero.abs().min(), smallest)
    if kind == "signed":
        assert code_map[0].item() == -1.0 and code_map[127].item() == 0.0
        assert torch.equal(code_map, -code_map.flip(0)), "symmetric"
    else:
        assert code_map[0].item() == 0.0
    # Each decade has half the codes of the one above it: 64 (signed) / 128 (unsigned) in [0.1, 1].
    assert int(((code_map > 0.1) & (code_map <= 1.0)).sum()) == (64 if kind == "signed" else 128)
    # fp64 computed, then rounded once.
    top = 1 + (6 if kind == "signed" else 7)
    exact = sorted(10.0**-j * (0.1 + 0.9 * (i + 1) / 2 ** (top - 1 - j)) for j in range(top) for i in range(2 ** (top - 1 - j)))
    assert torch.equal(code_map[code_map > 0], torch.tensor(exact, dtype=torch.float64).float())
    assert MAPS[kind]() is code_map and MAPS[kind]("cpu") is code_map, "cached per device"


def test_absmax_shape() -> None:
    assert absmax_shape((3, 300), 128) == (3, 3)
    assert absmax_shape((7,), 7) == (1,)
    assert absmax_shape((2, 3, 65), 16) == (2, 3, 5)
    assert absmax_shape((4, 0), 8) == (4, 0)


# ---- quantize / dequantize ---------------------------------------------------------------------------


def _quantize(x: Tensor, code_map: Tensor, block_size: int, fused: bool) -> tuple[Tensor, Tensor]:
    codes = torch.full(x.shape, 77, dtype=torch.uint8, device=x.device)
    absmax = torch.full(absmax_shape(x.shape, block_size), -1.0, device=x.device)
    return quantize_blockwise_(x, code_map, block_size, codes, absmax, fused=fused)


def _values(shape: tuple[int, ...], seed: int, device: str = "cpu") -> Tensor:
    """Normal values over several decades, with an exact zero, an all-zero block's worth of zeros."""
    x = _randn(*shape, seed=seed, device=device) * torch.exp(3 * _randn(*shape, seed=seed + 1, device=device))
    flat = x.view(-1)
    if flat.numel() > 20:
        flat[3] = 0.0
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=_case_id)
@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("fused", [False, True])
def test_quantize_matches_reference(device: str, case: tuple[tuple[int, ...], int], kind: str, fused: bool) -> None:
    shape, block_size = case
    code_map = MAPS[kind](device)
    x = _values(shape, seed=1, device=device)
    if kind == "unsigned":
        x = x.abs()
    codes, absmax = _quantize(x, code_map, block_size, fused)
    expected_codes, expected_absmax = _reference_quantize(x, code_map, block_size)
    _equal(codes, expected_codes)
    _equal(absmax, expected_absmax)
    _equal(dequantize_blockwise(codes, absmax, code_map, block_size, fused=fused),
           _reference_dequantize(codes, absmax, code_map, block_size))
    out = torch.full(shape, math.nan, device=device)
    assert dequantize_blockwise(codes, absmax, code_map, block_size, out=out, fused=fused) is out
    _equal(out, _reference_dequantize(codes, absmax, code_map, block_size))


@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("fused", [False, True])
def test_round_trip_error_bound(kind: str, fused: bool) -> None:
    """|x - deq(q(x))| <= absmax · (half the map's largest gap), and <= absmax · (half the gap of the top
    decade) where |x / absmax| >= 0.1; zeros and all-zero blocks come back exactly."""
    code_map = MAPS[kind]()
    block_size = 64
    x = _values((33, 1000), seed=2)
    x[5, 128:192] = 0.0  # an all-zero block
    if kind == "unsigned":
        x = x.abs()
    codes, absmax = _quantize(x, code_map, block_size, fused)
    y = dequantize_blockwise(codes, absmax, code_map, block_size, fused=fused)
    per_element = absmax.repeat_interleave(block_size, dim=-1)[..., : x.shape[-1]]
    slack = per_element * 2**-22  # the division and the product round
    half_gap = (code_map[1:] - code_map[:-1]).max() / 2
    error = (x - y).abs()
    assert bool((error <= per_element * half_gap + slack).all())
    top_half_gap = 0.9 / 128 if kind == "signed" else 0.9 / 256
    top = x.abs() >= 0.1 * per_element
    assert bool((error[top] <= per_element[top] * top_half_gap + slack[top]).all())
    assert bool((y[x == 0] == 0).all()) and int((x == 0).sum()) >= 65
    assert absmax[5, 2].item() == 0.0


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_values(fused: bool) -> None:
    """A NaN makes its block's absmax NaN (and its code the last), so the whole block dequantizes to NaN;
    other blocks are untouched. An Inf makes absmax Inf."""
    code_map = signed_code_map()
    x = _randn(2, 40, seed=3)
    x[0, 5] = math.nan
    x[1, 25] = math.inf
    codes, absmax = _quantize(x, code_map, 16, fused)
    assert math.isnan(absmax[0, 0].item()) and math.isinf(absmax[1, 1].item())
    assert codes[0, 5].item() == code_map.numel() - 1
    y = dequantize_blockwise(codes, absmax, code_map, 16, fused=fused)
    assert bool(y[0, :16].isnan().all()) and not bool(y[0, 16:].isnan().any())
    assert not bool(y[1, :16].isnan().any()) and not bool(y[1, 32:].isnan().any())
    _equal(codes, _reference_quantize(x, code_map, 16)[0])


def test_code_past_the_map_dequantizes_to_nan() -> None:
    code_map = signed_code_map()  # 255 values: code 255 has none
    codes = torch.tensor([[127, 254, 255, 0]], dtype=torch.uint8)
    for fused in (False, True):
        y = dequantize_blockwise(codes, torch.tensor([[2.0]]), code_map, 4, fused=fused)
        _equal(y, torch.tensor([[0.0, 2.0, math.nan, -2.0]]))


# ---- blockwise_adam_ ---------------------------------------------------------------------------------

ADAM_CASES = [((7,), 4), ((1000,), 256), ((3, 300), 128), ((5, 17), 1), ((4, 10), 64), ((2, 3, 65), 16),
              ((2, 5000), MAX_BLOCK_SIZE), ((3, 0), 8)]
BETAS = [(0.9, 0.999, 1e-8), (0.5, 0.75, 1e-3)]


def _adam_state(shape: tuple[int, ...], block_size: int, device: str = "cpu") -> list[Tensor]:
    """Quantized moments of a plausible size: M ~ 1e-2 N(0, 1), V ~ (1e-2 N(0, 1))², over decades."""
    m = 1e-2 * _values(shape, seed=10, device=device)
    v = (1e-2 * _values(shape, seed=11, device=device)).square()
    return [*_quantize(m, signed_code_map(device), block_size, False),
            *_quantize(v, unsigned_code_map(device), block_size, False)]


def _adam_step(lowrank: Tensor, state: list[Tensor], betas: tuple[float, float, float], block_size: int,
               skip: Tensor | None = None, fused: bool = True) -> Tensor:
    normalized = torch.full_like(lowrank, math.nan)
    device = lowrank.device
    return blockwise_adam_(lowrank, state[0], state[1], state[2], state[3], normalized, signed_code_map(device),
                           unsigned_code_map(device), *betas, block_size, skip, fused=fused)


@pytest.mark.parametrize("case", ADAM_CASES, ids=_case_id)
@pytest.mark.parametrize("betas", BETAS, ids=["default-betas", "small-betas"])
def test_blockwise_adam_default_matches_reference(case: tuple[tuple[int, ...], int], betas: tuple[float, ...]) -> None:
    shape, block_size = case
    state = _adam_state(shape, block_size)
    expected = [t.clone() for t in state]
    for step in range(3):  # the state feeds back
        lowrank = 1e-2 * _randn(*shape, seed=20 + step)
        normalized = _adam_step(lowrank, state, betas, block_size, fused=False)
        *expected, expected_normalized = _reference_adam(lowrank, tuple(expected), *betas, block_size)
        for actual, wanted in zip(state, expected):
            _equal(actual, wanted)
        _equal(normalized, expected_normalized)


@pytest.mark.parametrize("fused", [False, True])
def test_blockwise_adam_skip(fused: bool) -> None:
    """skip=True keeps codes and absmaxes bitwise (a NaN gradient included) and makes N zero; skip=False is
    the unskipped step."""
    shape, block_size, betas = (6, 100), 32, BETAS[0]
    state = _adam_state(shape, block_size)
    state[1][2, 1] = math.nan  # a NaN block stays as it is (requantizing it would change its codes)
    before = [t.clone() for t in state]
    lowrank = _randn(*shape, seed=30)
    lowrank[0, 0] = math.nan
    normalized = _adam_step(lowrank, state, betas, block_size, torch.tensor(True), fused=fused)
    for actual, wanted in zip(state, before):
        _equal(actual, wanted)
    assert torch.equal(normalized, torch.zeros(shape))
    lowrank[0, 0] = 0.5
    unskipped = [t.clone() for t in state]
    expected = _adam_step(lowrank, unskipped, betas, block_size, fused=fused)
    _equal(_adam_step(lowrank, state, betas, block_size, torch.tensor(False), fused=fused), expected)
    for actual, wanted in zip(state, unskipped):
        _equal(actual, wanted)


def test_blockwise_adam_tracks_fp32_adam() -> None:
    """From zero moments (the optimizer's start), 8-bit moments stay close to fp32 ones over 30 steps: a
    sanity check of the design, not of the rounding. Relative to the largest |N|: every element within
    10 % (measured: 8.5 % at worst, at step 2), the median within 1 % (measured: 0.5 %)."""
    shape, block_size, (beta1, beta2, eps) = (16, 256), 64, BETAS[0]
    blocks = absmax_shape(shape, block_size)
    state = [torch.zeros(shape, dtype=torch.uint8), torch.zeros(blocks), torch.zeros(shape, dtype=torch.uint8),
             torch.zeros(blocks)]
    m, v = torch.zeros(shape), torch.zeros(shape)
    for step in range(30):
        lowrank = _randn(*shape, seed=40 + step) * (1 + step % 3)
        normalized = _adam_step(lowrank, state, (beta1, beta2, eps), block_size)
        m.mul_(beta1).add_(lowrank, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(lowrank, lowrank, value=1 - beta2)
        exact = m / (v.sqrt() + eps)
        error = (normalized - exact).abs() / exact.abs().max()
        assert error.max().item() <= 0.1 and error.median().item() <= 0.01, step


# ---- compiled kernels --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ADAM_CASES, ids=_case_id)
@pytest.mark.parametrize("betas", BETAS, ids=["default-betas", "small-betas"])
@pytest.mark.parametrize("skip", [None, False, True])
def test_blockwise_adam_kernel_matches_default(
    device: str, case: tuple[tuple[int, ...], int], betas: tuple[float, ...], skip: bool | None
) -> None:
    """CPU: codes and absmaxes bitwise (so the dequantized moments too), N within 2 ulp (sqrt), over three
    steps whose state feeds back. CUDA (where ATen's own kernels run the default, whose multiply-add fusion
    is the compiler's): each step from the same state, absmax and N within 4 ulp, codes within one. The last
    step has a NaN and an Inf in R (unskipped: their blocks' moments become NaN, as in the default)."""
    _require_kernels(device)
    shape, block_size = case
    state = _adam_state(shape, block_size, device)
    expected = [t.clone() for t in state]
    flag = None if skip is None else torch.tensor(skip, device=device)
    ulp = torch.finfo(torch.float32).eps
    for step in range(3):
        lowrank = 1e-2 * _randn(*shape, seed=50 + step, device=device)
        if step == 2 and lowrank.numel() > 40:  # non-finite gradients: NaN blocks, an Inf block
            lowrank.view(-1)[[5, 37]] = torch.tensor([math.nan, math.inf], device=device)
        if device != "cpu":
            expected = [t.clone() for t in state]
        normalized = _adam_step(lowrank, state, betas, block_size, flag, fused=True)
        expected_normalized = _adam_step(lowrank, expected, betas, block_size, flag, fused=False)
        if device == "cpu":
            for actual, wanted in zip(state, expected):
                _equal(actual, wanted)
            _equal(dequantize_blockwise(state[0], state[1], signed_code_map(device), block_size),
                   _dequantize_default(expected[0], expected[1], signed_code_map(device), block_size))
        else:
            for codes, wanted in ((state[0], expected[0]), (state[2], expected[2])):
                assert codes.numel() == 0 or (codes.int() - wanted.int()).abs().max().item() <= 1
            for absmax, wanted in ((state[1], expected[1]), (state[3], expected[3])):
                torch.testing.assert_close(absmax, wanted, rtol=4 * ulp, atol=0.0, equal_nan=True)
        rtol = (2 if device == "cpu" else 4) * ulp
        torch.testing.assert_close(normalized, expected_normalized, rtol=rtol, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=_case_id)
@pytest.mark.parametrize("kind", MAPS)
def test_quantize_kernels_match_default(device: str, case: tuple[tuple[int, ...], int], kind: str) -> None:
    """Bitwise, non-finite values included."""
    _require_kernels(device)
    shape, block_size = case
    code_map = MAPS[kind](device)
    x = _values(shape, seed=60, device=device)
    flat = x.view(-1)
    if flat.numel() > 40:
        flat[7], flat[30] = math.nan, -math.inf
    expected = _quantize(x, code_map, block_size, False)
    actual = _quantize(x, code_map, block_size, True)
    for one, two in zip(actual, expected):
        _equal(one, two)
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(61)).to(device)
    _equal(OPS.dequantize_blockwise(codes, actual[1], code_map, block_size),
           _dequantize_default(codes, actual[1], code_map, block_size))


def test_cpu_kernels_do_not_depend_on_thread_count() -> None:
    _require_kernels("cpu")
    shape, block_size = (300, 777), 64
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            state = _adam_state(shape, block_size)
            outputs = []
            for step in range(2):
                normalized = _adam_step(_randn(*shape, seed=70 + step), state, BETAS[0], block_size)
                outputs += [normalized, *(t.clone() for t in state)]
            outputs += list(_quantize(_values(shape, seed=72), signed_code_map(), block_size, True))
            results.append(outputs)
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        _equal(one, two)


# ---- refusals ----------------------------------------------------------------------------------------


def _quantize_args(**changes: Any) -> dict[str, Any]:
    args = dict(x=torch.zeros(4, 10), code_map=signed_code_map(), block_size=4,
                codes=torch.zeros(4, 10, dtype=torch.uint8), absmax=torch.zeros(4, 3))
    return {**args, **changes}


def _dequantize_args(**changes: Any) -> dict[str, Any]:
    args = dict(codes=torch.zeros(4, 10, dtype=torch.uint8), absmax=torch.zeros(4, 3), code_map=signed_code_map(),
                block_size=4)
    return {**args, **changes}


def _adam_args(**changes: Any) -> dict[str, Any]:
    args = dict(lowrank=torch.zeros(4, 10), exp_avg=torch.zeros(4, 10, dtype=torch.uint8), exp_avg_absmax=torch.zeros(4, 3),
                exp_avg_sq=torch.zeros(4, 10, dtype=torch.uint8), exp_avg_sq_absmax=torch.zeros(4, 3),
                normalized=torch.zeros(4, 10), signed_map=signed_code_map(), unsigned_map=unsigned_code_map(),
                beta1=0.9, beta2=0.999, eps=1e-8, block_size=4, skip=None)
    return {**args, **changes}


_Q, _D, _A = "quantize_blockwise_", "dequantize_blockwise", "blockwise_adam_"
_META = torch.zeros(4, 10, device="meta")
# (op, arguments, exception, message regex)
REFUSALS: list[tuple[str, dict[str, Any], type, str]] = [
    (_Q, _quantize_args(x=torch.zeros(4, 10, dtype=torch.float64)), TypeError,
     r"x\.dtype=torch\.float64; allowed: torch\.float32"),
    (_Q, _quantize_args(x=torch.zeros(())), ValueError, r"x\.shape=\(\); must have dim >= 1"),
    (_Q, _quantize_args(x=torch.zeros(10, 4).t()), ValueError, r"x must be contiguous"),
    (_Q, _quantize_args(codes=torch.zeros(4, 10, dtype=torch.int8)), TypeError,
     r"codes\.dtype=torch\.int8; allowed: torch\.uint8"),
    (_Q, _quantize_args(codes=torch.zeros(4, 9, dtype=torch.uint8)), ValueError, r"codes\.shape=\(4, 9\); must be \(4, 10\)"),
    (_Q, _quantize_args(codes=torch.zeros(10, 4, dtype=torch.uint8).t()), ValueError, r"codes must be contiguous"),
    (_Q, _quantize_args(absmax=torch.zeros(4, 2)), ValueError, r"absmax\.shape=\(4, 2\); must be \(4, 3\)"),
    (_Q, _quantize_args(absmax=torch.zeros(4, 3, dtype=torch.bfloat16)), TypeError, r"absmax\.dtype=torch\.bfloat16"),
    (_Q, _quantize_args(absmax=torch.zeros(4, 3, device="meta")), ValueError,
     r"absmax\.device=meta must equal the tensors' device=cpu"),
    (_Q, _quantize_args(block_size=0), ValueError, r"block_size=0; allowed: an int in \[1, 4096\]"),
    (_Q, _quantize_args(block_size=5000), ValueError, r"block_size=5000; allowed: an int in \[1, 4096\]"),
    (_Q, _quantize_args(code_map=torch.zeros(1)), ValueError, r"code_map\.shape=\(1,\); allowed: 1-D with 2\.\.256 values"),
    (_Q, _quantize_args(code_map=torch.zeros(300)), ValueError, r"code_map\.shape=\(300,\); allowed: 1-D with 2\.\.256"),
    (_Q, _quantize_args(code_map=torch.zeros(2, 4)), ValueError, r"code_map\.shape=\(2, 4\); allowed: 1-D"),
    (_Q, _quantize_args(code_map=torch.zeros(8, dtype=torch.float64)), TypeError, r"code_map\.dtype=torch\.float64"),
    (_Q, _quantize_args(code_map=torch.zeros(16)[::2]), ValueError, r"code_map must be contiguous"),
    (_Q, _quantize_args(code_map=torch.zeros(8, device="meta")), ValueError, r"code_map\.device=meta must equal"),
    (_D, _dequantize_args(codes=torch.zeros(4, 10)), TypeError, r"codes\.dtype=torch\.float32; allowed: torch\.uint8"),
    (_D, _dequantize_args(codes=torch.zeros((), dtype=torch.uint8)), ValueError, r"codes\.shape=\(\); must have dim >= 1"),
    (_D, _dequantize_args(absmax=torch.zeros(3, 3)), ValueError, r"absmax\.shape=\(3, 3\); must be \(4, 3\)"),
    (_D, _dequantize_args(absmax=torch.zeros(3, 4).t()), ValueError, r"absmax must be contiguous"),
    (_D, _dequantize_args(block_size=5000), ValueError, r"block_size=5000; allowed"),
    (_D, _dequantize_args(code_map=torch.zeros(300)), ValueError, r"code_map\.shape=\(300,\)"),
    (_A, _adam_args(lowrank=torch.zeros(4, 10, dtype=torch.bfloat16)), TypeError, r"lowrank\.dtype=torch\.bfloat16"),
    (_A, _adam_args(lowrank=torch.zeros(10, 4).t()), ValueError, r"lowrank must be contiguous"),
    (_A, _adam_args(normalized=torch.zeros(4, 11)), ValueError, r"normalized\.shape=\(4, 11\); must be \(4, 10\)"),
    (_A, _adam_args(normalized=torch.zeros(10, 4).t()), ValueError, r"normalized must be contiguous"),
    (_A, _adam_args(normalized=_META), ValueError, r"normalized\.device=meta must equal the tensors' device=cpu"),
    (_A, _adam_args(exp_avg=torch.zeros(4, 10)), TypeError, r"exp_avg\.dtype=torch\.float32; allowed: torch\.uint8"),
    (_A, _adam_args(exp_avg_sq=torch.zeros(4, 9, dtype=torch.uint8)), ValueError, r"exp_avg_sq\.shape=\(4, 9\)"),
    (_A, _adam_args(exp_avg_sq=torch.zeros(10, 4, dtype=torch.uint8).t()), ValueError, r"exp_avg_sq must be contiguous"),
    (_A, _adam_args(exp_avg_absmax=torch.zeros(4, 10)), ValueError, r"exp_avg_absmax\.shape=\(4, 10\); must be \(4, 3\)"),
    (_A, _adam_args(exp_avg_sq_absmax=torch.zeros(4, 3, dtype=torch.float64)), TypeError,
     r"exp_avg_sq_absmax\.dtype=torch\.float64; allowed: torch\.float32"),
    (_A, _adam_args(block_size=0), ValueError, r"block_size=0; allowed: an int in \[1, 4096\]"),
    (_A, _adam_args(block_size=5000), ValueError, r"block_size=5000"),
    (_A, _adam_args(signed_map=torch.zeros(1)), ValueError, r"signed_map\.shape=\(1,\); allowed: 1-D with 2\.\.256 values"),
    (_A, _adam_args(unsigned_map=torch.zeros(300)), ValueError, r"unsigned_map\.shape=\(300,\); allowed"),
    (_A, _adam_args(skip=torch.tensor([True])), ValueError, r"skip is a 1-dim torch\.bool tensor on cpu; allowed: None or"),
    (_A, _adam_args(skip=torch.tensor(1.0)), ValueError, r"skip is a 0-dim torch\.float32 tensor"),
    (_A, _adam_args(skip=torch.tensor(True, device="meta")), ValueError, r"skip is a 0-dim torch\.bool tensor on meta"),
]
WRAPPERS: dict[str, Callable[..., Any]] = {_Q: quantize_blockwise_, _D: dequantize_blockwise, _A: blockwise_adam_}


@pytest.mark.parametrize("refusal", REFUSALS, ids=[f"{i}-{r[0]}" for i, r in enumerate(REFUSALS)])
@pytest.mark.parametrize("fused", [False, True])
def test_bad_arguments_are_refused(refusal: tuple[str, dict[str, Any], type, str], fused: bool) -> None:
    """The wrappers check before any kernel runs: the same exception and message with either kernel."""
    op_name, args, error, message = refusal
    with pytest.raises(error, match=f"^{op_name}: {message}"):
        WRAPPERS[op_name](**args, fused=fused)


@pytest.mark.parametrize("refusal", REFUSALS, ids=[f"{i}-{r[0]}" for i, r in enumerate(REFUSALS)])
def test_ops_refuse_bad_arguments_themselves(refusal: tuple[str, dict[str, Any], type, str]) -> None:
    """Called through the dispatcher directly (the compiled kernel where one is registered, else the default):
    the same exception and message as the wrappers."""
    op_name, args, error, message = refusal
    with pytest.raises(error, match=f"^{op_name}: {message}"):
        getattr(OPS, op_name)(*args.values())


def test_dequantize_out_is_checked() -> None:
    codes, absmax = torch.zeros(4, 10, dtype=torch.uint8), torch.zeros(4, 3)
    for fused in (False, True):
        with pytest.raises(ValueError, match=r"^dequantize_blockwise: out\.shape=\(4, 9\); must be \(4, 10\)"):
            dequantize_blockwise(codes, absmax, signed_code_map(), 4, out=torch.zeros(4, 9), fused=fused)
        with pytest.raises(TypeError, match=r"^dequantize_blockwise: out\.dtype=torch\.float64"):
            dequantize_blockwise(codes, absmax, signed_code_map(), 4, out=torch.zeros(4, 10, dtype=torch.float64), fused=fused)


def quant_op_samples(device: str) -> list[tuple[Any, tuple]]:
    """opcheck samples of the three ops (tests/test_kernels.py runs them, with and without compiled code)."""
    samples: list[tuple[Any, tuple]] = []
    for shape, block_size in (((4, 9), 4), ((13,), 16), ((2, 3, 5), 1)):
        signed, unsigned = signed_code_map(device), unsigned_code_map(device)
        x = _values(shape, seed=80, device=device)
        codes = torch.zeros(shape, dtype=torch.uint8, device=device)
        absmax = torch.zeros(absmax_shape(shape, block_size), device=device)
        samples.append((OPS.quantize_blockwise_.default, (x, signed, block_size, codes, absmax)))
        state = _adam_state(shape, block_size, device)
        samples.append((OPS.dequantize_blockwise.default, (state[0], state[1], signed, block_size)))
        for skip in (None, torch.tensor(False, device=device), torch.tensor(True, device=device)):
            samples.append((OPS.blockwise_adam_.default,
                            (_randn(*shape, seed=81, device=device), *(t.clone() for t in state),
                             torch.empty(shape, device=device), signed, unsigned, 0.9, 0.999, 1e-8, block_size, skip)))
    return samples

