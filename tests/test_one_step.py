"""One per-matrix step for every layout: the dense optimizer and the DeepSpeed fragment layout (ZeRO-1/2
and ZeRO-3, simulated in threads) run the same function, ``galore._galore_adamw_impl``, each with its own
exchange (FSDP2's is checked by tests/test_fsdp2.py). And the fragment layout's edge: a rank whose flat
partition holds only padding still takes part in every collective."""

from __future__ import annotations

import pytest
from test_distributed_fragments import OPTIMIZERS, _run_case

from lowrank_optim.optim import galore


@pytest.fixture
def exchanges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    step = galore._galore_adamw_impl

    def recording(*args, exchange, **kwargs):
        seen.append(f"{type(exchange).__module__}.{type(exchange).__qualname__}")
        return step(*args, exchange=exchange, **kwargs)

    monkeypatch.setattr(galore, "_galore_adamw_impl", recording)
    return seen


@pytest.mark.filterwarnings("ignore:rank 3 in param group 0 exceeds")
@pytest.mark.parametrize("zero3", [False, True], ids=["zero12", "zero3"])
@pytest.mark.parametrize("name", ["galore", "fira", "dct"])
def test_dense_and_fragment_layouts_run_the_same_step(exchanges: list[str], name: str, zero3: bool) -> None:
    _run_case(OPTIMIZERS[name], [(9, 7), (7, 9)], 2, zero3=zero3, shard=zero3)
    assert set(exchanges) == {
        "lowrank_optim.optim.exchange.LocalExchange",  # the dense reference run
        "lowrank_optim.distributed.fragment._Exchange",  # every rank of the fragment run
    }


@pytest.mark.filterwarnings("ignore:rank 3 in param group 0 exceeds")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_ranks_holding_only_padding_take_part(name: str) -> None:
    """6 + 6 elements over 8 ranks of 2: ranks 6 and 7 hold padding only (one empty block each); the
    others' matrices still match the dense run (``_run_case`` compares every element)."""
    plans, _ = _run_case(OPTIMIZERS[name], [(2, 3), (3, 2)], 8, zero3=False, alignment=1)
    assert any(all(mp.piece is None for mp in plan.matrices) for plan in plans), "no rank holds only padding"


@pytest.mark.filterwarnings("ignore:rank 3 in param group 0 exceeds")
def test_fragment_moment_dtype_survives_load_state_dict() -> None:
    """The group's moment_dtype is the one rule for every layout: torch's loader casts nested state to
    the flat fp32 partition's dtype, and the fragment layout must put the group's dtype back (it used
    to put fp32 back, whatever the group said)."""
    import torch

    from lowrank_optim import GaLoreAdamW

    def make(groups):
        return GaLoreAdamW([{**g, "moment_dtype": torch.bfloat16} for g in groups], lr=1e-2)

    _, optimizers = _run_case(make, [(9, 7), (7, 9)], 2, zero3=False)
    for optimizer in optimizers:
        (state,) = optimizer.state.values()
        before = {name: m["exp_avg"].clone() for name, m in state["matrices"].items()}
        assert all(t.dtype == torch.bfloat16 for t in before.values())
        optimizer.load_state_dict(optimizer.state_dict())
        (state,) = optimizer.state.values()
        for name, matrix in state["matrices"].items():
            assert matrix["exp_avg"].dtype == matrix["exp_avg_sq"].dtype == torch.bfloat16, name
            assert torch.equal(matrix["exp_avg"], before[name])
