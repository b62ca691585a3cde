"""At ZeRO-3 every matrix is cut over all ranks, so "the lowest holder computes the projector" would put
every SVD on rank 0: the owners of split matrices are spread over the ranks to balance the work."""

from __future__ import annotations

from lowrank_optim.distributed.fragment import _refresh_owners
from lowrank_optim.distributed.plan import zero3_plans


def test_zero3_refresh_owners_are_spread_and_balanced() -> None:
    shapes = [(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]
    names = [f"w{i}" for i in range(len(shapes))]
    for world in (2, 3, 4):
        numels = [-(-m * n // world) for m, n in shapes]
        plans = [zero3_plans(names, shapes, numels, world, rank) for rank in range(world)]
        owners = [_refresh_owners(plan, world) for plan in plans]
        assert all(o == owners[0] for o in owners), "every rank must make the same choice"
        assert all(mp.split for mp in plans[0].matrices)
        loads = [0] * world
        for (m, n), name in zip(shapes, names):
            loads[owners[0][name]] += m * n * min(m, n)
        assert set(owners[0].values()) == set(range(world)), f"world {world}: {owners[0]}"
        # Greedy largest-first: no rank carries more than the average plus the largest single SVD.
        assert max(loads) <= sum(loads) / world + max(m * n * min(m, n) for m, n in shapes)
        assert max(loads) < sum(loads), "not all on one rank"


def test_a_whole_matrix_is_refreshed_by_its_holder() -> None:
    from lowrank_optim.distributed.plan import zero12_plans

    # Three matrices in one ZeRO-1/2 group at 2 ranks: the middle one is cut, the others are whole.
    shapes = [(4, 4), (6, 4), (4, 4)]
    plans = [zero12_plans(["a", "b", "c"], shapes, [0, 0, 0], 28, 2, rank) for rank in range(2)]
    owners = _refresh_owners(plans[0], 2)
    by_name = {mp.name: mp for mp in plans[0].matrices}
    assert owners["a"] == 0 and owners["c"] == 1 and by_name["b"].split
    assert owners == _refresh_owners(plans[1], 2)
