"""The memory estimator: formulas, parts, agreement with real optimizers and with a measured step."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lowrank_optim import GaLoreAdamW, optimizer_state_bytes
from lowrank_optim.__main__ import main
from lowrank_optim.estimate import (
    PAPER_7B_RUNS,
    MemoryEstimate,
    estimate_memory,
    format_estimate_table,
    format_paper_7b_table,
    galore_state_elements,
)
from lowrank_optim.models import LlamaConfig
from lowrank_optim.optim.moments import Blockwise8bit, MomentFormat
from lowrank_optim.train.measure import build_measured_optimizer, measure_training_step, tensor_bytes
from lowrank_optim.train.methods import METHODS, build_model, build_optimizer, load_presets

ROOT = Path(__file__).resolve().parents[1]
TEST = LlamaConfig.from_name_or_path("test")
TEST_PRESETS = load_presets("test")
#: The test model's tensors are all below the default min_size (4096) but the embeddings (8224): with
#: min_size 128 and blocks of 64 the projected moments (256 or 512 elements, blocks along r = 8 and along
#: 64-element rows) and the embeddings are quantized, the norms' (32) and SLTrain's values (30) stay plain.
SMALL_8BIT = Blockwise8bit(block_size=64, min_size=128)
FORMATS: list[str | MomentFormat] = ["full", "8bit", SMALL_8BIT]


def test_galore_matrix_state_formula() -> None:
    assert galore_state_elements(1376, 512, 128) == 2 * 1376 * 128 + 512 * 128
    assert galore_state_elements(512, 1376, 128) == galore_state_elements(1376, 512, 128)
    assert galore_state_elements(8, 4, 16) == 2 * 8 * 4 + 4 * 4  # rank clamped to min(m, n)
    # One projected 64 x 32 matrix of the test model, fp32: the estimate's per-matrix share.
    one = estimate_memory(TEST, TEST_PRESETS["galore"], dtype=torch.float32)
    adamw = estimate_memory(TEST, TEST_PRESETS["adamw"], dtype=torch.float32)
    projected = TEST.num_layers * (4 * 32 * 32 + 3 * 64 * 32)
    steps = 4 * sum(1 for _ in build_model(TEST).parameters())
    saved = adamw.optimizer_states - steps - 2 * 4 * (TEST.num_parameters() - projected)
    assert saved == 2 * 4 * projected  # AdamW's moments of the projected matrices
    per_layer_galore = 4 * (4 * galore_state_elements(32, 32, 8) + 3 * galore_state_elements(64, 32, 8))
    assert one.state_bytes - (steps + 2 * 4 * (TEST.num_parameters() - projected)) == TEST.num_layers * per_layer_galore


def test_total_is_the_sum_of_parts() -> None:
    estimate = estimate_memory(TEST, TEST_PRESETS["sltrain"], batch_size=3, seq_len=16)
    assert estimate.total == sum(getattr(estimate, field.name) for field in dataclasses.fields(MemoryEstimate))
    assert estimate.weights_and_states == estimate.weights + estimate.state_bytes + estimate.sparse_indices


@pytest.mark.parametrize("moment_format", FORMATS, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_estimate_equals_real_optimizer_and_model(method: str, moment_format: str | MomentFormat) -> None:
    preset = TEST_PRESETS[method]
    model = build_model(TEST, preset=preset)
    optimizer = build_measured_optimizer(model, preset, moment_format)
    batch = torch.randint(0, TEST.vocab_size, (2, 17))
    model(batch, labels=batch).loss.backward()
    gradients = tensor_bytes(p.grad for p in model.parameters())
    optimizer.step()
    estimate = estimate_memory(TEST, preset, dtype=torch.float32, moment_format=moment_format)
    assert estimate.state_bytes == optimizer_state_bytes(optimizer)
    dtypes = {value.dtype for state in optimizer.state.values() for value in state.values()}
    if moment_format == "full":
        assert torch.uint8 not in dtypes
    else:  # both quantized and plain moments occur
        assert {torch.uint8, torch.float32} <= dtypes
    assert estimate.weights + estimate.sparse_indices == tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    assert estimate.gradients == gradients


def test_per_layer_and_accumulation_change_only_gradients() -> None:
    preset = TEST_PRESETS["galore"]
    normal = estimate_memory(TEST, preset)
    per_layer = estimate_memory(TEST, preset, per_layer=True)
    accumulated = estimate_memory(TEST, preset, per_layer=True, accumulation=4)
    largest = max(p.numel() for p in build_model(TEST).parameters()) * 2
    assert per_layer.gradients == largest < normal.gradients == accumulated.gradients
    assert dataclasses.replace(per_layer, gradients=normal.gradients) == normal


def test_activations_scale_with_tokens_and_shrink_with_checkpointing() -> None:
    preset = TEST_PRESETS["adamw"]
    small = estimate_memory(TEST, preset, batch_size=1, seq_len=32).activations
    assert estimate_memory(TEST, preset, batch_size=2, seq_len=32).activations == 2 * small
    assert estimate_memory(TEST, preset, batch_size=1, seq_len=32, gradient_checkpointing=True).activations < small


@pytest.mark.parametrize("method", ["galore", "sltrain"])
def test_estimate_agrees_with_a_measured_step(method: str) -> None:
    preset = TEST_PRESETS[method]
    measured = measure_training_step(TEST, preset, batch_size=2, seq_len=32)
    estimated = estimate_memory(TEST, preset, dtype=torch.float32, batch_size=2, seq_len=32)
    parts_measured = measured.weights + measured.gradients + measured.optimizer_states
    parts_estimated = estimated.weights + estimated.sparse_indices + estimated.gradients + estimated.state_bytes
    assert parts_estimated == pytest.approx(parts_measured, rel=0.10)
    # The allocator peak holds weights + states + gradients + activations: the estimate's total is an
    # upper-side approximation (activations counted without allocator reuse), within a factor 1/2.
    assert parts_measured < measured.peak
    assert 0.5 * estimated.total < measured.peak < 1.1 * estimated.total


def test_goals_for_llama_1b() -> None:
    config = LlamaConfig.from_name_or_path("1b")
    presets = load_presets("1b")
    adamw = estimate_memory(config, presets["adamw"]).weights_and_states
    assert estimate_memory(config, presets["galore"]).weights_and_states <= 0.6 * adamw
    assert estimate_memory(config, presets["sltrain"]).weights_and_states <= 0.55 * adamw
    assert adamw / 1e9 == pytest.approx(8.03, abs=0.01)  # SLTrain's convention: real counts, bf16


def test_table_lists_paper_sizes_beside_published_figures() -> None:
    table = format_estimate_table(("60m", "1b"))
    assert "7.80" in table and "4.38" in table and "nominal parameter counts" in table


def test_build_measured_optimizer_gives_every_method_its_format() -> None:
    for preset in TEST_PRESETS.values():
        model = build_model(TEST, preset=preset)
        full = build_measured_optimizer(model, preset, "full")
        assert type(full) is type(build_optimizer(model, preset))
        eight = build_measured_optimizer(model, preset, SMALL_8BIT)
        assert isinstance(eight, GaLoreAdamW)
        assert [group["moment_format"] for group in eight.param_groups] == [SMALL_8BIT] * len(eight.param_groups)
        assert [group["lr"] for group in eight.param_groups] == [group["lr"] for group in full.param_groups]
        if isinstance(full, torch.optim.AdamW):  # torch's Adam hyperparameters, full-rank groups
            assert eight.defaults["eps"] == full.defaults["eps"] == 1e-8
            assert all("rank" not in group for group in eight.param_groups)


def test_build_optimizer_refuses_a_format_for_an_optimizer_without_formats() -> None:
    from lowrank_optim.train.methods import Method

    sgd = Method(name="sgd_unregistered", summary="plain SGD", optimizer=torch.optim.SGD)
    model = build_model(TEST, preset=TEST_PRESETS["adamw"])
    with pytest.raises(ValueError, match="moment_format '8bit': method 'sgd_unregistered' builds SGD, which has no "
                       "moment formats; allowed there: moment_format='full'"):
        sgd.build_optimizer(model, TEST_PRESETS["adamw"], moment_format="8bit")
    assert isinstance(sgd.build_optimizer(model, TEST_PRESETS["adamw"], moment_format="full"), torch.optim.SGD)


def test_8bit_moment_bytes_by_hand() -> None:
    """Codes (1 byte per element) + 4 bytes per block of the stored rows, written out for the test model."""
    fmt = Blockwise8bit(block_size=64, min_size=128)

    def quantized(rows: int, columns: int) -> int:  # two moments stored rows x columns
        return 2 * (rows * columns + 4 * rows * math.ceil(columns / fmt.block_size))

    h, i, v, r = TEST.hidden_size, TEST.intermediate_size, TEST.vocab_size, 8
    plain_norms = (2 * TEST.num_layers + 1) * (2 * h * 4 + 4)
    embeddings = 2 * (quantized(v, h) + 4)
    full_rank = estimate_memory(TEST, TEST_PRESETS["adamw"], dtype=torch.float32, moment_format=fmt)
    matrices = 4 * h * h + 3 * h * i
    assert full_rank.state_bytes == embeddings + plain_norms + TEST.num_layers * (
        4 * (quantized(h, h) + 4) + 2 * (quantized(i, h) + 4) + quantized(h, i) + 4  # gate, up 64 x 32; down 32 x 64
    )
    assert matrices * TEST.num_layers + 2 * v * h + (2 * TEST.num_layers + 1) * h == TEST.num_parameters()
    galore = estimate_memory(TEST, TEST_PRESETS["galore"], dtype=torch.float32, moment_format=fmt)
    # q, k, v, o (32 x 32): 32 x 8 moments; gate/up (64 x 32): 64 x 8; down (32 x 64): 8 x 64 moments, stored
    # transposed 64 x 8, so 64 scale rows, not 8. Bases: min(m, n) x r fp32; steps 4 bytes each.
    per_layer = 4 * (quantized(h, r) + 4 + h * r * 4) + 3 * (quantized(i, r) + 4 + h * r * 4)
    assert galore.state_bytes == embeddings + plain_norms + TEST.num_layers * per_layer
    # Without quantization the format is the full-precision rule.
    nothing = Blockwise8bit(min_size=10**9)
    for method in ("adamw", "galore", "sltrain"):
        assert estimate_memory(TEST, TEST_PRESETS[method], moment_format=nothing) == estimate_memory(TEST, TEST_PRESETS[method])


@pytest.mark.parametrize("method", METHODS)
def test_measured_8bit_states_equal_the_estimate_exactly(method: str) -> None:
    preset = TEST_PRESETS[method]
    estimated = estimate_memory(TEST, preset, dtype=torch.float32, batch_size=1, seq_len=16, moment_format=SMALL_8BIT)
    for per_layer in (False, True):
        measured = measure_training_step(TEST, preset, batch_size=1, seq_len=16, moment_format=SMALL_8BIT, per_layer=per_layer)
        assert measured.optimizer_states == estimated.state_bytes
        assert measured.weights == estimated.weights + estimated.sparse_indices
        assert measured.gradients == estimated.gradients
    full = measure_training_step(TEST, preset, batch_size=1, seq_len=16)
    assert full.optimizer_states == estimate_memory(TEST, preset, dtype=torch.float32).state_bytes > estimated.state_bytes


@pytest.mark.parametrize("method", ["adamw", "galore", "sltrain"])
def test_per_layer_with_8bit_moments_changes_only_gradients(method: str) -> None:
    preset = TEST_PRESETS[method]
    normal = estimate_memory(TEST, preset, moment_format="8bit")
    per_layer = estimate_memory(TEST, preset, moment_format="8bit", per_layer=True)
    largest = max(p.numel() for p in build_model(TEST, preset=preset).parameters()) * 2
    assert per_layer.gradients == largest < normal.gradients
    assert dataclasses.replace(per_layer, gradients=normal.gradients) == normal
    assert normal.optimizer_states < estimate_memory(TEST, preset).optimizer_states


def test_unknown_moment_format_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Invalid moment_format: '4bit'\. Must be one of full, 8bit"):
        estimate_memory(TEST, TEST_PRESETS["galore"], moment_format="4bit")
    with pytest.raises(ValueError, match=r"Invalid moment_format: '4bit'\. Must be one of full, 8bit"):
        format_estimate_table(("60m",), moment_format="4bit")
    with pytest.raises(ValueError, match=r"Invalid moment_format: '4bit'\. Must be one of full, 8bit"):
        measure_training_step(TEST, TEST_PRESETS["adamw"], seq_len=8, moment_format="4bit")


def test_llama_7b_8bit_goals() -> None:
    """The papers' 7B configurations: 8-bit GaLore and 8-bit SLTrain with per-layer updates at or below
    their measured peaks (22.0 and 18.3 GB), batch 1 x 256 with checkpointing (the table's accounting)."""
    config = LlamaConfig.from_name_or_path("7b")
    presets = load_presets("7b")
    options: dict[str, Any] = dict(batch_size=1, seq_len=256, gradient_checkpointing=True, moment_format="8bit", per_layer=True)
    galore = estimate_memory(config, presets["galore"], **options)
    sltrain = estimate_memory(config, presets["sltrain"], **options)
    assert galore.total <= 22.0e9 and sltrain.total <= 18.3e9
    adam8 = estimate_memory(config, presets["adamw"], moment_format="8bit")
    assert adam8.weights_and_states / 1e9 == pytest.approx(26.0, rel=0.05)  # GaLore Table 3: 26G
    galore8 = estimate_memory(config, presets["galore"], moment_format="8bit")
    assert galore8.weights_and_states / 1e9 == pytest.approx(18.0, rel=0.07)  # GaLore Table 3: 18G
    # 8-bit moments: 2 x (1 + 4/256) bytes per element where bf16 moments take 2 x 2.
    full = estimate_memory(config, presets["adamw"])
    assert adam8.optimizer_states / full.optimizer_states == pytest.approx((1 + 4 / 256) / 2, rel=1e-3)


def test_paper_7b_table_lists_runs_beside_published_figures() -> None:
    table = format_paper_7b_table()
    for run in PAPER_7B_RUNS:
        assert run.label in table
    for figure in ("67.4", "26.0", "29.4", "18.0", "22.0", "18.3", "1024, delta 0.05", "max_memory_allocated"):
        assert figure in table
    assert "Not estimated" in table
    assert format_paper_7b_table() in format_estimate_table(("7b",))
    assert "7B run" not in format_estimate_table(("60m",))


def test_table_with_8bit_moments_leaves_out_the_bf16_published_figures() -> None:
    table = format_estimate_table(("1b",), moment_format="8bit")
    rows = table.split("\n\n")[0]
    assert "4.38" not in rows and "7.80" not in rows and "block-wise 8-bit moments" in table
    assert "4.38" in format_estimate_table(("1b",)).split("\n\n")[0]


def test_cli_estimate_and_measure_take_a_moment_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--config", "60m", "--methods", "galore", "--per-layer"]) == 0
    full = capsys.readouterr().out
    assert main(["estimate", "--config", "60m", "--methods", "galore", "--per-layer", "--moment-format", "8bit"]) == 0
    eight = capsys.readouterr().out
    config, preset = LlamaConfig.from_name_or_path("60m"), load_presets("60m")["galore"]
    expected = estimate_memory(config, preset, moment_format="8bit", per_layer=True, gradient_checkpointing=True)
    assert f"optimizer_states {expected.optimizer_states / 1e9:.3f}" in eight and f"total {expected.total / 1e9:.3f}" in eight
    assert full != eight
    assert main(["measure", "--config", "test", "--methods", "adamw", "--seq-len", "8", "--moment-format", "8bit"]) == 0
    out = capsys.readouterr().out
    estimated = estimate_memory(TEST, TEST_PRESETS["adamw"], dtype=torch.float32, moment_format="8bit").state_bytes
    assert f"states {estimated / 2**20:.2f} MiB (estimated {estimated / 2**20:.2f})" in out


@pytest.mark.parametrize("command", [["estimate"], ["measure", "--config", "test"]])
def test_cli_refuses_an_unknown_moment_format(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        main([*command, "--moment-format", "4bit"])
    assert error.value.code == 2
    # Python 3.12.8+ quotes the choices.
    assert re.search(r"argument --moment-format: invalid choice: '4bit' \(choose from '?full'?, '?8bit'?\)",
                     capsys.readouterr().err)


def test_gpu_bench_dry_run_of_the_8bit_rows(tmp_path: Path) -> None:
    """bench/bench_gpu_memory.py's 8-bit rows end to end on the CPU (the test config, one timed step)."""
    spec = importlib.util.spec_from_file_location("bench_gpu_memory", ROOT / "bench" / "bench_gpu_memory.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry-run", "--moments", "8bit", "--steps", "0", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu-memory-dry-run-8bit.json").read_text())["rows"]
    assert [(row["method"], row["moment_format"]) for row in rows] == [
        ("8-bit adamw", "8bit"), ("8-bit adamw+per-layer", "8bit"), ("8-bit galore", "8bit"),
        ("8-bit galore+per-layer", "8bit"), ("8-bit sltrain+per-layer", "8bit"),
    ]
    assert all(row["states_exact"] and row["peak_gb"] > 0 for row in rows)
    assert bench.PUBLISHED_7B == {("adamw", False, "full"): 67.4, ("adamw", True, "8bit"): 29.4,
                                  ("galore", True, "8bit"): 22.0, ("sltrain", True, "8bit"): 18.3}
