"""``rank="auto"``: ranks chosen from the gradients under a state budget (lowrank_optim.optim.ranks).

Checked against independent references: the allocation against a brute-force optimum, a rank change's
moments against an fp64 re-derivation of each policy, the pinned allocation against the fixed-rank step
(bitwise), the budget after every step of runs whose planted gradient ranks move, and the state-dict round
trip (bitwise continuation)."""

from __future__ import annotations

import io
import itertools
import math
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from lowrank_optim import APOLLOAdamW, Blockwise8bit, DCTAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW
from lowrank_optim.optim.ranks import allocate_ranks
from lowrank_optim.projection import Side, resize_rank, resolve_projector, resolve_side
from lowrank_optim.projection.dct import dct_matrix
from lowrank_optim.state_keys import BASIS_LEFT, BASIS_RIGHT, DCT_INDICES_LEFT, DCT_INDICES_RIGHT, EXP_AVG, EXP_AVG_SQ
from lowrank_optim.train import PerLayerUpdates

# --- the allocation rule ------------------------------------------------------------------------------


def _fractions(energies: list[Tensor], ranks: tuple[int, ...] | list[int]) -> float:
    return sum(float(e[:k].sum() / e.sum()) for e, k in zip(energies, ranks))


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_for_equal_unit_costs(seed: int) -> None:
    """With the same bytes per rank for every matrix (the same shapes), the greedy choice is the optimum of
    the integer problem; brute force over every rank vector that fits agrees on the captured fractions."""
    generator = torch.Generator().manual_seed(seed)
    energies = [torch.rand(6, generator=generator, dtype=torch.float64).sort(descending=True).values for _ in range(3)]
    per_rank = 100
    for budget in range(300, 1900, 100):
        chosen = allocate_ranks(energies, [lambda k: per_rank * k] * 3, budget)
        assert sum(chosen) * per_rank <= budget
        best = max(
            _fractions(energies, ranks) for ranks in itertools.product(range(1, 7), repeat=3) if sum(ranks) * per_rank <= budget
        )
        assert _fractions(energies, chosen) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_never_exceeds_the_budget_with_irregular_costs(seed: int) -> None:
    """Costs that jump and even drop (8-bit moments crossing their size threshold) never push the total
    charged (at least each matrix's rank-1 cost) over the budget."""
    generator = torch.Generator().manual_seed(seed)
    energies = [torch.rand(8, generator=generator).sort(descending=True).values for _ in range(4)]
    tables = [[0] + torch.randint(50, 400, (8,), generator=generator).tolist() for _ in range(4)]

    def cost(table: list[int]) -> Callable[[int], int]:
        return lambda k: table[k]

    costs = [cost(table) for table in tables]
    least = sum(table[1] for table in tables)
    for budget in range(least, least + 2000, 97):
        chosen = allocate_ranks(energies, costs, budget)
        assert all(1 <= k <= 8 for k in chosen)
        assert sum(max(table[k], table[1]) for table, k in zip(tables, chosen)) <= budget


def test_allocation_stops_where_no_energy_is_left() -> None:
    """A matrix whose gradient has rank 2 never gets more than rank 2, however large the budget."""
    energies = [torch.tensor([4.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    assert allocate_ranks(energies, [lambda k: 10 * k] * 2, 10_000) == [2, 4]


def test_allocation_prefers_energy_per_byte() -> None:
    """Of two matrices with the same spectrum, the cheaper one per rank grows first."""
    energies = [torch.tensor([1.0, 1.0, 1.0, 1.0])] * 2
    assert allocate_ranks(energies, [lambda k: 10 * k, lambda k: 30 * k], 80) == [4, 1]


def test_allocation_refuses_a_budget_below_rank_one() -> None:
    with pytest.raises(
        ValueError,
        match=r"Invalid state_budget: 15 bytes\. Rank 1 for each of these 2 matrices already needs 20 bytes: "
        r"allowed is a budget of at least 20\.",
    ):
        allocate_ranks([torch.ones(3)] * 2, [lambda k: 10 * k] * 2, 15)


# --- the energies: rounding is no direction ----------------------------------------------------------


def _exact_rank(shape: tuple[int, int], rank: int, seed: int) -> Tensor:
    """An fp32 matrix of exact rank ``rank`` whose singular values span 2 decades (its energies 4)."""
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    a = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))[0]
    return ((a * torch.logspace(0, -2, rank, dtype=torch.float64)) @ b.T).float()


@pytest.mark.parametrize("shape,rank", [((36, 28), 12), ((20, 36), 12), ((256, 688), 32), ((1024, 256), 100)])
def test_svd_energies_of_a_rank_r_gradient_have_r_nonzero_values(shape: tuple[int, int], rank: int) -> None:
    """The directions past a gradient's rank come out of fp32 at about eps·||G||²; they are reported as 0
    (``without_rounding_noise``), and the r real ones, down to 1e-4 of the largest, are kept (the floor is
    ``sqrt(max(m, n)) · eps`` of the total, 7e-7 to 4e-6 here; the smallest real one holds 2e-5 to 4e-5)."""
    grad = _exact_rank(shape, rank, seed=rank)
    energies = resolve_projector("svd").energies(grad, resolve_side("std", shape))
    assert int((energies > 0).sum()) == rank, energies[rank - 2 : rank + 2]
    expected = torch.logspace(0, -4, rank, dtype=torch.float64)  # the squared singular values
    torch.testing.assert_close(energies[:rank].double(), expected, rtol=1e-4, atol=1e-7 * float(expected.sum()))


@pytest.mark.parametrize("side", ["right", "left"])
def test_dct_energies_of_r_frequencies_have_r_nonzero_values(side: str) -> None:
    """A gradient made of 5 DCT frequencies along the projected side has 5 nonzero energies."""
    generator = torch.Generator().manual_seed(3)
    basis = dct_matrix(40, torch.float64, torch.device("cpu"))  # rows are the frequencies
    picked = torch.tensor([0, 3, 7, 21, 39])
    grad = (torch.randn(24, 5, generator=generator, dtype=torch.float64) @ basis[picked]).float()
    grad = grad if side == "right" else grad.T.contiguous()
    energies = resolve_projector("dct").energies(grad, Side.RIGHT if side == "right" else Side.LEFT)
    assert int((energies > 0).sum()) == 5, energies[:8]


def test_ranks_do_not_depend_on_how_the_gradient_was_summed() -> None:
    """With a budget far above need, each matrix gets its gradient's rank exactly, whether the gradient is
    one product or the mean of two halves (as an all-reduce over two ranks forms it): budget is never
    spent on rounding, so the ranks of a distributed run are those of one process."""
    shapes, ranks = [(36, 28), (20, 36), (28, 10)], [12, 7, 4]
    results = []
    for halves in (False, True):
        params = [nn.Parameter(torch.zeros(shape)) for shape in shapes]
        optimizer = GaLoreAdamW([{"params": params, "rank": "auto", "state_budget": 10**7, "update_proj_gap": 5}], lr=1e-3)
        for p, shape, rank in zip(params, shapes, ranks):
            whole = _exact_rank(shape, rank, seed=rank)
            if halves:
                # Two slices whose mean is the same gradient up to the rounding of the sum.
                part = _exact_rank(shape, rank, seed=rank + 100) * 1e-3
                whole = ((whole + part) + (whole - part)) / 2
            p.grad = whole
        optimizer.step()
        results.append([optimizer.state[p]["matrix_rank"] for p in params])
    assert results == [ranks, ranks]


# --- optimizers with rank="auto" ----------------------------------------------------------------------

SHAPES = [(24, 16), (12, 30), (20, 20)]


def _planted(step: int, shape: tuple[int, int], rank: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A gradient of (nearly) exact rank ``rank``: its spectrum says which rank the allocation should give."""
    generator = torch.Generator().manual_seed(1000 * step + shape[0] * 7 + shape[1])
    m, n = shape
    a = torch.randn(m, rank, generator=generator, dtype=torch.float64)
    b = torch.randn(rank, n, generator=generator, dtype=torch.float64)
    noise = 1e-3 * torch.randn(m, n, generator=generator, dtype=torch.float64)
    return (a @ b + noise).to(dtype)


def _params(shapes: list[tuple[int, int]] = SHAPES, seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]


def _held_bytes(optimizer: GaLoreAdamW, group_index: int = 0) -> int:
    group = optimizer.param_groups[group_index]
    return sum(
        optimizer.rank_state_bytes(group, p, optimizer.state[p]["matrix_rank"]) for p in group["params"] if p in optimizer.state
    )


def _rank_tensor_bytes(optimizer: GaLoreAdamW, param: Tensor) -> int:
    """Bytes of the budgeted tensors really held for ``param`` (everything but the step and limiters)."""
    fixed = {"step", "residual_norm", "update_norm"}
    state = optimizer.state[param]
    return sum(v.numel() * v.element_size() for k, v in state.items() if isinstance(v, Tensor) and k not in fixed)


def _uniform_bytes(optimizer: GaLoreAdamW, params: list[nn.Parameter], rank: int) -> int:
    group = optimizer.param_groups[0]
    return sum(optimizer.rank_state_bytes(group, p, min(rank, *p.shape)) for p in params)


OPTIMIZERS: dict[str, tuple[type[GaLoreAdamW], dict[str, Any]]] = {
    "galore-svd": (GaLoreAdamW, {}),
    "galore-rsvd": (GaLoreAdamW, {"projector": "rsvd"}),
    "galore-left": (GaLoreAdamW, {"proj_type": "left"}),
    "galore-full": (GaLoreAdamW, {"proj_type": "full"}),
    "dct": (DCTAdamW, {}),
    "fira": (FiraAdamW, {}),
    "apollo": (APOLLOAdamW, {}),
}


def _policies(name: str) -> list[str]:
    return ["keep", "reset"] if name == "apollo" else ["keep", "rotate", "reset"]  # a random basis does not rotate


CASES = [(name, policy) for name in OPTIMIZERS for policy in _policies(name)]


@pytest.mark.parametrize("name,policy", CASES)
def test_pinned_allocation_equals_the_fixed_rank_step_bitwise(name: str, policy: str) -> None:
    """Identical matrices with identical gradients and a budget of exactly rank 3 each: the allocation
    gives every matrix rank 3 at every refresh, and the run equals the fixed-rank run bit for bit (the
    first refresh builds the state at its rank from rank 0; later ones keep it)."""
    cls, options = OPTIMIZERS[name]
    shape = (18, 12)
    fixed_params, auto_params = _params([shape] * 3), _params([shape] * 3)
    common = {"update_proj_gap": 2, "moment_policy": policy, **options}
    fixed = cls([{"params": fixed_params, "rank": 3, **common}], lr=1e-2, weight_decay=0.01)
    budget = _uniform_bytes(fixed, fixed_params, 3)
    auto = cls([{"params": auto_params, "rank": "auto", "state_budget": budget, **common}], lr=1e-2, weight_decay=0.01)
    for step in range(7):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        for params in (fixed_params, auto_params):
            for p in params:
                p.grad = grad.clone()
        fixed.step()
        auto.step()
        assert [auto.state[p]["matrix_rank"] for p in auto_params] == [3, 3, 3]
    for p, q in zip(fixed_params, auto_params):
        assert torch.equal(p, q)
        for key, value in fixed.state[p].items():
            assert torch.equal(value, auto.state[q][key]), key


def _right_basis(state: dict[str, Any], side: Side, n: int) -> Tensor | None:
    if BASIS_RIGHT in state:
        return state[BASIS_RIGHT].double()
    if DCT_INDICES_RIGHT in state:
        return dct_matrix(n, torch.float64, torch.device("cpu"))[state[DCT_INDICES_RIGHT]]
    return None


def _left_basis(state: dict[str, Any], side: Side, m: int) -> Tensor | None:
    if BASIS_LEFT in state:
        return state[BASIS_LEFT].double()
    if DCT_INDICES_LEFT in state:
        return dct_matrix(m, torch.float64, torch.device("cpu"))[state[DCT_INDICES_LEFT]].T
    return None


def _expected_moments(
    before: dict[str, Any], after: dict[str, Any], grad: Tensor, side: Side, policy: str, dct: bool, betas: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """The moments after a refresh that changed the rank, re-derived in fp64 from the documented rules."""
    m, n = grad.shape
    g = grad.double()
    left, right = _left_basis(after, side, m), _right_basis(after, side, n)
    old_left, old_right = _left_basis(before, side, m), _right_basis(before, side, n)
    r = g
    if left is not None:
        r = left.T @ r
    if right is not None:
        r = r @ right.T
    new_rank = after["matrix_rank"]
    exp_avg, exp_avg_sq = before[EXP_AVG].double(), before[EXP_AVG_SQ].double()
    if policy == "reset":
        carried_m, carried_v = torch.zeros_like(r), torch.zeros_like(r)
    elif policy == "rotate":
        carried_m, carried_v = exp_avg, exp_avg_sq
        if left is not None:
            c = old_left.T @ left
            carried_m, carried_v = c.T @ carried_m, (c * c).T @ carried_v
        if right is not None:
            c = old_right @ right.T
            carried_m, carried_v = carried_m @ c, carried_v @ (c * c)
    elif dct:  # keep: a frequency keeps its moments at its new position, new ones start at zero
        carried_m, carried_v = exp_avg, exp_avg_sq
        for dim, key in ((0, DCT_INDICES_LEFT), (1, DCT_INDICES_RIGHT)):
            if key not in after:
                continue
            old, new = before[key].tolist(), after[key].tolist()
            columns_m, columns_v = [], []
            for frequency in new:
                if frequency in old:
                    columns_m.append(carried_m.select(dim, old.index(frequency)))
                    columns_v.append(carried_v.select(dim, old.index(frequency)))
                else:
                    columns_m.append(torch.zeros_like(carried_m.select(dim, 0)))
                    columns_v.append(torch.zeros_like(carried_v.select(dim, 0)))
            carried_m, carried_v = torch.stack(columns_m, dim), torch.stack(columns_v, dim)
    else:  # keep, positionally
        carried_m, carried_v = resize_rank(exp_avg, side, new_rank), resize_rank(exp_avg_sq, side, new_rank)
    beta1, beta2 = betas
    return beta1 * carried_m + (1 - beta1) * r, beta2 * carried_v + (1 - beta2) * r * r


@pytest.mark.parametrize(
    "name,policy", [(name, policy) for name in ("galore-svd", "galore-left", "galore-full", "dct") for policy in _policies(name)]
)
def test_a_rank_change_moves_the_moments_by_the_policy(name: str, policy: str) -> None:
    """Matrices whose planted gradient ranks swap between refreshes change rank; after the refresh their
    moments equal an fp64 re-derivation of the policy (positional keep, DCT frequencies, rotation by the
    ``r_old x r_new`` change of coordinates, reset) followed by the ordinary moment update, and an SVD
    basis spans the new gradient's top singular subspace."""
    cls, options = OPTIMIZERS[name]
    shapes = [(24, 16), (16, 20)]
    params = _params(shapes)
    betas = (0.9, 0.99)
    # Room for rank 4 each plus one more rank-1 each: planted ranks 1 and 6 make it uneven, and it turns.
    probe = cls([{"params": _params(shapes), "rank": 1, **options}])
    budget = _uniform_bytes(probe, params, 4) + _uniform_bytes(probe, params, 1)
    optimizer = cls(
        [{"params": params, "rank": "auto", "update_proj_gap": 2, "moment_policy": policy, "state_budget": budget, **options}],
        lr=1e-2,
        betas=betas,
    )
    changed = 0
    for step in range(7):
        ranks = [1, 6] if step < 4 else [6, 1]
        grads = [_planted(step, shape, k) for shape, k in zip(shapes, ranks)]
        before = (
            [{k: (v.clone() if isinstance(v, Tensor) else v) for k, v in optimizer.state[p].items()} for p in params]
            if step
            else None
        )
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        if before is None or step % 2:
            continue
        for p, g, old in zip(params, grads, before):
            state = optimizer.state[p]
            if state["matrix_rank"] == old["matrix_rank"]:
                continue
            changed += 1
            side = resolve_side(options.get("proj_type", "std"), tuple(p.shape))
            exp_avg, exp_avg_sq = _expected_moments(old, state, g, side, policy, name == "dct", betas)
            torch.testing.assert_close(state[EXP_AVG].double(), exp_avg, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state[EXP_AVG_SQ].double(), exp_avg_sq, rtol=1e-5, atol=1e-6)
            if BASIS_RIGHT in state or BASIS_LEFT in state:
                u, _, vh = torch.linalg.svd(g.double())
                k = state["matrix_rank"]
                for basis, top in (
                    (_left_basis(state, side, p.shape[0]), u[:, :k]),
                    (_right_basis(state, side, p.shape[1]), vh[:k].T),
                ):
                    if basis is not None:
                        vectors = basis if basis.shape[0] == top.shape[0] else basis.T
                        torch.testing.assert_close(vectors @ vectors.T, top @ top.T, atol=1e-4, rtol=0)
    assert changed >= 2  # the ranks really moved (both matrices at the swap)


@pytest.mark.parametrize("fmt", ["full", "8bit"])
@pytest.mark.parametrize("name", ["galore-svd", "galore-full", "dct", "fira", "apollo"])
def test_the_budget_holds_after_every_step_and_is_counted_exactly(name: str, fmt: str) -> None:
    """Planted gradient ranks that move at every refresh: after every step the state held is within the
    budget, each matrix's tensors take exactly the bytes ``rank_state_bytes`` counts, and the ranks differ
    between matrices and over time (the test is not vacuous)."""
    cls, options = OPTIMIZERS[name]
    params = _params()
    moment_format = Blockwise8bit(block_size=8, min_size=64) if fmt == "8bit" else "full"
    probe = cls([{"params": _params(), "rank": 1, "moment_format": moment_format, **options}])
    budget = _uniform_bytes(probe, params, 5)
    optimizer = cls(
        [
            {
                "params": params,
                "rank": "auto",
                "state_budget": budget,
                "update_proj_gap": 2,
                "moment_format": moment_format,
                **options,
            }
        ],
        lr=1e-2,
    )
    seen: set[tuple[int, ...]] = set()
    for step in range(14):
        planted = [(step // 2 + 3 * i) % 9 + 1 for i in range(len(SHAPES))]
        for p, shape, k in zip(params, SHAPES, planted):
            p.grad = _planted(step, shape, k)
        optimizer.step()
        assert _held_bytes(optimizer) <= budget
        for p in params:
            assert _rank_tensor_bytes(optimizer, p) == optimizer.rank_state_bytes(
                optimizer.param_groups[0], p, optimizer.state[p]["matrix_rank"]
            )
        seen.add(tuple(optimizer.state[p]["matrix_rank"] for p in params))
    assert len(seen) >= 3 and any(len(set(ranks)) > 1 for ranks in seen)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("fmt", ["full", "8bit"])
@pytest.mark.parametrize("name", ["galore-svd", "dct", "fira"])
def test_state_dict_round_trip_continues_bitwise(name: str, fmt: str) -> None:
    """Saved after the ranks moved, loaded with ``torch.load(weights_only=True)`` into a fresh optimizer:
    the continued runs are bit-identical, ranks and state included."""
    cls, options = OPTIMIZERS[name]
    moment_format = Blockwise8bit(block_size=8, min_size=64) if fmt == "8bit" else "full"

    def make(params: list[nn.Parameter]) -> GaLoreAdamW:
        probe = cls([{"params": _params(), "rank": 1, "moment_format": moment_format, **options}])
        budget = _uniform_bytes(probe, params, 4)
        group = {"params": params, "rank": "auto", "state_budget": budget, "update_proj_gap": 2, "moment_format": moment_format}
        return cls([{**group, **options}], lr=1e-2)

    def step(optimizer: GaLoreAdamW, params: list[nn.Parameter], t: int) -> None:
        for p, shape, i in zip(params, SHAPES, range(3)):
            p.grad = _planted(t, shape, (t + 4 * i) % 7 + 1)
        optimizer.step()

    params = _params()
    optimizer = make(params)
    for t in range(5):
        step(optimizer, params, t)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [nn.Parameter(value.clone()) for value in saved["params"]]
    resumed = make(resumed_params)
    resumed.load_state_dict(saved["optimizer"])
    for t in range(5, 11):
        step(optimizer, params, t)
        step(resumed, resumed_params, t)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        original, loaded = optimizer.state[p], resumed.state[q]
        assert set(original) == set(loaded)
        for key, value in original.items():
            if isinstance(value, Tensor):
                assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
            else:
                assert loaded[key] == value, key


def test_a_nonfinite_gradient_at_a_refresh_keeps_that_matrix_and_the_budget() -> None:
    """A NaN gradient at a refresh: that matrix keeps its rank and state (skipped, retried next step);
    the others are allocated with its bytes charged, so the budget still holds."""
    params = _params()
    probe = GaLoreAdamW([{"params": _params(), "rank": 1}])
    budget = _uniform_bytes(probe, params, 4)
    optimizer = GaLoreAdamW([{"params": params, "rank": "auto", "state_budget": budget, "update_proj_gap": 2}], lr=1e-2)
    for t in range(2):
        for p, shape in zip(params, SHAPES):
            p.grad = _planted(t, shape, 3)
        optimizer.step()
    kept = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in optimizer.state[params[1]].items()}
    for p, shape, k in zip(params, SHAPES, [8, 1, 8]):
        p.grad = _planted(2, shape, k)
    params[1].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/Inf arrived at a projector refresh"):
        optimizer.step()
    assert _held_bytes(optimizer) <= budget
    assert optimizer.state[params[1]]["matrix_rank"] == kept["matrix_rank"]
    for key, value in kept.items():
        now = optimizer.state[params[1]][key]
        assert torch.equal(now, value) if isinstance(value, Tensor) else now == value
    for p, shape in zip(params, SHAPES):
        p.grad = _planted(3, shape, 2)
    optimizer.step()  # the retried refresh of matrix 1
    assert _held_bytes(optimizer) <= budget


def test_full_rank_groups_and_fixed_rank_groups_are_untouched() -> None:
    """An auto group next to a fixed-rank and a full-rank group: those keep their state keys and shapes."""
    auto, fixed, dense = _params(seed=1), _params(seed=2), [nn.Parameter(torch.randn(7))]
    probe = GaLoreAdamW([{"params": _params(), "rank": 1}])
    optimizer = GaLoreAdamW(
        [
            {"params": auto, "rank": "auto", "state_budget": _uniform_bytes(probe, auto, 3), "update_proj_gap": 2},
            {"params": fixed, "rank": 3, "update_proj_gap": 2},
            {"params": dense},
        ],
        lr=1e-2,
    )
    for t in range(3):
        for p, shape, k in zip(auto + fixed, SHAPES * 2, [1, 5, 2] * 2):
            p.grad = _planted(t, shape, k)
        dense[0].grad = torch.ones(7)
        optimizer.step()
    assert all("matrix_rank" not in optimizer.state[p] for p in fixed + dense)
    assert [optimizer.state[p][EXP_AVG].shape for p in fixed] == [(24, 3), (3, 30), (20, 3)]
    assert len({optimizer.state[p]["matrix_rank"] for p in auto}) > 1


# --- refusals -----------------------------------------------------------------------------------------


def _group(**options: Any) -> list[dict[str, Any]]:
    return [{"params": _params(), **options}]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"rank": "auto"}, "Invalid state_budget in param group 0: None. rank='auto' needs state_budget, a positive integer"),
        ({"rank": "auto", "state_budget": 0}, "Invalid state_budget in param group 0: 0. rank='auto' needs state_budget"),
        ({"rank": "auto", "state_budget": 1.5e6}, "Invalid state_budget in param group 0: 1500000.0. rank='auto' needs"),
        ({"rank": "auto", "state_budget": True}, "Invalid state_budget in param group 0: True. rank='auto' needs"),
        (
            {"rank": "Auto"},
            "Invalid rank in param group 0: 'Auto'. Must be a positive integer. Also allowed: 'auto' with a state_budget",
        ),
        (
            {"rank": 4, "state_budget": 1000},
            "Invalid state_budget in param group 0: 1000. It is read only with rank='auto' (this group has rank 4)",
        ),
        (
            {"rank": "auto", "state_budget": 100},
            "Invalid state_budget in param group 0: 100. Rank 1 for each of its 3 matrices already needs",
        ),
    ],
)
def test_bad_options_are_refused_by_name(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=_literal(message)):
        GaLoreAdamW(_group(**options))


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_the_minimum_budget_message_names_the_bytes() -> None:
    probe = GaLoreAdamW([{"params": _params(), "rank": 1}])
    least = _uniform_bytes(probe, probe.param_groups[0]["params"], 1)
    with pytest.raises(ValueError, match=_literal(f"already needs {least} bytes of state: allowed is at least {least}.")):
        GaLoreAdamW(_group(rank="auto", state_budget=least - 1))
    GaLoreAdamW(_group(rank="auto", state_budget=least))


def test_adafactor_refuses_auto() -> None:
    with pytest.raises(
        ValueError, match=_literal("Invalid rank in param group 0: 'auto'. GaLoreAdafactor keeps one rank per group")
    ):
        GaLoreAdafactor(_group(rank="auto", state_budget=10**6))


def test_per_layer_updates_refuse_an_auto_group() -> None:
    optimizer = GaLoreAdamW(_group(rank="auto", state_budget=10**6))
    with pytest.raises(ValueError, match=_literal("PerLayerUpdates cannot step param group 0: its rank is 'auto'")):
        PerLayerUpdates(optimizer)


def test_a_layout_without_adaptive_ranks_refuses_auto() -> None:
    """Sharded layouts (FSDP2, DeepSpeed ZeRO) do not yet rebuild state at a new rank: refused at the step,
    before anything is updated."""
    params = _params()
    optimizer = GaLoreAdamW([{"params": params, "rank": "auto", "state_budget": 10**6}])

    class Layout(type(optimizer.layout)):  # type: ignore[misc]
        steps_adaptive_ranks = False

    optimizer.layout = Layout()
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(
        ValueError, match=_literal("Invalid rank in param group 0: 'auto'. Adaptive ranks are not yet supported under Layout")
    ):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not optimizer.state


def test_rank_state_bytes_matches_every_projector_and_format() -> None:
    """The counted bytes equal the tensors a fixed-rank optimizer builds at that rank (the one rule)."""
    for projector, proj_type, fmt in itertools.product(["svd", "dct", "random"], ["std", "left", "full"], ["full", "8bit"]):
        params = _params()
        moment_format = Blockwise8bit(block_size=8, min_size=64) if fmt == "8bit" else "full"
        for rank in (1, 4, 9):
            optimizer = GaLoreAdamW(
                [{"params": params, "rank": rank, "projector": projector, "proj_type": proj_type, "moment_format": moment_format}]
            )
            for p in params:
                p.grad = torch.randn(p.shape)
            optimizer.step()
            for p in params:
                counted = optimizer.rank_state_bytes(optimizer.param_groups[0], p, min(rank, *p.shape))
                assert _rank_tensor_bytes(optimizer, p) == counted, (projector, proj_type, fmt, rank)
            assert math.isfinite(float(params[0].detach().sum()))


def test_set_matrix_rank_rebuilds_zero_state_at_the_rank_and_refuses_what_it_cannot() -> None:
    """What :func:`lowrank_optim.distributed.dcp.match_saved_ranks` relies on: the state at the new rank
    is what a fixed-rank optimizer of that rank builds (shapes, dtypes), and every bad call is refused
    by name before anything changes."""
    params = _params()
    optimizer = GaLoreAdamW(_group(rank="auto", state_budget=10**6))
    with pytest.raises(ValueError, match=_literal("set_matrix_rank: the matrix (shape (24, 16)) has no state yet")):
        optimizer.set_matrix_rank(optimizer.param_groups[0]["params"][0], 2)
    params = optimizer.param_groups[0]["params"]
    for p in params:
        p.grad = torch.randn(p.shape)
    optimizer.step()
    target = params[0]
    step = optimizer.state[target]["step"].clone()
    optimizer.set_matrix_rank(target, 5)
    fixed = GaLoreAdamW([{"params": [nn.Parameter(target.detach().clone())], "rank": 5}])
    fixed.param_groups[0]["params"][0].grad = torch.randn(target.shape)
    fixed.step()
    expected = fixed.state[fixed.param_groups[0]["params"][0]]
    held = optimizer.state[target]
    assert held["matrix_rank"] == 5 and torch.equal(held["step"], step)
    for key, value in expected.items():
        if isinstance(value, Tensor) and key != "step":
            assert held[key].shape == value.shape and held[key].dtype == value.dtype, key
            assert not held[key].any(), key
    too_large = "Invalid rank for a matrix of shape (24, 16): 17. Must be an integer in [0, 16]"
    with pytest.raises(ValueError, match=_literal(too_large)):
        optimizer.set_matrix_rank(target, 17)
    with pytest.raises(ValueError, match=_literal("Invalid rank for a matrix of shape (24, 16): True.")):
        optimizer.set_matrix_rank(target, True)
    with pytest.raises(ValueError, match=_literal("set_matrix_rank: the tensor (shape (3, 3)) is not in this optimizer's")):
        optimizer.set_matrix_rank(nn.Parameter(torch.zeros(3, 3)), 1)
    fixed_group = fixed.param_groups[0]["params"][0]
    fixed_rank = "set_matrix_rank: param group 0 has rank 5; allowed: a group with rank='auto'"
    with pytest.raises(ValueError, match=_literal(fixed_rank)):
        fixed.set_matrix_rank(fixed_group, 2)
    assert held["matrix_rank"] == 5


def test_match_saved_ranks_refuses_a_state_dict_of_another_optimizer(tmp_path: Any) -> None:
    from lowrank_optim.distributed.dcp import match_saved_ranks

    optimizer = GaLoreAdamW(_group(rank="auto", state_budget=10**6))
    with pytest.raises(ValueError, match=_literal("match_saved_ranks: optim_state_dict has no param groups, the optimizer 1")):
        match_saved_ranks(optimizer, {}, tmp_path)
    fixed = GaLoreAdamW(_group(rank=2))
    assert match_saved_ranks(fixed, fixed.state_dict(), tmp_path) == 0  # nothing auto: nothing read


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_round_trip_in_one_process_continues_bitwise(tmp_path: Any) -> None:
    """``get_state_dict`` / ``match_saved_ranks`` / ``dcp.load`` / ``set_state_dict`` without a process
    group: a fresh optimizer (whose first state is at other ranks) continues bit for bit; a checkpoint
    of a fixed-rank group is refused by name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lowrank_optim.distributed.dcp import match_saved_ranks

    def model_and_optimizer(rank: Any = "auto") -> tuple[nn.Module, GaLoreAdamW]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 24, bias=False), nn.Linear(24, 12, bias=False), nn.Linear(12, 20, bias=False))
        options = {"state_budget": 1500} if rank == "auto" else {}
        return model, GaLoreAdamW([{"params": list(model.parameters()), "rank": rank, "update_proj_gap": 2, **options}], lr=1e-2)

    def train(model: nn.Module, optimizer: GaLoreAdamW, steps: range) -> None:
        for step in steps:
            generator = torch.Generator().manual_seed(step)
            x = torch.randn(8, 16, generator=generator)
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    model, optimizer = model_and_optimizer()
    train(model, optimizer, range(5))
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path / "auto"))
    saved_ranks = [optimizer.state[p]["matrix_rank"] for p in model.parameters()]
    train(model, optimizer, range(5, 9))

    fresh, fresh_optimizer = model_and_optimizer()
    model_state, optim_state = get_state_dict(fresh, fresh_optimizer)
    initial_ranks = [fresh_optimizer.state[p]["matrix_rank"] for p in fresh.parameters()]
    assert initial_ranks != saved_ranks  # the load has something to rebuild
    rebuilt = match_saved_ranks(fresh_optimizer, optim_state, tmp_path / "auto")
    assert rebuilt == sum(a != b for a, b in zip(initial_ranks, saved_ranks))
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(tmp_path / "auto"))
    set_state_dict(fresh, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(fresh, fresh_optimizer, range(5, 9))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))

    fixed, fixed_optimizer = model_and_optimizer(rank=3)
    train(fixed, fixed_optimizer, range(1))
    model_state, optim_state = get_state_dict(fixed, fixed_optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path / "fixed"))
    other, other_optimizer = model_and_optimizer()
    _, optim_state = get_state_dict(other, other_optimizer)
    not_auto = "has no optim.state.0.weight.matrix_rank: it was not saved from a rank='auto' group"
    with pytest.raises(ValueError, match=_literal(not_auto)):
        match_saved_ranks(other_optimizer, optim_state, tmp_path / "fixed")
