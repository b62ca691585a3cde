"""8-bit moments (``moment_format="8bit"``, :mod:`lowrank_optim.optim.moments`) in the optimizers' step.

The central check: an 8-bit step is exactly the fp32 step whose moments are rounded through the block-wise
quantizer after every step (the step computes in fp32 and quantizes once per update), for right- and
left-projected matrices (left ones stored transposed), full-rank matrices and vectors, with partial blocks.
The quantizer itself is tested in tests/test_quant_ops.py against plain references.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any, Callable

import pytest
import torch
from torch import nn

from lowrank_optim import APOLLOAdamW, DCTAdamW, FiraAdamW, GaLoreAdamW
from lowrank_optim.ops.quant import signed_code_map, unsigned_code_map
from lowrank_optim.optim.moments import Blockwise8bit, FullPrecision, moment_state_bytes, resolve_moment_format
from lowrank_optim.state_keys import EXP_AVG, EXP_AVG_ABSMAX, EXP_AVG_SQ, EXP_AVG_SQ_ABSMAX

BLOCKS = Blockwise8bit(block_size=8, min_size=0)
MOMENT_KEYS = (EXP_AVG, EXP_AVG_SQ, EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX)


def _roundtrip(x: torch.Tensor, code_map: torch.Tensor, block_size: int) -> torch.Tensor:
    """Quantize and dequantize ``x`` (fp32, blocks along its last dimension) from the formulas, independently
    of the ops: per block ``a = max |x|``, code = number of midpoints below ``x / a``, value = ``map[code] · a``."""
    thresholds = (code_map[:-1] + code_map[1:]) * 0.5
    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], block_size):
        block = x[..., start : start + block_size]
        absmax = block.abs().amax(dim=-1, keepdim=True)
        divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        codes = torch.searchsorted(thresholds, (block / divisor).contiguous())
        out[..., start : start + block_size] = code_map[codes] * absmax
    return out


def _model(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict(
        {
            "right": nn.Linear(40, 48),  # 48 x 40: right projection, moments 48 x r
            "left": nn.Linear(56, 40),  # 40 x 56: left projection, moments r x 56 (stored 56 x r)
            "embedding": nn.Embedding(30, 20),  # full rank, 30 x 20
        }
    )


def _groups(model: nn.ModuleDict, **projected: Any) -> list[dict[str, Any]]:
    matrices = [model["right"].weight, model["left"].weight]
    others = [model["right"].bias, model["left"].bias, model["embedding"].weight]
    return [{"params": others}, {"params": matrices, "rank": 12, "update_proj_gap": 4, **projected}]


def _loss(model: nn.ModuleDict, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 40, generator=generator)
    tokens = torch.randint(0, 30, (16,), generator=generator)
    hidden = torch.tanh(model["right"](x))[:, :20] + model["embedding"](tokens)
    return model["left"](torch.cat([hidden, hidden, hidden[:, :16]], dim=1)).pow(2).mean()


def _train(
    model: nn.ModuleDict, optimizer: torch.optim.Optimizer, steps: range, after: Callable[[], None] = lambda: None
) -> None:
    for seed in steps:
        optimizer.zero_grad()
        _loss(model, seed).backward()
        optimizer.step()
        after()


def _round_moments(optimizer: torch.optim.Optimizer, block_size: int) -> None:
    """What the 8-bit format does to fp32 moments after a step, in its stored orientation."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            for key, code_map in ((EXP_AVG, signed_code_map()), (EXP_AVG_SQ, unsigned_code_map())):
                value = state[key]
                left = "rank" in group and value.shape[0] < value.shape[1] and param.shape[0] < param.shape[1]
                stored = value.T.contiguous() if left else value
                rounded = _roundtrip(stored, code_map, block_size)
                value.copy_(rounded.T if left else rounded)


@pytest.mark.filterwarnings("ignore:rank 12 in param group 1 exceeds")
@pytest.mark.parametrize("make", [GaLoreAdamW, FiraAdamW, APOLLOAdamW], ids=["galore", "fira", "apollo"])
def test_an_8bit_step_is_the_fp32_step_with_rounded_moments(make: Callable[..., torch.optim.Optimizer]) -> None:
    model = _model()
    reference_model = copy.deepcopy(model)
    options: dict[str, Any] = dict(lr=0.01, weight_decay=0.1, fused=False)
    if make is APOLLOAdamW:
        options["projector"] = "svd"  # its random projector's seed stream is the same either way; svd keeps it simple
    eight = make(_groups(model), moment_format=BLOCKS, **options)
    reference = make(_groups(reference_model), **options)
    _train(model, eight, range(10))  # refreshes at steps 1, 5, 9
    _train(reference_model, reference, range(10), after=lambda: _round_moments(reference, BLOCKS.block_size))
    for (name, param), expected in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(param, expected), name
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        state, ref = eight.state[param], reference.state[expected]
        m, v = _dequantized(eight, param)
        assert torch.equal(m, ref[EXP_AVG]) and torch.equal(v, ref[EXP_AVG_SQ])
        assert state[EXP_AVG].dtype == torch.uint8 and state[EXP_AVG_ABSMAX].dtype == torch.float32


def _dequantized(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    from lowrank_optim.optim.galore import _moment_placement
    from lowrank_optim.optim.moments import quantized_moments

    shape, sharding = _moment_placement(group, param.shape)
    moments = quantized_moments(group["moment_format"], shape, sharding, optimizer.state[param])
    assert moments is not None
    return moments.load(fused=False)


@pytest.mark.filterwarnings("ignore:rank 12 in param group 1 exceeds")
def test_state_layout_codes_scales_and_the_size_threshold() -> None:
    model = _model()
    optimizer = GaLoreAdamW(_groups(model), lr=0.01, moment_format=Blockwise8bit(block_size=8, min_size=100))
    _train(model, optimizer, range(1))
    state = optimizer.state
    right, left = state[model["right"].weight], state[model["left"].weight]
    assert right[EXP_AVG].shape == (48, 12) and right[EXP_AVG_ABSMAX].shape == (48, 2)  # blocks of 8 + 4
    assert left[EXP_AVG].shape == (56, 12) and left[EXP_AVG_SQ_ABSMAX].shape == (56, 2)  # r x 56 stored transposed
    assert state[model["embedding"].weight][EXP_AVG].shape == (30, 20)
    assert state[model["embedding"].weight][EXP_AVG_ABSMAX].shape == (30, 3)
    bias = state[model["right"].bias]  # 48 elements < min_size: a plain fp32 moment
    assert set(bias) == {"step", EXP_AVG, EXP_AVG_SQ} and bias[EXP_AVG].dtype == torch.float32
    small = GaLoreAdamW([nn.Parameter(torch.randn(9, 10))], moment_format=Blockwise8bit(min_size=100))
    small.param_groups[0]["params"][0].grad = torch.ones(9, 10)
    small.step()  # 90 elements < min_size: plain
    assert next(iter(small.state.values()))[EXP_AVG].dtype == torch.float32
    for key in (EXP_AVG, EXP_AVG_SQ):
        assert right[key].dtype == torch.uint8


def test_8bit_state_is_at_most_027x_the_fp32_state() -> None:
    """Realistic shapes: a rank-128 right moment, a rank-256 left one, an embedding; blocks of 256."""
    fmt = Blockwise8bit()
    cases = [((4096, 128), "rows"), ((256, 11008), "columns"), ((32000, 4096), "rows"), ((1024, 512), "rows")]
    for shape, sharding in cases:
        ratio = moment_state_bytes(fmt, shape, torch.float32, sharding) / moment_state_bytes(
            FullPrecision(), shape, torch.float32, sharding
        )
        assert ratio <= 0.27, (shape, ratio)
    assert moment_state_bytes(fmt, (64,), torch.float32) == 2 * 64 * 4  # below min_size: plain
    assert moment_state_bytes(fmt, (4096, 128), torch.bfloat16) == 2 * (4096 * 128 + 4 * 4096)


@pytest.mark.filterwarnings("ignore:rank 12 in param group 1 exceeds")
def test_state_dict_round_trip_continues_bit_identically() -> None:
    model = _model()
    optimizer = GaLoreAdamW(_groups(model), lr=0.01, moment_format=BLOCKS)
    _train(model, optimizer, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _train(model, optimizer, range(3, 9))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["param_groups"][1]["moment_format"] == BLOCKS.to_state()
    again = _model(seed=1)
    again.load_state_dict(saved["model"])
    # Built with full-precision moments: the saved groups bring their format, and the codes stay uint8.
    resumed = GaLoreAdamW(_groups(again), lr=0.01)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.param_groups[1]["moment_format"] == BLOCKS
    assert resumed.state[again["right"].weight][EXP_AVG].dtype == torch.uint8
    _train(again, resumed, range(3, 9))
    for param, expected in zip(again.parameters(), model.parameters()):
        assert torch.equal(param, expected)


@pytest.mark.filterwarnings("ignore:rank 12 in param group 1 exceeds")
@pytest.mark.parametrize(
    "make",
    [
        lambda groups, **kw: GaLoreAdamW(groups, moment_policy="reset", **kw),
        lambda groups, **kw: GaLoreAdamW(groups, moment_policy="rotate", **kw),
        lambda groups, **kw: GaLoreAdamW(groups, projector="rsvd", **kw),
        lambda groups, **kw: DCTAdamW(groups, **kw),
        lambda groups, **kw: DCTAdamW(groups, moment_policy="rotate", **kw),
        lambda groups, **kw: GaLoreAdamW(groups, proj_type="full", **kw),
    ],
    ids=["reset", "rotate", "rsvd", "dct", "dct-rotate", "two-sided"],
)
def test_every_projector_and_policy_tracks_fp32_moments(make: Callable[..., torch.optim.Optimizer]) -> None:
    """Refreshes move, rotate or reset 8-bit moments through their fp32 values; the run stays close to the
    fp32 one (the difference is the quantization error)."""
    model = _model()
    reference_model = copy.deepcopy(model)
    eight = make(_groups(model), lr=0.01, moment_format=Blockwise8bit(block_size=8, min_size=0))
    reference = make(_groups(reference_model), lr=0.01)
    _train(model, eight, range(12))
    _train(reference_model, reference, range(12))
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        assert torch.isfinite(param).all()
        assert (param - expected).abs().max() <= 0.05 * expected.abs().max(), "8-bit run drifted from the fp32 run"


@pytest.mark.filterwarnings("ignore:rank 12 in param group 1 exceeds")
def test_zeroed_moments_are_the_bytes_of_fresh_state() -> None:
    model = _model()
    optimizer = GaLoreAdamW(_groups(model), lr=0.01, moment_policy="reset", moment_format=BLOCKS, update_proj_gap=4)
    from lowrank_optim.optim.moments import quantized_moments

    _train(model, optimizer, range(5))
    group = optimizer.param_groups[1]
    state = optimizer.state[model["right"].weight]
    moments = quantized_moments(group["moment_format"], (48, 12), "rows", state)
    assert moments is not None
    moments.zero_()
    blank = GaLoreAdamW(_groups(_model()), lr=0.01, moment_format=BLOCKS)
    blank_state: dict[str, Any] = {}
    blank._init_state(blank.param_groups[1], model["right"].weight, blank_state)
    for key in MOMENT_KEYS:
        assert torch.equal(state[key], blank_state[key]), key


def test_a_nonfinite_full_rank_gradient_leaves_8bit_state_untouched() -> None:
    model = _model()
    optimizer = GaLoreAdamW(_groups(model), lr=0.01, moment_format=BLOCKS)
    _train(model, optimizer, range(2))
    embedding = model["embedding"].weight
    before = {key: value.clone() for key, value in optimizer.state[embedding].items() if key != "step"}
    weights = embedding.detach().clone()
    optimizer.zero_grad()
    _loss(model, 2).backward()
    cast_grad = embedding.grad
    assert cast_grad is not None
    cast_grad[3, 4] = float("nan")
    optimizer.step()
    assert torch.equal(embedding, weights)
    for key, value in before.items():
        assert torch.equal(optimizer.state[embedding][key], value), key
    assert optimizer.skipped_updates() == {(0, 2): 1}


def test_bf16_weights_with_8bit_moments() -> None:
    model = _model().to(torch.bfloat16)
    optimizer = GaLoreAdamW(_groups(model), lr=0.01, moment_format=BLOCKS)
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator).to(torch.bfloat16)
        optimizer.step()
    for param in model.parameters():
        assert param.dtype == torch.bfloat16 and torch.isfinite(param).all()
    assert optimizer.state[model["right"].weight][EXP_AVG].dtype == torch.uint8


def test_moment_format_refusals() -> None:
    param = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"Invalid moment_format: '4bit'\. Must be one of full, 8bit, or a MomentFormat"):
        GaLoreAdamW([param], moment_format="4bit")
    with pytest.raises(ValueError, match=r"Invalid moment_format in param group 0: 3\. Must be one of"):
        GaLoreAdamW([{"params": [param], "moment_format": 3}])
    with pytest.raises(ValueError, match=r"Invalid block_size: 0\. Must be an integer from 1 to 4096\."):
        Blockwise8bit(block_size=0)
    with pytest.raises(ValueError, match=r"Invalid block_size: 5000\."):
        GaLoreAdamW([param], moment_format=Blockwise8bit(block_size=5000))
    with pytest.raises(ValueError, match=r"Invalid min_size: -1\. Must be a non-negative integer\."):
        Blockwise8bit(min_size=-1)
    message = r"Invalid moment_format: '8bit' has no option 'bits'\. Its options: block_size, min_size\."
    with pytest.raises(ValueError, match=message):
        resolve_moment_format({"name": "8bit", "bits": 4})
    assert resolve_moment_format({"name": "8bit", "block_size": 64}) == Blockwise8bit(block_size=64)
    assert resolve_moment_format("8bit").to_state() == "8bit"


def test_quantized_moments_are_refused_under_another_layout() -> None:
    """A layout that does not declare ``steps_quantized_moments`` (whole stored rows on one process) is refused
    8-bit moments before anything is updated (the package's layouts all declare it)."""
    param = nn.Parameter(torch.randn(80, 80))
    optimizer = GaLoreAdamW([param], lr=0.01, moment_format="8bit")

    class OtherLayout:
        def check_group(self, optimizer: Any, group: dict[str, Any]) -> bool:
            return True

    optimizer.layout = OtherLayout()  # type: ignore[assignment]
    param.grad = torch.randn(80, 80)
    before = param.detach().clone()
    message = r"Invalid moment_format in param group 0: '8bit'\. Quantized moments are not yet supported under OtherLayout"
    with pytest.raises(ValueError, match=message):
        optimizer.step()
    assert torch.equal(param, before) and not optimizer.state


def test_per_layer_updates_with_8bit_moments_equal_a_normal_step() -> None:
    from lowrank_optim.train import PerLayerUpdates

    model = _model()
    twin = copy.deepcopy(model)
    fmt = Blockwise8bit(block_size=8, min_size=0)
    normal = GaLoreAdamW(_groups(model), lr=0.01, moment_format=fmt)
    layered = GaLoreAdamW(_groups(twin), lr=0.01, moment_format=fmt)
    updates = PerLayerUpdates(layered)
    for seed in range(6):
        normal.zero_grad()
        _loss(model, seed).backward()
        normal.step()
        updates.backward(_loss(twin, seed))
    for param, expected in zip(twin.parameters(), model.parameters()):
        assert torch.equal(param, expected)
    updates.remove()


def _has_cpu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_optim::{name}", "CPU")


@pytest.mark.filterwarnings("ignore:rank 12 in param group 1 exceeds")
@pytest.mark.skipif(not _has_cpu_kernel("blockwise_adam_"), reason="no compiled CPU kernel for blockwise_adam_")
def test_fused_8bit_step_matches_the_default_kernels() -> None:
    model = _model()
    twin = copy.deepcopy(model)
    fused = GaLoreAdamW(_groups(model), lr=0.01, moment_format=BLOCKS, fused=True)
    default = GaLoreAdamW(_groups(twin), lr=0.01, moment_format=BLOCKS, fused=False)
    _train(model, fused, range(6))
    _train(twin, default, range(6))
    for param, expected in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)


def test_8bit_training_tracks_fp32_over_200_steps() -> None:
    """A small LLaMA (the ``test`` config) trained 200 updates with GaLore: 8-bit moments end within 1 % of
    the fp32 run's loss (measured here: 2.0703 fp32, 2.0719 8-bit; the tiny model's figures are in
    bench/results, from bench/bench_moments_8bit.py)."""
    from lowrank_optim import param_groups
    from lowrank_optim.data import TokenStream, stdlib_corpus
    from lowrank_optim.models import LlamaConfig
    from lowrank_optim.train.methods import build_model, load_presets
    from lowrank_optim.train.pretrain import TrainSettings, pretrain

    config = LlamaConfig.from_name_or_path("test")
    preset = load_presets("test")["galore"]
    stream = TokenStream(stdlib_corpus()[:200_000], 32)
    settings = TrainSettings(steps=200, batch_size=4, seq_len=32, eval_batches=4, measure_memory=False)
    results = {}
    for name in ("full", "8bit"):
        fmt = Blockwise8bit(block_size=64, min_size=0) if name == "8bit" else FullPrecision()

        def factory(model: nn.Module, fmt: Any = fmt) -> torch.optim.Optimizer:
            groups = param_groups(model, rank=preset.rank, update_proj_gap=preset.update_proj_gap, scale=preset.scale)
            return GaLoreAdamW(groups, lr=preset.lr, weight_decay=0.0, moment_format=fmt)

        model = build_model(config, preset=preset, seed=settings.seed)
        results[name] = pretrain(model, factory, stream, settings, log=lambda line: None)
    full, eight = results["full"]["final_eval_loss"], results["8bit"]["final_eval_loss"]
    assert math.isfinite(eight) and abs(eight - full) <= 0.01 * full, (full, eight)


def _reference_signature(path: str, class_name: str) -> list[tuple[str, Any]]:
    """``(name, default)`` of a class's ``__init__`` in a reference source file, read without importing it
    (galore-torch's 8-bit module imports bitsandbytes, which the test environment does not install)."""
    import ast
    import inspect

    tree = ast.parse(open(path).read())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    init = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    names = [arg.arg for arg in init.args.args[1:]]
    defaults = [ast.literal_eval(default) for default in init.args.defaults]
    padded = [inspect.Parameter.empty] * (len(names) - len(defaults)) + defaults
    return list(zip(names, padded))


def test_galore_adamw8bit_has_galore_torch_signature() -> None:
    import importlib.util
    import inspect
    from pathlib import Path

    from lowrank_optim import GaLoreAdamW8bit

    spec = importlib.util.find_spec("galore_torch")
    if spec is None or spec.origin is None:
        pytest.skip("galore-torch is not installed")
    path = Path(spec.origin).parent / "adamw8bit.py"
    expected = _reference_signature(str(path), "AdamW8bit")
    ours = [
        (name, parameter.default)
        for name, parameter in inspect.signature(GaLoreAdamW8bit.__init__).parameters.items()
        if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert ours == [(name, tuple(value) if isinstance(value, tuple) else value) for name, value in expected]


def test_galore_adamw8bit_is_galore_adamw_with_8bit_moments() -> None:
    from lowrank_optim import GaLoreAdamW8bit

    model = _model()
    twin = copy.deepcopy(model)
    drop_in = GaLoreAdamW8bit(_groups(model), lr=0.01, weight_decay=0.0, min_8bit_size=0, update_proj_gap=4)
    explicit = GaLoreAdamW(_groups(twin), lr=0.01, eps=1e-8, moment_format=Blockwise8bit(min_size=0), update_proj_gap=4)
    _train(model, drop_in, range(6))
    _train(twin, explicit, range(6))
    for param, expected in zip(model.parameters(), twin.parameters()):
        assert torch.equal(param, expected)
    assert GaLoreAdamW8bit([nn.Parameter(torch.ones(2))]).defaults["weight_decay"] == 1e-2  # bitsandbytes' default


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"amsgrad": True}, r"Invalid amsgrad: True\. Must be False \(8-bit Adam has no AMSGrad\)\."),
        ({"args": object()}, r"Invalid args: <object object at .*>\. Must be None"),
        ({"percentile_clipping": 5}, r"Invalid percentile_clipping: 5\. Must be 100 \(adaptive clipping is not implemented"),
        ({"block_wise": False}, r"Invalid block_wise: False\. Must be True"),
        ({"is_paged": True}, r"Invalid is_paged: True\. Must be False \(paged optimizer state is not implemented\)\."),
        ({"optim_bits": 4}, r"Invalid optim_bits: 4\. Must be 32 or 8"),
        ({"min_8bit_size": -2}, r"Invalid min_8bit_size: -2\. Must be a non-negative integer\."),
        ({"moment_format": "full"}, r"Invalid moment_format for GaLoreAdamW8bit: it sets the format itself"),
    ],
)
def test_galore_adamw8bit_refuses_what_it_does_not_implement(options: dict[str, Any], message: str) -> None:
    from lowrank_optim import GaLoreAdamW8bit

    with pytest.raises(ValueError, match=message):
        GaLoreAdamW8bit([nn.Parameter(torch.ones(4, 4))], **options)


def test_a_preset_carries_the_moment_format_for_every_method() -> None:
    """``"moment_format": "8bit"`` in a preset: every method's optimizer keeps 8-bit moments (torch AdamW's
    methods through GaLoreAdamW's full-rank groups with torch's eps); an explicit argument overrides it."""
    import dataclasses

    from lowrank_optim.models import LlamaConfig
    from lowrank_optim.train.methods import MethodPreset, build_model, build_optimizer, load_presets

    config = LlamaConfig.from_name_or_path("test")
    for name, preset in load_presets("test").items():
        eight = dataclasses.replace(preset, moment_format="8bit")
        model = build_model(config, preset=eight, seed=0)
        optimizer = build_optimizer(model, eight)
        assert isinstance(optimizer, GaLoreAdamW), name
        assert all(group["moment_format"] == Blockwise8bit() for group in optimizer.param_groups), name
        if name in ("adamw", "sltrain"):
            assert optimizer.defaults["eps"] == 1e-8
        plain = build_optimizer(model, eight, moment_format="full")
        assert all(isinstance(group.get("moment_format", FullPrecision()), FullPrecision) for group in plain.param_groups)
    with pytest.raises(ValueError, match=r"moment_format \('4bit'\) must be one of \['full', '8bit'\]"):
        MethodPreset(method="galore", lr=0.01, rank=8, scale=0.25, update_proj_gap=2, moment_format="4bit")


def test_quantized_vectors_are_refused_where_a_layout_splits_them_off_blocks() -> None:
    """FSDP2 splits a 1-D parameter at ``torch.chunk``'s offsets: its moments can be quantized only where
    those fall on block boundaries (a 4096-element norm over 2 ranks), else the step is refused by name
    with the two ways out, before anything is updated."""
    from lowrank_optim.distributed.fsdp2 import FSDP2Layout, _chunk
    from lowrank_optim.optim.layout import DenseLayout

    class Splits:
        steps_quantized_moments = True

        def __init__(self, world: int) -> None:
            self.world = world

        def check_group(self, optimizer: Any, group: dict[str, Any]) -> bool:
            return True

        def vector_pieces(self, size: int) -> list[tuple[int, int]]:
            return [_chunk(size, self.world, rank) for rank in range(self.world)]

    assert FSDP2Layout.steps_quantized_moments and hasattr(FSDP2Layout, "vector_pieces")
    fmt = Blockwise8bit()
    assert fmt.splits_on_blocks(4096, Splits(2).vector_pieces) and fmt.splits_on_blocks(4096, Splits(16).vector_pieces)
    assert not fmt.splits_on_blocks(4096, Splits(3).vector_pieces) and fmt.splits_on_blocks(4000, Splits(3).vector_pieces)

    matrix, vector = nn.Parameter(torch.randn(80, 80)), nn.Parameter(torch.randn(5000))
    optimizer = GaLoreAdamW([{"params": [matrix]}, {"params": [vector]}], lr=0.01, moment_format=fmt)
    optimizer.layout = Splits(3)  # type: ignore[assignment]
    matrix.grad, vector.grad = torch.randn(80, 80), torch.randn(5000)
    message = (
        r"Invalid moment_format in param group 1: '8bit'\. Param 0 is 1-D \(shape \(5000,\)\), and Splits splits it "
        r"between processes at offsets \[1667, 3334\], which are not all on its quantization blocks' boundaries, so "
        r"its moments cannot be quantized\. Allowed: put the 1-D parameters in a param group with "
        r"moment_format='full', or give this group Blockwise8bit\(min_size=5001\) or more\."
    )
    with pytest.raises(ValueError, match=message):
        optimizer.step()
    assert not optimizer.state
    optimizer.param_groups[1]["moment_format"] = Blockwise8bit(min_size=5001)
    optimizer.layout = DenseLayout()
    optimizer.step()
    assert optimizer.state[vector][EXP_AVG].dtype == torch.float32 and optimizer.state[matrix][EXP_AVG].dtype == torch.uint8


def test_pretrain_cli_takes_a_moment_format(tmp_path: Any) -> None:
    """``lowrank-optim pretrain --moment-format 8bit --per-layer``: galore-torch's galore_adamw8bit_per_layer
    recipe; the results say 8-bit state (smaller than the fp32 run's) and the run trains."""
    import json

    from lowrank_optim.__main__ import main

    results = {}
    for fmt in ("full", "8bit"):
        out = tmp_path / f"{fmt}.json"
        argv = ["pretrain", "--config", "test", "--method", "galore", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                "--eval-batches", "1", "--per-layer", "--moment-format", fmt, "--json", str(out)]
        assert main(argv) == 0
        results[fmt] = json.loads(out.read_text())
    assert results["8bit"]["preset"]["moment_format"] == "8bit"
    assert results["8bit"]["optimizer_state_bytes"] < results["full"]["optimizer_state_bytes"]
    assert math.isfinite(results["8bit"]["final_eval_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is available here")
@pytest.mark.filterwarnings("ignore:rank 12 in param group 1 exceeds")
@pytest.mark.parametrize("make", [GaLoreAdamW, FiraAdamW, APOLLOAdamW], ids=["galore", "fira", "apollo"])
def test_8bit_steps_on_cuda_track_the_cpu_steps(make: Callable[..., torch.optim.Optimizer]) -> None:
    """The CUDA kernels of the 8-bit ops inside the optimizers' step (``make test-gpu``; never run yet when
    written): 6 steps through 2 refreshes on the GPU stay within 1e-4 of the CPU run's default kernels
    (a code may differ by one where the CUDA arithmetic rounds differently, tests/test_quant_ops.py)."""
    model = _model()
    twin = copy.deepcopy(model).cuda()
    options: dict[str, Any] = dict(lr=0.01, moment_format=BLOCKS)
    if make is APOLLOAdamW:
        options["projector"] = "svd"
    on_cpu = make(_groups(model), fused=False, **options)
    on_gpu = make(_groups(twin), **options)
    for seed in range(6):
        for module, optimizer in ((model, on_cpu), (twin, on_gpu)):
            optimizer.zero_grad()
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(16, 40, generator=generator)
            tokens = torch.randint(0, 30, (16,), generator=generator)
            device = next(module.parameters()).device
            hidden = torch.tanh(module["right"](x.to(device)))[:, :20] + module["embedding"](tokens.to(device))
            module["left"](torch.cat([hidden, hidden, hidden[:, :16]], dim=1)).pow(2).mean().backward()
            optimizer.step()
    for param, expected in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(param.cpu(), expected, rtol=1e-4, atol=1e-4)
    assert on_gpu.state[twin["right"].weight][EXP_AVG].device.type == "cuda"
