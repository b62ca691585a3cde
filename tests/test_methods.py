"""The methods registry (lowrank_optim.train.methods): one entry per method drives presets, model and
optimizer building, the estimator, the CLI and the DeepSpeed plugin; a new method is one registration."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lowrank_optim import GaLoreAdamW, optimizer_state_bytes
from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.distributed import plugin
from lowrank_optim.estimate import estimate_memory
from lowrank_optim.models import LlamaConfig
from lowrank_optim.nn import SLTrainLinear, sample_support, support_size
from lowrank_optim.train import methods as registry
from lowrank_optim.train.methods import (
    METHODS,
    PROJECTED_FIELDS,
    Method,
    MethodPreset,
    build_model,
    build_optimizer,
    check_methods_available,
    load_presets,
    register_method,
)
from lowrank_optim.train.pretrain import TrainSettings, pretrain

TEST = LlamaConfig.from_name_or_path("test")


def assert_estimate_is_exact(preset: MethodPreset) -> None:
    """The estimator's state bytes equal the real optimizer's after one step of the built model."""
    model = build_model(TEST, preset=preset)
    optimizer = build_optimizer(model, preset)
    batch = torch.randint(0, TEST.vocab_size, (2, 17))
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    assert estimate_memory(TEST, preset, dtype=torch.float32).state_bytes == optimizer_state_bytes(optimizer)


@pytest.fixture
def scratch_registry() -> Iterator[None]:
    """Methods registered inside a test are removed after it."""
    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def test_builtin_methods_in_registration_order() -> None:
    assert list(METHODS) == ["adamw", "galore", "fira", "dct", "sltrain", "apollo"]
    with pytest.raises(TypeError):
        METHODS["lion"] = METHODS["adamw"]  # type: ignore[index]
    assert [m.name for m in METHODS.values() if m.projects] == ["galore", "fira", "dct", "apollo"]
    assert [m.name for m in METHODS.values() if m.layer is not None] == ["sltrain"]


def test_plugin_optimizers_come_from_the_registry() -> None:
    expected = {m.deepspeed_optimizer: m.optimizer for m in METHODS.values() if m.deepspeed_optimizer}
    assert plugin.OPTIMIZERS == expected
    assert list(plugin.OPTIMIZERS) == ["galore_adamw", "fira_adamw", "dct_adamw", "apollo_adamw"]


@pytest.mark.parametrize("projector", ["svd", "rsvd", "random", "dct"])
def test_estimate_counts_the_presets_projector(projector: str) -> None:
    """The projection row comes from the projector's own tensors: a basis, indices or a seed."""
    base = load_presets("test")["galore"]
    preset = MethodPreset(**{**base.to_dict(), "projector": projector})
    assert_estimate_is_exact(preset)


def test_a_new_method_is_one_registration(scratch_registry: None, tmp_path: Path) -> None:
    """Registered once, a method has presets, a model, an optimizer, an exact estimate, a CLI name and a
    pretraining run, with nothing else edited."""
    method = register_method(
        Method(
            name="galore_rsvd",
            summary="GaLore with the randomized SVD by default",
            fields=PROJECTED_FIELDS,
            optimizer=functools.partial(GaLoreAdamW, projector="rsvd"),
            projects=True,
            projector="rsvd",
        )
    )
    assert METHODS["galore_rsvd"] is method
    presets_file = tmp_path / "mine.json"
    presets_file.write_text(json.dumps({"galore_rsvd": {"lr": 0.01, "rank": 8, "scale": 0.25, "update_proj_gap": 2},
                                        "adamw": {"lr": 0.001}}))
    presets = load_presets(presets_file)
    assert list(presets) == ["adamw", "galore_rsvd"]  # registration order, not the file's
    preset = presets["galore_rsvd"]
    assert_estimate_is_exact(preset)
    stream = TokenStream(stdlib_corpus()[:20000], 16)
    settings = TrainSettings(steps=2, batch_size=2, seq_len=16, eval_batches=1, measure_memory=False)
    result = pretrain(TEST, preset, stream, settings, log=lambda line: None)
    assert result["method"] == "galore_rsvd" and result["final_eval_loss"] < result["initial_eval_loss"]
    from lowrank_optim.__main__ import build_parser

    args = build_parser().parse_args(["compare", "--methods", "galore_rsvd"])
    assert args.methods == ["galore_rsvd"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"name": "GaLore"}, "method name ('GaLore') must be lower-case letters, digits and '_'"),
        ({"name": "a+b"}, "method name ('a+b') must be"),
        ({"fields": ("rank", "beta")}, "method 'm': fields ['beta'] must be drawn from ['rank', 'scale', "),
        ({"fields": ("projector",)}, "fields ['projector'] must be drawn from"),
        ({"projects": True, "fields": ("rank",), "projector": "svd"},
         "projects, so its fields must include ['scale', 'update_proj_gap']"),
        ({"projects": True, "fields": PROJECTED_FIELDS, "projector": "qr"},
         "projector ('qr') must be one of ['svd', 'rsvd', 'dct', 'random']"),
        ({"projector": "svd"}, "method 'm' does not project: projector, projector_option and matrix_scalar_bytes do not apply"),
        ({"matrix_scalar_bytes": -4}, "matrix_scalar_bytes (-4) must be >= 0"),
    ],
)
def test_method_refusals(options: dict, message: str) -> None:
    fields = dict(name="m", summary="s", optimizer=torch.optim.AdamW)
    fields.update(options)
    with pytest.raises(ValueError, match=re.escape(message)):
        Method(**fields)


def test_a_method_cannot_project_and_replace_layers() -> None:
    with pytest.raises(ValueError, match="cannot both project the target matrices and replace their layers"):
        Method(name="m", summary="s", optimizer=GaLoreAdamW, fields=PROJECTED_FIELDS, projects=True, projector="svd",
               layer=lambda *args: torch.nn.Identity())


def test_registration_refusals() -> None:
    with pytest.raises(ValueError, match=re.escape("method 'galore' is already registered; registered: ['adamw', 'galore'")):
        register_method(METHODS["galore"])
    with pytest.raises(TypeError, match="register_method expects a Method, got dict"):
        register_method({"name": "x"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "adamw", "lr": 1e-3, "rank": 8},
         "preset of method 'adamw' sets ['rank'], which it does not use; its fields: []"),
        ({"method": "sltrain", "lr": 1e-3, "rank": 8, "alpha": 2.0, "delta": 0.03, "scale": 1.0},
         "preset of method 'sltrain' sets ['scale']"),
        ({"method": "apollo", "lr": 1e-2, "rank": 8, "scale": 1.0}, "preset of method 'apollo' is missing ['update_proj_gap']"),
        ({"method": "dct", "lr": 1e-2, "rank": 8, "scale": 1.0, "update_proj_gap": 2, "projector": "svd"},
         "projector ('svd') applies to methods galore, fira, apollo, not 'dct'"),
        ({"method": "lion", "lr": 1e-3},
         "method ('lion') must be one of ['adamw', 'galore', 'fira', 'dct', 'sltrain', 'apollo']"),
    ],
)
def test_preset_refusals(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        MethodPreset(**fields)


def test_presets_files_may_leave_methods_out() -> None:
    sixty = load_presets("60m")
    assert "apollo" not in sixty and list(sixty) == ["adamw", "galore", "fira", "dct", "sltrain"]
    check_methods_available(["galore"], sixty, "60m")
    with pytest.raises(ValueError, match=re.escape(
        "--methods (['galore', 'apollo']): presets '60m' have no preset for ['apollo']; they have "
        "['adamw', 'galore', 'fira', 'dct', 'sltrain']"
    )):
        check_methods_available(["galore", "apollo"], sixty, "60m", "--methods")
    with pytest.raises(ValueError, match=re.escape("methods (['lion']): ['lion'] not registered")):
        check_methods_available(["lion"], sixty, "60m")


def test_cli_default_methods_are_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    from lowrank_optim.__main__ import main

    assert main(["estimate", "--config", "60m"]) == 0
    out = capsys.readouterr().out
    assert "sltrain " in out and "apollo" not in out
    assert main(["estimate", "--config", "test", "--methods", "apollo"]) == 0
    assert capsys.readouterr().out.count("apollo ") == 1
    with pytest.raises(SystemExit):
        main(["estimate", "--config", "60m", "--methods", "apollo"])
    assert "presets '60m' have no preset for ['apollo']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["estimate", "--methods", "adamw"])
    assert "--methods applies with --config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", "60m", "--method", "apollo"])
    assert "--method (['apollo']): presets '60m' have no preset" in capsys.readouterr().err


def test_sltrain_on_meta_samples_nothing_and_has_the_real_shapes() -> None:
    meta = SLTrainLinear(300, 70, rank=4, delta=0.03, device="meta")
    real = SLTrainLinear(300, 70, rank=4, delta=0.03, seed=0)
    assert meta.indices.is_meta and meta.indices.shape == real.indices.shape and meta.indices.dtype == real.indices.dtype
    assert {name: p.shape for name, p in meta.named_parameters()} == {name: p.shape for name, p in real.named_parameters()}
    assert support_size(70, 300, 0.03) == sample_support(70, 300, 0.03).numel() == int(0.03 * (70 * 300))
    with torch.device("meta"):
        assert SLTrainLinear(300, 70, rank=4).indices.is_meta  # the device context counts too


def test_other_lr_gives_the_non_target_parameters_their_own_group() -> None:
    test = load_presets("test")
    for method in METHODS:
        preset = MethodPreset(**{**test[method].to_dict(), "other_lr": 0.05})
        model = build_model(TEST, preset=preset)
        optimizer = build_optimizer(model, preset)
        names = {id(p): name for name, p in model.named_parameters()}
        other = [g for g in optimizer.param_groups if g["lr"] == 0.05]
        assert len(other) == 1, method
        other_names = {names[id(p)] for p in other[0]["params"]}
        assert other_names == {n for n in names.values() if ".attn." not in n and ".mlp." not in n}, method
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)
    # Unset: one group for the single-rate methods, as before the field existed.
    model = build_model(TEST)
    assert len(build_optimizer(model, test["adamw"]).param_groups) == 1


def test_other_lr_run_equals_a_hand_built_two_group_adamw() -> None:
    stream = TokenStream(stdlib_corpus()[:20000], 16)
    settings = TrainSettings(steps=3, batch_size=2, seq_len=16, eval_batches=1, measure_memory=False)
    preset = MethodPreset(method="adamw", lr=1e-3, other_lr=1e-2)
    by_preset = pretrain(TEST, preset, stream, settings, log=lambda line: None)
    from lowrank_optim.targets import find_targets

    model = build_model(TEST)
    matrices = [t.weight for t in find_targets(model, ("attn", "mlp")).targets]
    ids = {id(p) for p in matrices}
    optimizer = torch.optim.AdamW([{"params": matrices}, {"params": [p for p in model.parameters() if id(p) not in ids],
                                                          "lr": 1e-2}], lr=1e-3, weight_decay=0.0)
    by_hand = pretrain(model, optimizer, stream, settings, log=lambda line: None)
    assert by_hand["train_curve"] == by_preset["train_curve"]


@pytest.mark.parametrize("value", [0, -1e-3, float("nan"), True, "0.1"])
def test_other_lr_refusals(value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"other_lr ({value!r}) must be a finite number > 0")):
        MethodPreset(method="adamw", lr=1e-3, other_lr=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field,value,hint",
    [
        ("rank", 0, " or 'auto' (with state_budget)"),
        ("rank", 2.0, " or 'auto' (with state_budget)"),
        ("rank", True, " or 'auto' (with state_budget)"),
        ("rank", "Auto", " or 'auto' (with state_budget)"),
        ("update_proj_gap", -5, ""),
    ],
)
def test_integer_field_refusals(field: str, value: object, hint: str) -> None:
    options = {"rank": 4, "update_proj_gap": 10, "scale": 0.25, field: value}
    with pytest.raises(ValueError, match=re.escape(f"{field} ({value!r}) must be a positive integer{hint}")):
        MethodPreset(method="galore", lr=1e-2, **options)  # type: ignore[arg-type]


# --- presets with rank="auto" (issue 17) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("galore", {"rank": "auto"}, "rank ('auto') needs state_budget: the bytes of rank-dependent state its matrices may hold"),
        ("galore", {"rank": 4, "state_budget": 1000}, "state_budget (1000) applies with rank 'auto' only, not rank 4"),
        ("galore", {"rank": "auto", "state_budget": 0}, "state_budget (0) must be a positive integer (bytes)"),
        ("galore", {"rank": "auto", "state_budget": 1e6}, "state_budget (1000000.0) must be a positive integer (bytes)"),
        ("galore", {"rank": "auto", "state_budget": True}, "state_budget (True) must be a positive integer (bytes)"),
        ("sltrain", {"rank": "auto", "alpha": 8.0, "delta": 0.03},
         "rank ('auto') applies to the projecting methods (galore, fira, dct, apollo), not 'sltrain', whose rank must be "
         "a positive integer"),
        ("adamw", {"state_budget": 1000},
         "state_budget (1000) applies to the projecting methods (galore, fira, dct, apollo) with rank 'auto', not 'adamw'"),
    ],
)
def test_auto_rank_preset_refusals(method: str, options: dict, message: str) -> None:
    if method == "galore":
        options = {"update_proj_gap": 10, "scale": 0.25, **options}
    with pytest.raises(ValueError, match=re.escape(message)):
        MethodPreset(method=method, lr=1e-2, **options)


@pytest.mark.parametrize("method", ["galore", "fira", "dct", "apollo"])
def test_auto_rank_preset_trains_within_its_budget(method: str, tmp_path) -> None:
    """A preset with rank='auto' (from a JSON presets file, as a user writes one) builds the projected
    group with that budget, trains, and holds no more than it; the estimator counts the budget."""
    base = load_presets("tiny")[method]
    fields = {**base.to_dict(), "rank": "auto", "state_budget": 60_000}
    fields.pop("method")
    path = tmp_path / "auto.json"
    path.write_text(json.dumps({method: fields}))
    preset = load_presets(path)[method]
    assert preset.rank == "auto" and preset.state_budget == 60_000
    model = build_model(TEST, preset=preset)
    optimizer = preset.spec.build_optimizer(model, preset)
    group = optimizer.param_groups[-1]
    assert group["rank"] == "auto" and group["state_budget"] == 60_000
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        tokens = torch.randint(0, TEST.vocab_size, (2, 16), generator=generator)
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ranks = [optimizer.state[p]["matrix_rank"] for p in group["params"]]
    held = sum(optimizer.rank_state_bytes(group, p, r) for p, r in zip(group["params"], ranks))
    assert 0 < held <= 60_000 and min(ranks) >= 1, (held, ranks)
    # The estimator: the full-rank parameters as at a fixed rank; the projected matrices' moments and
    # projector tensors counted as the budget, plus their step counts and scalars.
    fixed = MethodPreset(**{**preset.to_dict(), "rank": 4, "state_budget": None})
    per_matrix = [
        sum(fixed.spec.matrix_state_bytes(tuple(p.shape), fixed, weight_bytes=4, moment_dtype=torch.float32))
        for p in group["params"]
    ]
    scalars = len(group["params"]) * (4 + preset.spec.matrix_scalar_bytes)
    auto_estimate = estimate_memory(TEST, preset, dtype=torch.float32).state_bytes
    fixed_estimate = estimate_memory(TEST, fixed, dtype=torch.float32).state_bytes
    assert auto_estimate == fixed_estimate - sum(per_matrix) + scalars + 60_000


def test_estimate_refuses_per_layer_updates_with_an_auto_preset() -> None:
    preset = MethodPreset(method="galore", lr=1e-2, rank="auto", state_budget=10_000, scale=0.25, update_proj_gap=10)
    message = (
        "per_layer=True with a rank='auto' preset of 'galore': per-layer updates do not step rank='auto' groups "
        "(PerLayerUpdates refuses them); allowed: per_layer=False, or a positive integer rank"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        estimate_memory(TEST, preset, per_layer=True)
    assert estimate_memory(TEST, preset).optimizer_states > 10_000
