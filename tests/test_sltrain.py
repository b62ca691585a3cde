"""SLTrainLinear, model conversion, refactorization, momentum reset and LR re-ramp."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from lowrank_optim.nn import (
    HighRankRestart,
    LRRewarmup,
    SLTrainLinear,
    balanced_factors,
    convert_to_sltrain,
    index_dtype_for,
    refactorize_,
    reset_momentum_,
)
from lowrank_optim.nn.sltrain import _SparsePlusLowRankLinear


def _trained_layer(in_features: int = 20, out_features: int = 14, rank: int = 5, **kwargs: object) -> SLTrainLinear:
    """A layer whose B is non-zero, as after some training (a fresh layer has B = 0)."""
    layer = SLTrainLinear(in_features, out_features, rank=rank, seed=3, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.B.copy_(torch.randn(layer.B.shape, generator=torch.Generator().manual_seed(4)))
    return layer


def _dense_reference(
    B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scale: object
) -> torch.Tensor:
    sparse = torch.zeros(B.shape[0] * A.shape[1], dtype=values.dtype).scatter(0, indices.long(), values)
    return scale * (B @ A) + sparse.view(B.shape[0], A.shape[1])  # type: ignore[operator]


@pytest.mark.parametrize("trainable_scale", [False, True])
def test_gradients_equal_dense_autograd(trainable_scale: bool) -> None:
    layer = _trained_layer(bias=True, trainable_scale=trainable_scale, dtype=torch.float64)
    x = torch.randn(2, 3, 20, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 3, 14, dtype=torch.float64)
    params = [x] + list(layer.parameters())

    grads = torch.autograd.grad(layer(x), params, grad_out)
    weight = _dense_reference(layer.B, layer.A, layer.values, layer.indices, layer.scale)
    expected = torch.autograd.grad(nn.functional.linear(x, weight, layer.bias), params, grad_out)
    assert len(grads) == (6 if trainable_scale else 5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck() -> None:
    layer = _trained_layer(in_features=7, out_features=6, rank=2, delta=0.3, dtype=torch.float64)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    B, A, values = (t.detach().clone().requires_grad_() for t in (layer.B, layer.A, layer.values))

    def function(
        x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        return _SparsePlusLowRankLinear.apply(x, B, A, values, layer.indices, scale, bias)

    assert torch.autograd.gradcheck(function, (x, B, A, values, scale, bias))
    assert torch.autograd.gradcheck(
        lambda x, B: _SparsePlusLowRankLinear.apply(x, B, A, values, layer.indices, 0.25, None), (x, B)
    )


def test_only_requested_gradients_are_computed() -> None:
    layer = _trained_layer()
    layer.A.requires_grad_(False)
    x = torch.randn(3, 20)  # no input gradient: backward must not rebuild W
    layer(x).sum().backward()
    assert layer.A.grad is None
    assert layer.B.grad is not None and layer.values.grad is not None


def test_support_count_order_uniqueness_dtype_and_reproducibility() -> None:
    layer = SLTrainLinear(64, 48, rank=8, delta=0.03, seed=11)
    indices = layer.indices
    assert indices.dtype == torch.int32
    assert indices.numel() == int(0.03 * 64 * 48) == layer.values.numel()
    assert torch.all(indices[1:] > indices[:-1])  # sorted and unique
    assert 0 <= int(indices[0]) and int(indices[-1]) < 64 * 48
    same = SLTrainLinear(64, 48, rank=8, delta=0.03, generator=torch.Generator().manual_seed(11))
    other = SLTrainLinear(64, 48, rank=8, delta=0.03, seed=12)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, same.state_dict()[name]), name
    assert not torch.equal(indices, other.indices)
    assert index_dtype_for(2**31 - 1) == torch.int32 and index_dtype_for(2**31) == torch.int64


def test_reference_initialization() -> None:
    layer = SLTrainLinear(100, 30, rank=4, seed=0, bias=True)
    assert torch.count_nonzero(layer.B) == 0
    assert layer.A.abs().max() <= 0.1 and layer.values.abs().max() <= 0.1  # 1/sqrt(in)
    assert layer.bias is not None and layer.bias.abs().max() <= 1 / math.sqrt(30)
    assert layer.scale == 32.0 / 4
    assert SLTrainLinear(100, 30, rank=4, seed=0, trainable_scale=True).scale.item() == pytest.approx(math.tanh(1.0))


def test_state_dict_round_trip_and_dtype_cast() -> None:
    layer = _trained_layer(bias=True, trainable_scale=True)
    assert set(layer.state_dict()) == {"indices", "B", "A", "values", "bias", "scale_raw"}
    restored = SLTrainLinear(20, 14, rank=5, seed=99, bias=True, trainable_scale=True)
    restored.load_state_dict(layer.state_dict())
    for name, tensor in layer.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    x = torch.randn(4, 20)
    assert torch.equal(restored(x), layer(x))
    layer.to(torch.bfloat16)
    assert layer.indices.dtype == torch.int32 and layer.values.dtype == torch.bfloat16
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_to_linear_and_from_linear() -> None:
    layer = _trained_layer(bias=True)
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # path="auto" without gradients is the dense path, which the export equals
        assert torch.equal(layer.to_linear()(x), layer(x))
    # With gradients "auto" may take the factored path (sparse kernels): the same function to rounding, whose
    # size depends on x (an unseeded x once met 2.7e-6 at 1e-6 absolute: the test then depended on order).
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-5, atol=1e-5)

    linear = nn.Linear(20, 14, bias=True)
    approximation = SLTrainLinear.from_linear(linear, rank=4, delta=0.2, seed=0)
    weight = approximation.dense_weight()
    support = approximation.indices.long()
    torch.testing.assert_close(weight.view(-1)[support], linear.weight.detach().view(-1)[support])
    assert torch.equal(approximation.bias, linear.bias)
    full_rank = SLTrainLinear.from_linear(linear, rank=14, delta=0.2, alpha=2.0, seed=0)
    torch.testing.assert_close(full_rank(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_refactorization_keeps_function_and_balances_factors(dtype: torch.dtype, tolerance: float) -> None:
    model = nn.Sequential(_trained_layer(dtype=dtype), nn.ReLU(), _trained_layer(14, 9, rank=3, dtype=dtype))
    x = torch.randn(6, 20, dtype=dtype)
    with torch.no_grad():
        before = model(x)
        singular = torch.linalg.svdvals((model[0].B @ model[0].A).double())[:5]

    refactorized = refactorize_(model)

    assert [id(p) for p in refactorized] == [id(model[0].B), id(model[0].A), id(model[2].B), id(model[2].A)]
    # Tolerances relative to the largest entry: the outputs of this random layer reach ~1e2.
    output_scale = before.abs().max().item()
    torch.testing.assert_close(model(x), before, rtol=0, atol=tolerance * output_scale)
    B, A = model[0].B.double(), model[0].A.double()
    torch.testing.assert_close(B.t() @ B, torch.diag(singular), rtol=0, atol=tolerance * float(singular[0]))
    torch.testing.assert_close(A @ A.t(), torch.diag(singular), rtol=0, atol=tolerance * float(singular[0]))


def test_balanced_factors_match_svd_of_product() -> None:
    B, A = torch.randn(30, 4, dtype=torch.float64), torch.randn(4, 25, dtype=torch.float64)
    new_B, new_A = balanced_factors(B, A)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    signs = torch.sign((new_B * U[:, :4]).sum(0))  # singular vectors are unique up to sign
    torch.testing.assert_close(new_B * signs, U[:, :4] * S[:4].sqrt(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_A * signs[:, None], S[:4, None].sqrt() * Vh[:4], rtol=1e-10, atol=1e-10)


def _stepped_adamw(amsgrad: bool = False) -> tuple[torch.optim.AdamW, list[nn.Parameter]]:
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(2))]
    optimizer = torch.optim.AdamW(params, lr=0.1, amsgrad=amsgrad)
    for _ in range(2):
        sum((p**2).sum() for p in params).backward()  # type: ignore[union-attr]
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, params


def test_reset_momentum_zeroes_exactly_the_chosen_moments() -> None:
    optimizer, params = _stepped_adamw(amsgrad=True)
    untouched = {key: value.clone() for key, value in optimizer.state[params[2]].items()}
    reset = reset_momentum_(optimizer, params[:2])
    assert reset == params[:2]
    for param in params[:2]:
        state = optimizer.state[param]
        assert float(state["step"]) == 0.0
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.count_nonzero(state[key]) == 0
    for key, value in optimizer.state[params[2]].items():
        assert torch.equal(value, untouched[key]), key

    everything, _ = _stepped_adamw()
    assert len(reset_momentum_(everything)) == 3


def test_reset_momentum_keeps_projection_bases_and_plain_int_steps() -> None:
    param = nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([param])
    basis = torch.randn(3, 2)  # a GaLore-style state: projection basis next to the moments
    optimizer.state[param] = {
        "step": 7,
        "exp_avg": torch.ones(4, 2),
        "exp_avg_sq": torch.ones(4, 2),
        "basis_right": basis.clone(),
    }
    reset_momentum_(optimizer)
    state = optimizer.state[param]
    assert state["step"] == 0 and isinstance(state["step"], int)
    assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
    assert torch.equal(state["basis_right"], basis)


def test_reset_momentum_errors() -> None:
    optimizer, params = _stepped_adamw()
    stranger = nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match=re.escape("params[1] (shape (5,)) is not in any param group of AdamW")):
        reset_momentum_(optimizer, [params[0], stranger])
    sgd_param = nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([sgd_param], lr=0.1, momentum=0.9)
    sgd_param.sum().backward()
    sgd.step()
    with pytest.raises(
        KeyError,
        match=re.escape("has none of keys=('exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'); its keys are ['momentum_buffer']"),
    ):
        reset_momentum_(sgd)
    reset_momentum_(sgd, keys=("momentum_buffer",))
    assert torch.count_nonzero(sgd.state[sgd_param]["momentum_buffer"]) == 0


def _ramp(k: int) -> float:
    return 1e-3 + (1 - 1e-3) * k / 4


def test_lr_rewarmup_values_with_closed_form_and_recursive_schedulers() -> None:
    def make(kind: str) -> torch.optim.lr_scheduler.LRScheduler:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        if kind == "lambda":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
        return scheduler

    for kind in ("lambda", "cosine"):
        plain = make(kind)
        wrapped = LRRewarmup(make(kind), warmup_steps=4)
        plain_lrs, wrapped_lrs = [], []
        for update in range(12):
            plain_lrs.append(plain.get_last_lr()[0])
            wrapped_lrs.append(wrapped.get_last_lr()[0])
            plain.optimizer.step()
            wrapped.optimizer.step()
            plain.step()
            wrapped.step()
            if update == 2:
                wrapped.restart()
        # Updates 0-3 follow the schedule, 3-6 ramp (k = 0..3), 7+ follow the schedule again.
        expected = [lr * (_ramp(update - 3) if 3 <= update < 7 else 1.0) for update, lr in enumerate(plain_lrs)]
        assert wrapped_lrs == pytest.approx(expected, rel=1e-12), kind
        assert wrapped_lrs[3] == pytest.approx(1e-3 * plain_lrs[3])


def test_lr_rewarmup_state_dict() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    wrapped = LRRewarmup(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), warmup_steps=4)
    wrapped.restart()
    optimizer.step()
    wrapped.step()
    saved = wrapped.state_dict()
    fresh = LRRewarmup(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), warmup_steps=4)
    fresh.load_state_dict(saved)
    assert fresh.get_last_lr() == pytest.approx([_ramp(1)])


def test_high_rank_restart_every_t_updates() -> None:
    model = nn.Sequential(SLTrainLinear(8, 6, rank=2, seed=0), nn.Tanh(), nn.Linear(6, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = LRRewarmup(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), warmup_steps=10)
    restarts = HighRankRestart(model, optimizer, every=3, scheduler=scheduler)
    x = torch.randn(16, 8)
    happened = []
    for _ in range(7):
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()
        before = model(x)
        happened.append(restarts.step())
        if happened[-1]:
            torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
            assert all(float(state["step"]) == 0 and not state["exp_avg"].any() for state in optimizer.state.values())
            assert scheduler.get_last_lr() == pytest.approx([1e-5])
        optimizer.zero_grad()
    assert happened == [False, False, True, False, False, True, False]
    assert restarts.state_dict() == {"num_updates": 7}


class _Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))


class _MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()


class _Block(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.input_norm = nn.RMSNorm(hidden)
        self.attn = _Attention(hidden)
        self.post_attention_norm = nn.RMSNorm(hidden)
        self.mlp = _MLP(hidden, intermediate)


class _LlamaShapes(nn.Module):
    """Module names and shapes of LLaMA (untied embeddings); no forward, only for counting."""

    def __init__(self, hidden: int, intermediate: int, layers: int, vocab: int = 32000) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_Block(hidden, intermediate) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


def test_llama_60m_parameter_count_matches_formula() -> None:
    hidden, intermediate, layers, vocab, rank, delta = 512, 1376, 8, 32000, 128, 0.03
    with torch.device("meta"):
        model = _LlamaShapes(hidden, intermediate, layers, vocab)
    report = convert_to_sltrain(model, rank=rank, delta=delta, alpha=32.0)

    shapes = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    dense_rest = 2 * vocab * hidden + (2 * layers + 1) * hidden
    sltrain_block = sum(rank * (out + inp) + int(delta * out * inp) for out, inp in shapes)
    nnz = layers * sum(int(delta * out * inp) for out, inp in shapes)
    assert report.params_before == dense_rest + layers * sum(out * inp for out, inp in shapes) == 58_073_600
    assert report.params_after == dense_rest + layers * sltrain_block == 43_529_832
    assert report.index_bytes == 4 * nnz
    assert len(report.converted) == 7 * layers and report.converted[0] == "layers.0.attn.q_proj"
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    assert isinstance(model.layers[7].mlp.down_proj, SLTrainLinear)


def test_conversion_is_deterministic_with_distinct_seeds_per_module() -> None:
    def converted(seed: int) -> _LlamaShapes:
        model = _LlamaShapes(16, 24, 2, vocab=50)
        convert_to_sltrain(model, rank=4, delta=0.1, seed=seed)
        return model

    first, second, reseeded = converted(0), converted(0), converted(1)
    for name, tensor in first.state_dict().items():
        if "attn" in name or "mlp" in name:
            assert torch.equal(tensor, second.state_dict()[name]), name
    q_indices, k_indices = first.layers[0].attn.q_proj.indices, first.layers[0].attn.k_proj.indices
    assert not torch.equal(q_indices, k_indices)
    assert not torch.equal(q_indices, reseeded.layers[0].attn.q_proj.indices)


def test_constructor_errors() -> None:
    for delta in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=re.escape(f"delta={delta!r} is outside the allowed range (0, 1)")):
            SLTrainLinear(8, 6, rank=2, delta=delta)
    for rank in (0, 7):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"rank={rank} is outside the allowed range [1, min(in_features, out_features)] = [1, 6]"
                " for in_features=8, out_features=6"
            ),
        ):
            SLTrainLinear(8, 6, rank=rank)
    with pytest.raises(ValueError, match=re.escape("alpha=-1.0 is outside the allowed range (0, inf)")):
        SLTrainLinear(8, 6, rank=2, alpha=-1.0)
    with pytest.raises(ValueError, match=re.escape("alpha=16.0 is unused with trainable_scale=True")):
        SLTrainLinear(8, 6, rank=2, alpha=16.0, trainable_scale=True)
    with pytest.raises(ValueError, match=re.escape("pass seed or generator, not both (got seed=1 and a generator)")):
        SLTrainLinear(8, 6, rank=2, seed=1, generator=torch.Generator())


def test_conversion_errors() -> None:
    model = _LlamaShapes(16, 24, 1, vocab=50)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "target_modules pattern 'self_attn' matches no module name of _LlamaShapes; module names include:"
            " 'embed_tokens', 'layers', 'layers.0', 'layers.0.input_norm'"
        ),
    ):
        convert_to_sltrain(model, rank=4, target_modules=("attn", "self_attn"))
    with pytest.raises(
        TypeError,
        match=re.escape("module 'embed_tokens' matches target_modules=('embed',) but its type is Embedding, not nn.Linear"),
    ):
        convert_to_sltrain(model, rank=4, target_modules=("embed",))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rank=17 is outside the allowed range [1, min(in_features, out_features)] = [1, 16]"
            " for module 'layers.0.attn.q_proj' in_features=16, out_features=16"
        ),
    ):
        convert_to_sltrain(model, rank=17)
    with pytest.raises(ValueError, match=re.escape("delta=1.5 is outside the allowed range (0, 1)")):
        convert_to_sltrain(model, rank=4, delta=1.5)
    assert isinstance(model.layers[0].attn.q_proj, nn.Linear)  # nothing replaced by a failed call
    convert_to_sltrain(model, rank=4)
    with pytest.raises(
        TypeError, match=re.escape("module 'layers.0.attn.q_proj' matches target_modules but is already an SLTrainLinear")
    ):
        convert_to_sltrain(model, rank=4)
    with pytest.raises(ValueError, match=re.escape("refactorize_: Linear contains no SLTrainLinear")):
        refactorize_(nn.Linear(2, 2))


def test_restart_errors() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match=re.escape("warmup_steps=0 is outside the allowed range [1, inf)")):
        LRRewarmup(scheduler, warmup_steps=0)
    with pytest.raises(ValueError, match=re.escape("start_factor=0.0 is outside the allowed range (0, 1]")):
        LRRewarmup(scheduler, start_factor=0.0)
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=re.escape("every=0 is outside the allowed range [1, inf)")):
        HighRankRestart(model, optimizer, every=0)
    with pytest.raises(ValueError, match=re.escape("refactorize=True but Linear contains no SLTrainLinear")):
        HighRankRestart(model, optimizer, every=5)
