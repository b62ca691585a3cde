"""The sparse kernels never read or write outside their tensors, whatever the indices.

Every kernel (the compiled CPU one and the pure-PyTorch default) checks every index before it touches
``dense``: out of range raises ``IndexError`` with the same message, and ``dense`` is left as it was.
Unsorted or repeated indices are correct (they accumulate), only slower. ``SLTrainLinear`` refuses a
support in ``load_state_dict`` that its forward could not use.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from lowrank_optim.nn import SLTrainLinear
from lowrank_optim.ops import kernel_load_error, kernels_available
from lowrank_optim.ops.sparse import _gather_default, _scatter_add_default

OPS = torch.ops.lowrank_optim
needs_cpu_kernels = pytest.mark.skipif(
    not kernels_available("cpu"), reason=f"CPU kernels not loaded: {kernel_load_error('cpu')}"
)

# Index values a user or a corrupted checkpoint can produce (the last three only fit int64).
BAD_INDICES = [96, -1, 2**31 - 1, -(2**31), 10**9, 2**40, -(2**40)]


def _kernels() -> list:
    kernels = [pytest.param("default", id="default")]
    kernels.append(pytest.param("compiled", id="compiled", marks=needs_cpu_kernels))
    return kernels


def _scatter(kernel: str):
    return OPS.sparse_scatter_add_ if kernel == "compiled" else _scatter_add_default


def _gather(kernel: str):
    return OPS.sparse_gather if kernel == "compiled" else _gather_default


def _cases() -> list:
    cases = []
    for dtype in (torch.int32, torch.int64):
        for bad in BAD_INDICES:
            if dtype == torch.int32 and not -(2**31) <= bad < 2**31:
                continue
            cases.append(pytest.param(dtype, bad, id=f"{str(dtype)[6:]}-{bad}"))
    return cases


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("index_dtype, bad", _cases())
@pytest.mark.parametrize("op", ["scatter", "gather"])
def test_out_of_range_index_raises_and_touches_nothing(op: str, index_dtype: torch.dtype, bad: int, kernel: str) -> None:
    dense = torch.randn(12, 8)
    before = dense.clone()
    indices = torch.tensor([0, 5, bad, 7], dtype=index_dtype)
    message = re.escape(
        f"flat_indices[2]={bad} is out of range for dense of shape (12, 8) (96 elements); allowed: 0 <= index < 96"
    )
    with pytest.raises(IndexError, match=message):
        if op == "scatter":
            _scatter(kernel)(dense, indices, torch.ones(4), 1.0)
        else:
            _gather(kernel)(dense, indices)
    assert torch.equal(dense, before)


@pytest.mark.parametrize("kernel", _kernels())
def test_out_of_range_on_a_non_contiguous_dense_gather(kernel: str) -> None:
    # The strided path unravels each index with the input's strides: an unchecked -1 reads before it.
    dense = torch.randn(8, 12).t()
    with pytest.raises(IndexError, match=re.escape("flat_indices[1]=-1 is out of range")):
        _gather(kernel)(dense, torch.tensor([3, -1], dtype=torch.int32))


@needs_cpu_kernels
def test_compiled_kernels_do_not_crash_the_process() -> None:
    """In a fresh interpreter (the old kernels wrote outside ``dense`` and could kill the process)."""
    script = textwrap.dedent(
        """
        import torch, lowrank_optim
        ops = torch.ops.lowrank_optim
        dense = torch.zeros(64, 64)
        for bad in (2**31 - 1, 10**9, 2**40, -(2**40), -1):
            dtype = torch.int32 if -(2**31) <= bad < 2**31 else torch.int64
            indices = torch.tensor([1, 2, bad], dtype=dtype)
            for call in (lambda: ops.sparse_scatter_add_(dense, indices, torch.ones(3), 1.0),
                         lambda: ops.sparse_gather(dense, indices),
                         lambda: ops.sparse_gather(dense.t(), indices)):
                try:
                    call()
                except IndexError:
                    print("IndexError")
                else:
                    print("no error")
        print("zero" if not dense.any() else "dense changed")
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, (completed.returncode, completed.stderr[-2000:])
    lines = completed.stdout.split()
    assert lines == ["IndexError"] * 15 + ["zero"], completed.stdout


def _message(call) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        call()
    return info.type, str(info.value).splitlines()[0]


BAD_CALLS = {
    "float indices": lambda s, g, d: g(d, torch.tensor([0.0, 1.0])),
    "2-D indices": lambda s, g, d: g(d, torch.tensor([[0, 1]])),
    "values length": lambda s, g, d: s(d, torch.tensor([0, 1]), torch.ones(3), 1.0),
    "values dtype": lambda s, g, d: s(d, torch.tensor([0, 1]), torch.ones(2, dtype=torch.float64), 1.0),
    "non-contiguous dense": lambda s, g, d: s(d.t(), torch.tensor([0, 1]), torch.ones(2), 1.0),
    "scatter out of range": lambda s, g, d: s(d, torch.tensor([0, 12]), torch.ones(2), 1.0),
    "gather out of range": lambda s, g, d: g(d, torch.tensor([-3])),
}


@needs_cpu_kernels
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_compiled_and_default_kernels_raise_the_same_error(case: str) -> None:
    """Called through the dispatcher directly (no Python wrapper checks first)."""
    call = BAD_CALLS[case]
    compiled = _message(lambda: call(OPS.sparse_scatter_add_, OPS.sparse_gather, torch.zeros(3, 4)))
    default = _message(lambda: call(_scatter_add_default, _gather_default, torch.zeros(3, 4)))
    assert compiled == default
    assert compiled[0] in (TypeError, ValueError, IndexError)


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("indices", [[5, 3, 5, 0, 95], [7, 7, 7], [95, 50, 2, 1]], ids=["repeats", "one", "descending"])
def test_unsorted_and_repeated_indices_accumulate(kernel: str, indices: list[int]) -> None:
    support = torch.tensor(indices, dtype=torch.int32)
    values = torch.arange(1.0, len(indices) + 1)
    dense = torch.zeros(12, 8)
    _scatter(kernel)(dense, support, values, -2.0)
    expected = torch.zeros(96)
    for index, value in zip(indices, values.tolist()):
        expected[index] += -2.0 * value
    assert torch.equal(dense.view(-1), expected)
    assert torch.equal(_gather(kernel)(dense, support), expected[support.long()])


@needs_cpu_kernels
def test_large_strictly_increasing_support_uses_the_parallel_path_correctly() -> None:
    """Many chunks: the order check must look across chunk boundaries."""
    dense = torch.zeros(300, 500)
    support = torch.randperm(150_000, generator=torch.Generator().manual_seed(0))[:60_000].sort().values
    values = torch.randn(60_000, generator=torch.Generator().manual_seed(1))
    expected = dense.clone()
    _scatter_add_default(expected, support, values, 0.5)
    OPS.sparse_scatter_add_(dense, support, values, 0.5)
    assert torch.equal(dense, expected)
    # A repeat exactly at a chunk boundary (16384 nonzeros per chunk) must still accumulate.
    repeated = support.clone()
    repeated[16384] = repeated[16383]
    dense.zero_()
    expected.zero_()
    _scatter_add_default(expected, repeated, values, 1.0)
    OPS.sparse_scatter_add_(dense, repeated, values, 1.0)
    assert torch.equal(dense, expected)


def _layer() -> SLTrainLinear:
    return SLTrainLinear(8, 6, rank=2, delta=0.25, seed=0)  # nnz = 12 of 48


def _support(layer: SLTrainLinear, change: str) -> object:
    indices = layer.indices.clone()
    if change == "above":
        indices[-1] = 48
    elif change == "huge":
        indices = indices.long()
        indices[3] = 2**40
    elif change == "negative":
        indices[0] = -1
    elif change == "repeat":
        indices[5] = indices[4]
    elif change == "unsorted":
        indices = indices.flip(0)
    elif change == "short":
        indices = indices[:-1]
    elif change == "float":
        indices = indices.float()
    elif change == "2-D":
        indices = indices.view(3, 4)
    return indices


SUPPORT_ERRORS = {
    "above": r"entry 11 is 48, outside the allowed range \[0, 48\) of a 6 x 8 weight",
    "huge": r"entry 3 is 1099511627776, outside the allowed range \[0, 48\)",
    "negative": r"entry 0 is -1, outside the allowed range \[0, 48\)",
    "repeat": r"entry 5 is \d+ after \d+; a support must be strictly increasing \(sorted, without repeats\)",
    "unsorted": r"entry 1 is \d+ after \d+; a support must be strictly increasing",
    "short": r"11 entries; this layer has nnz=12",
    "float": r"dtype torch.float32; allowed: torch.int32, torch.int64",
    "2-D": r"shape \(3, 4\); must be 1-D",
}


@pytest.mark.parametrize("change", sorted(SUPPORT_ERRORS))
def test_load_state_dict_refuses_a_bad_support(change: str) -> None:
    layer = _layer()
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    state = {name: tensor.clone() for name, tensor in _layer().state_dict().items()}
    state["indices"] = _support(layer, change)
    with pytest.raises(
        RuntimeError,
        match=r"Error\(s\) in loading state_dict for SLTrainLinear:\s+state_dict\['indices'\]: " + SUPPORT_ERRORS[change],
    ):
        layer.load_state_dict(state)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_load_state_dict_accepts_a_valid_support_of_either_index_dtype() -> None:
    layer, other = _layer(), SLTrainLinear(8, 6, rank=2, delta=0.25, seed=1)
    state = other.state_dict()
    state["indices"] = state["indices"].long()
    layer.load_state_dict(state)
    assert torch.equal(layer.indices, other.indices) and layer.indices.dtype == torch.int32
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), other(x))


def test_load_state_dict_names_the_module_in_a_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), _layer())
    state = model.state_dict()
    state["1.indices"] = state["1.indices"].flip(0)
    with pytest.raises(RuntimeError, match=r"state_dict\['1.indices'\]: entry 1"):
        model.load_state_dict(state, strict=False)  # refused whatever strict says, as a shape mismatch is


@needs_cpu_kernels
def test_values_overlapping_dense_are_refused_by_every_kernel() -> None:
    """Values read while dense is written (a view of dense): index_add_ refuses it; so does the kernel
    (it used to compute with half-updated values)."""
    outcomes = []
    for scatter in (OPS.sparse_scatter_add_, _scatter_add_default):
        dense = torch.arange(16.0).view(4, 4).contiguous()
        before = dense.clone()
        outcomes.append(
            _message(lambda scatter=scatter, dense=dense: scatter(dense, torch.tensor([1, 2, 3]), dense.view(-1)[5:8], 1.0))
        )
        assert torch.equal(dense, before)
    assert outcomes[0] == outcomes[1] and outcomes[0][0] is RuntimeError
    assert "refer to a single memory location" in outcomes[0][1]


@pytest.mark.parametrize("corrupt", ["in place", "replaced"])
def test_a_support_changed_after_construction_is_checked_before_use(corrupt: str) -> None:
    """The layer's kernels skip their per-call index check for the support the layer checked; a support
    changed since (in place, or a new tensor) is checked again at the next forward."""
    layer = _layer()
    x = torch.randn(3, 8)
    layer(x)
    if corrupt == "in place":
        layer.indices[3] = 10**6
    else:
        layer.indices = layer.indices.flip(0)
    message = r"SLTrainLinear.indices: entry 3 is 1000000, outside" if corrupt == "in place" else r"strictly increasing"
    with pytest.raises(ValueError, match=message):
        layer(x)
    with pytest.raises(ValueError, match=message):
        layer.dense_weight()
