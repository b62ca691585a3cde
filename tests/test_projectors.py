"""Projectors as objects: the registry and its one mapping, their state-dict form, canonical SVD signs,
the moment policies (``rotate`` against the fp64 reference), and a projector written outside the package.

The layouts (ZeRO fragments, FSDP2) run every projector and policy through their shared tables
(tests/test_distributed_fragments.py, tests/test_fsdp2.py)."""

from __future__ import annotations

import dataclasses
import io
import re
from typing import ClassVar, Sequence

import pytest
import torch
from reference import GaLoreReference
from torch import Tensor, nn

from lowrank_optim import DCTAdamW, DCTProjector, FiraAdamW, GaLoreAdamW, Projector, SVDProjector, register_projector
from lowrank_optim.projection import (
    ProjectorTensor,
    Side,
    Subspace,
    canonical_signs_,
    projector_names,
    resolve_projector,
    svd_basis,
)
from lowrank_optim.projection import projector as projector_module

SHAPES = {"tall": (12, 8), "wide": (8, 12), "square": (10, 10)}


def _grads(shape: tuple[int, int], count: int, seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(shape, generator=generator)
    return start, [torch.randn(shape, generator=generator) for _ in range(count)]


# --- the registry ------------------------------------------------------------------------------------


def test_names_resolve_to_projectors_and_back() -> None:
    assert projector_names()[0] == "svd" and "dct" in projector_names()
    assert resolve_projector("svd") == SVDProjector()
    assert resolve_projector("dct") == DCTProjector()
    lapack = SVDProjector(sign="lapack")
    assert resolve_projector(lapack) is lapack
    assert SVDProjector().to_state() == "svd"
    assert lapack.to_state() == {"name": "svd", "sign": "lapack"}
    assert resolve_projector(lapack.to_state()) == lapack
    assert resolve_projector(DCTProjector(scoring="fft").to_state()) == DCTProjector(scoring="fft")


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: resolve_projector("qr"), "Invalid projector: 'qr'. Must be one of svd, "),
        (lambda: resolve_projector(3), "Invalid projector: 3. Must be one of svd, "),
        (
            lambda: resolve_projector({"name": "svd", "signs": "x"}),
            "Invalid projector: 'svd' has no option 'signs'. Its options: sign.",
        ),
        (lambda: SVDProjector(sign="positive"), "Invalid sign: 'positive'. Must be one of canonical, lapack."),
        (lambda: DCTProjector(scoring="dft"), "Invalid scoring: 'dft'. Must be one of auto, matmul, fft."),
        (
            lambda: GaLoreAdamW(
                [{"params": [nn.Parameter(torch.zeros(4, 3))], "rank": 2, "projector": {"name": "svd", "sign": 1}}]
            ),
            "Invalid sign in param group 0: 1. Must be one of canonical, lapack.",
        ),
        (
            lambda: GaLoreAdamW([nn.Parameter(torch.zeros(4, 3))], scoring="fft"),
            "Invalid scoring: 'fft'. The 'svd' projector has no scoring option (scoring applies to projector='dct').",
        ),
        (
            lambda: DCTAdamW([nn.Parameter(torch.zeros(4, 3))], projector=DCTProjector(scoring="fft"), scoring="matmul"),
            "Invalid scoring: 'matmul' contradicts the projector's own scoring 'fft': set it on the projector only.",
        ),
        (
            lambda: GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(4, 3))], "rank": 2, "scoring": "fft"}]),
            "Invalid scoring in param group 0: 'fft'. The 'svd' projector has no scoring option",
        ),
    ],
)
def test_bad_projectors_are_refused_with_their_value(make, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_scoring_given_by_name_becomes_the_projector_option() -> None:
    weight = nn.Parameter(torch.zeros(4, 3))
    optimizer = DCTAdamW([{"params": [weight], "rank": 2}], scoring="fft")
    assert optimizer.param_groups[0]["projector"] == DCTProjector(scoring="fft")
    assert "scoring" not in optimizer.param_groups[0]
    group = GaLoreAdamW([{"params": [weight], "rank": 2, "projector": "dct", "scoring": "matmul"}]).param_groups[0]
    assert group["projector"] == DCTProjector(scoring="matmul")


def _trained(optimizer_factory, weight: Tensor, grads: list[Tensor]) -> torch.optim.Optimizer:
    optimizer = optimizer_factory([{"params": [weight], "rank": 3, "update_proj_gap": 2}])
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize(
    "projector", [SVDProjector(sign="lapack"), DCTProjector(scoring="fft"), "svd"], ids=["svd-lapack", "dct-fft", "svd"]
)
def test_state_dict_holds_plain_values_and_resumes_bit_identically(projector) -> None:
    start, grads = _grads((9, 6), 8)

    def make(groups):
        return GaLoreAdamW(groups, lr=0.01, projector=projector, moment_policy="rotate")

    straight = nn.Parameter(start.clone())
    _trained(make, straight, grads)
    resumed = nn.Parameter(start.clone())
    optimizer = _trained(make, resumed, grads[:5])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    saved = optimizer.state_dict()["param_groups"][0]["projector"]
    assert saved == resolve_projector(projector).to_state() and isinstance(saved, (str, dict))
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    weight = nn.Parameter(resumed.detach().clone())
    fresh = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 2}], lr=0.01, moment_policy="rotate")
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["projector"] == resolve_projector(projector)
    for grad in grads[5:]:
        weight.grad = grad.clone()
        fresh.step()
    assert torch.equal(weight, straight)


def test_state_dicts_of_earlier_versions_load() -> None:
    """Before projectors were objects a group held ``projector: "dct"`` and ``scoring``."""
    weight = nn.Parameter(torch.randn(9, 6))
    optimizer = _trained(lambda groups: DCTAdamW(groups, lr=0.01, scoring="matmul"), weight, _grads((9, 6), 3)[1])
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["projector"], group["scoring"] = "dct", "matmul"
    fresh = DCTAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 2}], lr=0.01)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["projector"] == DCTProjector(scoring="matmul")
    assert "scoring" not in fresh.param_groups[0]


# --- canonical signs ---------------------------------------------------------------------------------


def test_canonical_sign_makes_the_largest_entry_of_each_vector_positive() -> None:
    generator = torch.Generator().manual_seed(1)
    left, right = svd_basis(torch.randn(20, 12, generator=generator), 5, Side.FULL)
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])
    for basis, dim, flipped in ((left, 0, left * flips), (right, 1, right * flips[:, None])):
        canonical = canonical_signs_(basis.clone(), dim)
        assert torch.equal(canonical_signs_(flipped.clone(), dim), canonical)  # whatever sign came in
        top = canonical.abs().argmax(dim=dim, keepdim=True)
        assert (torch.gather(canonical, dim, top) > 0).all()


@pytest.mark.parametrize("side", [Side.LEFT, Side.RIGHT, Side.FULL])
def test_the_same_gradient_gives_the_same_signs_across_threads_and_precisions(side: Side) -> None:
    grad = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    projector = SVDProjector()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = projector.refresh(grad, 8, side, None, fused=False, first=True)
        torch.set_num_threads(2)
        two = projector.refresh(grad, 8, side, None, fused=False, first=True)
    finally:
        torch.set_num_threads(threads)
    double = projector.refresh(grad.double(), 8, side, None, fused=False, first=True)  # an fp64 SVD (svd_basis casts)
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    exact = projector.signed(u[:, :8] if side is not Side.RIGHT else None, vh[:8] if side is not Side.LEFT else None)
    for a, b, c, d in zip(one, two, double, exact):
        # LAPACK's rounding differs with the thread count (a sign rule must not hinge on a bit); the
        # canonical signs agree.
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.double(), d, atol=1e-5, rtol=0)  # fp32 vs fp64 SVD: same signs
        torch.testing.assert_close(c.double(), d, atol=1e-5, rtol=0)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("shape_kind", list(SHAPES))
def test_lapack_signs_and_canonical_signs_each_match_the_fp64_reference(proj_type: str, shape_kind: str) -> None:
    start, grads = _grads(SHAPES[shape_kind], 7)
    for sign in ("canonical", "lapack"):
        weight = nn.Parameter(start.clone())
        optimizer = GaLoreAdamW(
            [{"params": [weight], "rank": 4, "update_proj_gap": 3, "proj_type": proj_type}],
            lr=0.01,
            projector=SVDProjector(sign=sign),
            eps=1e-4 if proj_type == "full" else 1e-6,
        )
        reference = GaLoreReference(
            start, rank=4, update_proj_gap=3, proj_type=proj_type, lr=0.01, sign=sign, eps=1e-4 if proj_type == "full" else 1e-6
        )
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
            reference.update(grad)
        torch.testing.assert_close(weight.detach().double(), reference.weight, atol=2e-6, rtol=1e-5)


# --- moment policies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("projector", ["svd", "dct"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape_kind", list(SHAPES))
def test_rotate_matches_the_fp64_reference(projector: str, proj_type: str, shape_kind: str) -> None:
    """7 steps with gap 3: the moments are rotated at steps 4 and 7."""
    start, grads = _grads(SHAPES[shape_kind], 7)
    weight = nn.Parameter(start.clone())
    eps = 1e-4 if proj_type == "full" else 1e-6  # see test_galore.test_matches_fp64_reference
    group = {"params": [weight], "rank": 4, "update_proj_gap": 3, "proj_type": proj_type}
    optimizer = GaLoreAdamW([group], lr=0.01, projector=projector, moment_policy="rotate", eps=eps, weight_decay=0.1)
    reference = GaLoreReference(
        start, rank=4, update_proj_gap=3, proj_type=proj_type, projector=projector, moment_policy="rotate",
        lr=0.01, eps=eps, weight_decay=0.1,
    )
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
        reference.update(grad)
    torch.testing.assert_close(weight.detach().double(), reference.weight, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(optimizer.state[weight]["exp_avg"].double(), reference.m, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(optimizer.state[weight]["exp_avg_sq"].double(), reference.v, atol=1e-9, rtol=1e-5)


def test_rotate_is_exact_for_a_signed_permutation_and_keep_for_dct() -> None:
    """A basis whose vectors only flip and swap rotates the moments exactly (second moments included),
    and for DCT frequencies ``rotate`` is ``keep`` (frequencies that stay keep their moments)."""
    from lowrank_optim.projection import rotate_moments_, rotations

    generator = torch.Generator().manual_seed(5)
    old = torch.linalg.qr(torch.randn(7, 3, generator=generator)).Q.T.contiguous()  # 3 x 7, orthonormal rows
    new = torch.stack([-old[2], old[0], old[1]])
    m, v = torch.randn(5, 3, generator=generator), torch.rand(5, 3, generator=generator)
    (rotation,) = rotations(Subspace(Side.RIGHT, None, old), Subspace(Side.RIGHT, None, new))
    m2, v2 = m.clone(), v.clone()
    rotate_moments_(m2, v2, Side.RIGHT, [rotation])
    torch.testing.assert_close(m2, torch.stack([-m[:, 2], m[:, 0], m[:, 1]], 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(v2, torch.stack([v[:, 2], v[:, 0], v[:, 1]], 1), atol=1e-6, rtol=0)

    start, grads = _grads((12, 8), 7)
    weights = [nn.Parameter(start.clone()) for _ in range(2)]
    for weight, policy in zip(weights, ("keep", "rotate")):
        optimizer = DCTAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 2}], lr=0.01, moment_policy=policy)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
    # Equal to rounding: 1 ulp of |w| < 2 apart (seen on AVX-512 + AMX: 1.2e-7 in 1 of 96 elements).
    torch.testing.assert_close(weights[0], weights[1], atol=2.4e-7, rtol=0)


def test_fira_takes_every_policy() -> None:
    start, grads = _grads((12, 8), 7)
    results = []
    for policy in ("keep", "reset", "rotate"):
        weight = nn.Parameter(start.clone())
        optimizer = FiraAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 3}], lr=0.01, moment_policy=policy)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        assert torch.isfinite(weight).all()
        results.append(weight.detach().clone())
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


# --- a projector written outside the package -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoordinateProjector(Projector):
    """Test projector: the ``rank`` coordinate axes (columns or rows of ``G``) of largest norm."""

    name: ClassVar[str] = "coordinates"
    fixed_dtypes: ClassVar[dict[str, torch.dtype]] = {"axes": torch.int64}
    power: float = 2.0

    def tensors(self, shape, rank, side):
        return [ProjectorTensor("axes", (rank,), torch.int64, "replicated")]

    def initial(self, spec, device, ordinal=None):
        return torch.arange(spec.shape[0], device=device)

    def refresh(self, grad, rank, side, previous, *, fused, first):
        norms = grad.abs().pow(self.power).sum(dim=0 if side is Side.RIGHT else 1)
        return [norms.topk(rank).indices.sort().values]

    def subspace(self, stored: Sequence[Tensor], side, shape, rank, dtype, device):
        (axes,) = stored
        size = shape[1] if side is Side.RIGHT else shape[0]
        basis = torch.eye(size, dtype=dtype, device=device)[axes]
        return Subspace(side, basis.T if side is Side.LEFT else None, basis if side is Side.RIGHT else None)


@pytest.fixture
def coordinates():
    register_projector(CoordinateProjector)
    yield CoordinateProjector
    del projector_module._REGISTRY["coordinates"]


def test_a_registered_projector_runs_through_the_optimizer(coordinates) -> None:
    start, grads = _grads((12, 8), 5)
    weight = nn.Parameter(start.clone())
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 2, "projector": "coordinates"}], lr=0.01)
    expected = start.double().clone()
    m = v = None
    for t, grad in enumerate(grads, 1):
        if (t - 1) % 2 == 0:
            axes = grad.pow(2).sum(0).topk(3).indices.sort().values
        weight.grad = grad.clone()
        optimizer.step()
        r = grad.double()[:, axes]
        m = 0.1 * r if m is None else 0.9 * m + 0.1 * r  # "keep": the moments stay in place
        v = 0.001 * r * r if v is None else 0.999 * v + 0.001 * r * r
        step = 0.01 * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
        expected[:, axes] -= step * m / (v.sqrt() + 1e-6)
    torch.testing.assert_close(weight.detach().double(), expected, atol=1e-6, rtol=1e-5)
    assert optimizer.state[weight]["axes"].dtype == torch.int64
    assert optimizer.state_dict()["param_groups"][0]["projector"] == "coordinates"
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.state[weight]["axes"].dtype == torch.int64


# --- the randomized SVD projector ----------------------------------------------------------------------


def _low_rank_grads(shape: tuple[int, int], rank: int, count: int) -> list[Tensor]:
    """Gradients of exact rank ``rank`` with well-separated singular values, drifting from step to step."""
    generator = torch.Generator().manual_seed(11)
    values = torch.tensor([2.0**-k for k in range(rank)])
    result = []
    for _ in range(count):
        u = torch.linalg.qr(torch.randn(shape[0], rank, generator=generator)).Q
        v = torch.linalg.qr(torch.randn(shape[1], rank, generator=generator)).Q
        result.append(u @ torch.diag(values) @ v.T)
    return result


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_rsvd_finds_the_svd_basis_of_low_rank_gradients(proj_type: str) -> None:
    """Where the top-r subspace is exact (rank-r gradients), the randomized SVD, warm-started or not, gives
    the SVD's basis, signs included (both canonical), so the trajectories agree to fp32 rounding."""
    grads = _low_rank_grads((24, 16), 4, 7)
    start = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    weights = []
    for projector in ("svd", "rsvd"):
        weight = nn.Parameter(start.clone())
        optimizer = GaLoreAdamW(
            [{"params": [weight], "rank": 4, "update_proj_gap": 2, "proj_type": proj_type}],
            lr=0.01,
            projector=projector,
            eps=1e-4 if proj_type == "full" else 1e-6,  # see test_galore.test_matches_fp64_reference
        )
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        weights.append(weight.detach())
    torch.testing.assert_close(weights[1], weights[0], atol=2e-6, rtol=0)


def test_rsvd_warm_starts_from_the_basis_it_replaces() -> None:
    from lowrank_optim import RandomizedSVDProjector

    seen: list = []

    @dataclasses.dataclass(frozen=True)
    class Recording(RandomizedSVDProjector):
        def refresh(self, grad, rank, side, previous, *, fused, first):
            seen.append(None if first else [t.clone() for t in previous])
            return super().refresh(grad, rank, side, previous, fused=fused, first=first)

    weight = nn.Parameter(torch.randn(12, 8))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 2}], projector=Recording())
    bases = []
    for grad in _grads((12, 8), 5)[1]:
        weight.grad = grad
        optimizer.step()
        bases.append(optimizer.state[weight]["basis_right"].clone())
    assert seen[0] is None  # the first refresh replaces placeholders: a Gaussian start
    assert len(seen) == 3 and torch.equal(seen[1][0], bases[1]) and torch.equal(seen[2][0], bases[3])


def test_svd_and_rsvd_checkpoints_are_interchangeable() -> None:
    weight = nn.Parameter(torch.randn(12, 8))
    optimizer = _trained(lambda groups: GaLoreAdamW(groups, lr=0.01), weight, _grads((12, 8), 3)[1])
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["projector"] = "rsvd"
    fresh = GaLoreAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 2}], lr=0.01)
    fresh.load_state_dict(state)
    weight.grad = torch.randn(12, 8)
    fresh.step()  # step 4: a refresh, warm-started from the SVD's basis
    assert fresh.param_groups[0]["projector"].name == "rsvd"


@pytest.mark.parametrize(
    "options,message",
    [
        ({"oversample": -1}, "Invalid oversample: -1. Must be an int >= 0."),
        ({"warm_iterations": 1.5}, "Invalid warm_iterations: 1.5. Must be an int >= 0."),
        ({"seed": -3}, "Invalid seed: -3. Must be an int >= 0."),
        ({"sign": "up"}, "Invalid sign: 'up'. Must be one of canonical, lapack."),
    ],
)
def test_rsvd_options_are_checked(options: dict, message: str) -> None:
    from lowrank_optim import RandomizedSVDProjector

    with pytest.raises(ValueError, match=re.escape(message)):
        RandomizedSVDProjector(**options)


# --- the DCT-III basis (migration from ista-daslab-optimizers' DCTAdamW) ---------------------------------


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["right", "left"])
def test_dct_iii_basis_selects_and_projects_with_the_columns_of_the_dct_ii_matrix(shape: tuple[int, int]) -> None:
    """Basis vectors = columns of the orthonormal DCT-II matrix D (written here from its closed form):
    scores are the L1 norms of the columns of ``G D`` (right) or the rows of ``Dᵀ G`` (left), and the
    first step's moment is ``(1 - β1)·R`` with ``R = G D[:, idx]`` or ``D[:, idx]ᵀ G``."""
    from reference import dct2_matrix

    grad = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    weight = nn.Parameter(torch.zeros(shape))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3}], projector=DCTProjector(basis="iii"))
    weight.grad = grad.clone()
    optimizer.step()
    g = grad.double()
    if shape[0] >= shape[1]:
        d = dct2_matrix(shape[1])
        scores = (g @ d).abs().sum(dim=0)
        key = "dct_indices_right"
    else:
        d = dct2_matrix(shape[0])
        scores = (d.T @ g).abs().sum(dim=1)
        key = "dct_indices_left"
    chosen = sorted(sorted(range(len(scores)), key=lambda k: -float(scores[k]))[:3])
    assert optimizer.state[weight][key].tolist() == chosen
    expected = g @ d[:, chosen] if key.endswith("right") else d[:, chosen].T @ g
    torch.testing.assert_close(optimizer.state[weight]["exp_avg"].double(), 0.1 * expected, atol=1e-6, rtol=1e-5)
    assert optimizer.state_dict()["param_groups"][0]["projector"] == {"name": "dct", "scoring": "auto", "basis": "iii"}


@pytest.mark.parametrize(
    "options,message",
    [
        ({"basis": "iv"}, "Invalid basis: 'iv'. Must be one of ii, iii."),
        ({"basis": "iii", "scoring": "fft"}, "Invalid scoring: 'fft'. The 'iii' basis (DCT-III) is scored by matmul only"),
    ],
)
def test_dct_basis_options_are_checked(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        DCTProjector(**options)
