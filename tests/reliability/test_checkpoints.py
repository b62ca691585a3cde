"""Checkpoints survive kill -9 and full disks, are verified before a resume, are not overwritten by
accident; the name-keyed optimizer state is saved as an atomic set and loaded all or nothing.

Temporary files: the atomic writer (``lowrank_optim._io``) writes ``<dir>/.<name>.<16 hex digits>.tmp``
and renames it over ``<dir>/<name>``. A writer killed mid-write may leave such a file behind; it is hidden
and ends in ``.tmp``, so it never matches a checkpoint's name or ``*.pt`` (asserted below with
``TEMP_NAME``, spelled out here rather than imported, so that the tests also run against older code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import lowrank_optim
from lowrank_optim import GaLoreAdamW
from lowrank_optim.__main__ import main
from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.distributed import load_lowrank_state, save_lowrank_state
from lowrank_optim.models import LlamaConfig
from lowrank_optim.train.methods import load_presets
from lowrank_optim.train.pretrain import TrainSettings, pretrain

TEST = LlamaConfig.from_name_or_path("test")
PRESETS = load_presets("test")
STREAM = TokenStream(stdlib_corpus(100_000), 16)
SETTINGS = TrainSettings(steps=2, batch_size=2, seq_len=16, eval_batches=1, measure_memory=False)
PACKAGE_ROOT = str(Path(lowrank_optim.__file__).resolve().parents[1])  # subprocesses import the same code


def TEMP_NAME(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.[0-9a-f]{{16}}\.tmp$")


def _quiet(line: str) -> None:
    pass


def _listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete 2-update galore checkpoint of the test model (copied by each test that alters one)."""
    path = tmp_path_factory.mktemp("saved") / "ckpt.pt"
    pretrain(TEST, PRESETS["galore"], STREAM, SETTINGS, checkpoint=path, log=_quiet)
    return path


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals must come before any training: building the model is the first step of it."""

    def build_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started (the model was built) before the refusal")

    monkeypatch.setattr("lowrank_optim.train.pretrain.build_model", build_model)


def _copy(saved: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pt"
    shutil.copyfile(saved, path)
    return path


# --- kill -9 -----------------------------------------------------------------------------------------

class _Process:
    """A subprocess whose stdout lines are collected by a thread (so reading never blocks the test)."""

    def __init__(self, script: str, *args: str) -> None:
        # One thread: fast when the cores are shared (OpenMP spin-waits badly when oversubscribed), and the
        # same arithmetic as this process under _one_thread().
        env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT, "OMP_NUM_THREADS": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.strip())

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            if self.popen.poll() is not None and not predicate(self.lines):
                self.reader.join(5)
                if predicate(self.lines):
                    return
                raise AssertionError(f"writer exited (rc {self.popen.returncode}): {self.popen.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; output so far {self.lines[-5:]}")
            time.sleep(0.002)

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)
        self.reader.join(5)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


_LOOP_WRITER = """
import sys, torch
from lowrank_optim.train.pretrain import save_checkpoint
path = sys.argv[1]
print("ready", flush=True)
start = int(sys.stdin.readline())
for step in range(start, start + 10**6):
    # 1 MiB of tensor data whose every element says which version this is.
    save_checkpoint(path, {"step": step, "model": {"w": torch.full((1 << 18,), float(step))}})
    print(step, flush=True)
"""


def test_kill_9_while_writing_checkpoints_in_a_loop(tmp_path: Path) -> None:
    """Four writers, each SIGKILLed after a random delay while it rewrites the checkpoint in a loop:
    after every kill the file is a complete version (the one reported saved last, or the next one)."""
    from lowrank_optim.train.pretrain import load_checkpoint

    path = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    # Started together, so that their interpreter start-ups overlap; each waits for its start step.
    writers = [_Process(_LOOP_WRITER, str(path)) for _ in range(4)]
    try:
        expected_next = 0
        for writer in writers:
            writer.wait_for(lambda lines: "ready" in lines)
            writer.send(str(expected_next))
            writer.wait_for(lambda lines: len(lines) >= 2)  # one version saved in this process
            time.sleep(rng.uniform(0.0, 0.1))
            writer.kill()
            reported = int(writer.lines[-1])
            content = load_checkpoint(path)  # verifies the checksum: complete and undamaged
            assert content["step"] in (reported, reported + 1), (content["step"], reported)
            assert torch.equal(content["model"]["w"], torch.full((1 << 18,), float(content["step"])))
            others = [name for name in _listing(tmp_path) if name != path.name]
            assert all(TEMP_NAME(path.name).match(name) for name in others), others
            assert [p.name for p in tmp_path.glob("*.pt")] == [path.name]
            expected_next = content["step"] + 1
    finally:
        for writer in writers:
            if writer.popen.poll() is None:
                writer.kill()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_CLI_WRITER = """
import sys
from lowrank_optim.__main__ import main
from lowrank_optim.models import LlamaConfig
from lowrank_optim.train.methods import build_model
build_model(LlamaConfig.from_name_or_path("test"))  # warm-up: the first build imports torch's compile machinery
print("ready", flush=True)
extra = sys.stdin.readline().split()
sys.exit(main(sys.argv[1:] + extra))
"""


def test_kill_9_during_pretrain_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """The real CLI in a subprocess, checkpointing every update, SIGKILLed at a random moment, resumed in
    another subprocess, killed again, then resumed to the end (in this process): every checkpoint left
    behind is loadable, and the finished run equals an uninterrupted one."""
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(4000) % 250)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "ckpt.pt"
    steps = 24
    argv = ["pretrain", "--config", "test", "--method", "galore", "--tokens", str(tokens), "--steps", str(steps),
            "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--checkpoint", str(path),
            "--checkpoint-every", "1"]
    rng = random.Random(1)
    processes = [_Process(_CLI_WRITER, *argv) for _ in range(2)]
    try:
        for index, process in enumerate(processes):
            process.wait_for(lambda lines: "ready" in lines)
            before = path.stat().st_mtime_ns if path.exists() else None
            process.send("--resume" if index else "")
            deadline = time.monotonic() + 60
            while not path.exists() or path.stat().st_mtime_ns == before:  # this process has saved once
                assert time.monotonic() < deadline and process.popen.poll() is None, process.lines
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.2))
            process.kill()
            content = torch.load(path, weights_only=True)
            assert 1 <= content["step"] < steps, content["step"]
            others = [name for name in _listing(run_dir) if name != path.name]
            assert all(TEMP_NAME(path.name).match(name) for name in others), others
    finally:
        for process in processes:
            if process.popen.poll() is None:
                process.kill()
    result = tmp_path / "result.json"
    settings = TrainSettings(steps=steps, batch_size=2, seq_len=16, eval_batches=1, measure_memory=False)
    stream = TokenStream(torch.from_numpy(np.arange(4000) % 250), 16)
    with _one_thread():
        assert main(argv + ["--resume", "--json", str(result)]) == 0
        uninterrupted = pretrain(TEST, PRESETS["galore"], stream, settings, log=_quiet)
    resumed = json.loads(result.read_text())
    assert [tuple(point) for point in resumed["train_curve"]] == uninterrupted["train_curve"]
    assert resumed["final_eval_loss"] == uninterrupted["final_eval_loss"]


# --- full disk ---------------------------------------------------------------------------------------

class _FullDisk:
    """A temporary file on a disk with ``room`` bytes left: writes fill it, then fail as write(2) does
    (ENOSPC). ``fsync=True``: the writes succeed and fsync fails (delayed allocation, NFS)."""

    def __init__(self, file: Any, room: int, fsync: bool) -> None:
        self._file, self._room, self.fail_fsync = file, room, fsync

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.fail_fsync or len(view) <= self._room:
            self._room -= len(view)
            return self._file.write(view)
        self._file.write(view[: self._room])
        self._room = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self) -> int:
        if self.fail_fsync:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.fileno()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()


def _fill_disk(monkeypatch: pytest.MonkeyPatch, room: int, fsync: bool, only: str | None = None) -> None:
    """Make the atomic writer's temporary files (those for targets named ``only``, or all) full-disk ones."""
    import lowrank_optim._io as io_module

    real = io_module._open_temporary

    def open_temporary(directory: Path, target: Path) -> tuple[Path, Any]:
        path, file = real(directory, target)
        if only is not None and not re.fullmatch(only, target.name):
            return path, file
        return path, _FullDisk(file, room, fsync)

    monkeypatch.setattr(io_module, "_open_temporary", open_temporary)


FULL_DISKS = [pytest.param(0, False, id="no-room"), pytest.param(200, False, id="room-for-part"),
              pytest.param(0, True, id="fsync-fails")]


@pytest.mark.parametrize("room, fsync", FULL_DISKS)
def test_full_disk_keeps_the_previous_checkpoint(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int, fsync: bool
) -> None:
    path = _copy(saved, tmp_path)
    previous = path.read_bytes()
    _fill_disk(monkeypatch, room, fsync)
    settings = dataclasses.replace(SETTINGS, seed=1)
    with pytest.raises(OSError, match=rf"no space left on device while writing '{re.escape(str(path))}'") as info:
        pretrain(TEST, PRESETS["galore"], STREAM, settings, checkpoint=path, overwrite=True, log=_quiet)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == previous
    assert _listing(tmp_path) == ["ckpt.pt"]  # the temporary file was removed


def test_a_symlinked_checkpoint_stays_a_link(tmp_path: Path) -> None:
    """``latest.pt -> runs/step.pt``: the new checkpoint replaces the file the link names, atomically in
    that file's directory, and the link stays a link."""
    from lowrank_optim.train.pretrain import load_checkpoint, save_checkpoint

    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "step.pt"
    save_checkpoint(real, {"step": 1})
    link = tmp_path / "latest.pt"
    link.symlink_to(real)
    save_checkpoint(link, {"step": 2})
    assert link.is_symlink() and load_checkpoint(real)["step"] == 2
    assert _listing(tmp_path / "runs") == ["step.pt"]


# --- verification before resume ----------------------------------------------------------------------

def _flip(data: bytes, offset: int, mask: int = 0xFF) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= mask
    return bytes(damaged)


def _largest_tensor_record_middle(data: bytes) -> int:
    import io

    archive = zipfile.ZipFile(io.BytesIO(data))
    record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)
    header = data[record.header_offset : record.header_offset + 30]
    start = record.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return start + record.file_size // 2


DAMAGES = [
    pytest.param(lambda data: _flip(data, len(data) // 2), r"is corrupted", id="byte-flipped-mid-file"),
    pytest.param(lambda data: _flip(data, _largest_tensor_record_middle(data)), r"is corrupted: SHA-256",
                 id="byte-flipped-in-tensor-data"),
    # 'galore' in the run description, in the pickle, becomes 'gamore': unpickles fine, as another word.
    pytest.param(lambda data: _flip(data, data.index(b"galore") + 2, 0x01), r"is corrupted: SHA-256",
                 id="byte-flipped-in-pickle"),
    pytest.param(lambda data: data[: len(data) // 2], r"cannot be read: it is truncated or corrupted", id="truncated-half"),
    pytest.param(lambda data: data[:-1], r"cannot be read: it is truncated or corrupted", id="truncated-last-byte"),
    pytest.param(lambda data: b"", r"cannot be read: it is truncated or corrupted", id="empty"),
]


@pytest.mark.parametrize("damage, message", DAMAGES)
def test_damaged_checkpoint_is_refused_before_training(
    saved: Path, tmp_path: Path, no_training: None, damage: Callable[[bytes], bytes], message: str
) -> None:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(damage(saved.read_bytes()))
    with pytest.raises(ValueError, match=rf"checkpoint \('{re.escape(str(path))}'\) {message}"):
        pretrain(TEST, PRESETS["galore"], STREAM, SETTINGS, checkpoint=path, resume=True, log=_quiet)


def test_unversioned_checkpoint_is_refused(saved: Path, tmp_path: Path, no_training: None) -> None:
    """What pretrain wrote before checkpoints had a format: refused, saying why (nothing to verify)."""
    content = torch.load(saved, weights_only=True)
    for key in ("format", "version", "checksum", "run"):
        content.pop(key, None)
    path = tmp_path / "old.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"has no format version: it was written by an older lowrank_optim"):
        pretrain(TEST, PRESETS["galore"], STREAM, SETTINGS, checkpoint=path, resume=True, log=_quiet)


MISMATCHES = [
    pytest.param({"preset": PRESETS["fira"]}, r"was written by method 'galore'; this run asks for method 'fira'",
                 id="method"),
    pytest.param({"preset": dataclasses.replace(PRESETS["galore"], lr=0.02)},
                 r"preset field 'lr': saved 0\.01, requested 0\.02", id="preset-lr"),
    pytest.param({"preset": dataclasses.replace(PRESETS["galore"], rank=4)},
                 r"preset field 'rank': saved 8, requested 4", id="preset-rank"),
    pytest.param({"model_config": dataclasses.replace(TEST, num_layers=1)},
                 r"model config field 'num_layers': saved 2, requested 1", id="model-layers"),
    pytest.param({"model_config": dataclasses.replace(TEST, init_std=0.01)},
                 r"model config field 'init_std': saved 0\.02, requested 0\.01", id="model-init"),
    pytest.param({"settings": dataclasses.replace(SETTINGS, steps=4)}, r"setting 'steps': saved 2, requested 4",
                 id="settings-steps"),
    pytest.param({"settings": dataclasses.replace(SETTINGS, seed=3)}, r"setting 'seed': saved 0, requested 3",
                 id="settings-seed"),
    pytest.param({"settings": dataclasses.replace(SETTINGS, dtype="bfloat16")},
                 r"setting 'dtype': saved 'float32', requested 'bfloat16'", id="settings-dtype"),
    pytest.param({"stream": TokenStream(stdlib_corpus(120_000), 16)},
                 r"tokens 'train_tokens': saved 95000, requested 114000", id="other-tokens"),
]


@pytest.mark.parametrize("change, message", MISMATCHES)
def test_different_run_is_refused_naming_the_field(
    saved: Path, tmp_path: Path, no_training: None, change: dict[str, Any], message: str
) -> None:
    path = _copy(saved, tmp_path)
    run = {"model_config": TEST, "preset": PRESETS["galore"], "stream": STREAM, "settings": SETTINGS, **change}
    with pytest.raises(ValueError, match=rf"checkpoint \('{re.escape(str(path))}'\) .*{message}"):
        pretrain(run["model_config"], run["preset"], run["stream"], run["settings"], checkpoint=path, resume=True,
                 log=_quiet)


def test_reporting_settings_may_differ_on_resume(saved: Path, tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    settings = dataclasses.replace(SETTINGS, eval_every=1, log_every=1)
    result = pretrain(TEST, PRESETS["galore"], STREAM, settings, checkpoint=path, resume=True, log=_quiet)
    assert len(result["train_curve"]) == SETTINGS.steps  # the saved run was complete: nothing more to do
    assert torch.load(path, weights_only=True)["step"] == SETTINGS.steps  # plain torch.load still reads it


# --- no accidental overwrite, writable before the first update ---------------------------------------

def test_existing_checkpoint_needs_resume_or_overwrite(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _copy(saved, tmp_path)
    previous = path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr("lowrank_optim.train.pretrain.build_model", lambda *a, **k: pytest.fail("trained"))
        with pytest.raises(ValueError, match=r"already exists; pass resume=True to continue that run or overwrite=True"):
            pretrain(TEST, PRESETS["galore"], STREAM, SETTINGS, checkpoint=path, log=_quiet)
        with pytest.raises(ValueError, match=r"resume=True continues the checkpoint and overwrite=True replaces it"):
            pretrain(TEST, PRESETS["galore"], STREAM, SETTINGS, checkpoint=path, resume=True, overwrite=True, log=_quiet)
    assert path.read_bytes() == previous
    pretrain(TEST, PRESETS["galore"], STREAM, dataclasses.replace(SETTINGS, seed=1), checkpoint=path, overwrite=True,
             log=_quiet)
    assert torch.load(path, weights_only=True)["run"]["settings"]["seed"] == 1


UNWRITABLE = [
    pytest.param(lambda tmp: tmp / "missing" / "ckpt.pt", r"directory '.*missing' does not exist", id="missing-parent"),
    pytest.param(lambda tmp: tmp, r"is a directory; it must be a file path", id="a-directory"),
]


@pytest.mark.parametrize("where, message", UNWRITABLE)
def test_unwritable_checkpoint_is_refused_before_training(
    tmp_path: Path, no_training: None, where: Callable[[Path], Path], message: str
) -> None:
    before = _listing(tmp_path)
    with pytest.raises(ValueError, match=rf"checkpoint \(.*\)(: | ){message}"):
        pretrain(TEST, PRESETS["galore"], STREAM, SETTINGS, checkpoint=where(tmp_path), log=_quiet)
    assert _listing(tmp_path) == before


# --- the name-keyed optimizer state (save_lowrank_state / load_lowrank_state) -------------------------

def _net(extra: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6)] + ([nn.Linear(6, 6)] if extra else [])
    return nn.Sequential(*layers)


def _optimizer(model: nn.Sequential, last_rank: int = 3) -> GaLoreAdamW:
    """Biases, then one group per matrix: the last parameter loaded is the last matrix (or the extra layer's)."""
    groups = [{"params": [model[0].bias, model[2].bias]},
              {"params": [model[0].weight], "rank": 3, "update_proj_gap": 2},
              {"params": [model[2].weight], "rank": last_rank, "update_proj_gap": 2}]
    if len(model) > 3:
        groups.append({"params": [model[3].weight, model[3].bias]})
    return GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1)


def _train(model: nn.Module, optimizer: GaLoreAdamW, steps: int, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model.zero_grad()
        x, y = torch.randn(8, 12, generator=generator), torch.randn(8, 6, generator=generator)
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()


def _snapshot(optimizer: GaLoreAdamW) -> list[dict[str, Any]]:
    return [{key: value.clone() if isinstance(value, torch.Tensor) else value
             for key, value in optimizer.state[param].items()}
            for group in optimizer.param_groups for param in group["params"]]


def _assert_same_state(optimizer: GaLoreAdamW, snapshot: list[dict[str, Any]]) -> None:
    params = [param for group in optimizer.param_groups for param in group["params"]]
    assert len(params) == len(snapshot)
    for index, (param, before) in enumerate(zip(params, snapshot)):
        now = optimizer.state[param]
        assert set(now) == set(before), (index, set(now), set(before))
        for key, value in before.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(now[key], value), (index, key)
            else:
                assert now[key] == value, (index, key)


def _saved_set(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    model = _net()
    optimizer = _optimizer(model)
    _train(model, optimizer, 2)
    directory = tmp_path / "state"
    save_lowrank_state(optimizer, directory, model=model)
    return directory, _snapshot(optimizer)


@pytest.mark.parametrize("room, fsync", FULL_DISKS)
@pytest.mark.parametrize("failing", [r"lowrank_state_rank.*\.pt", r"lowrank_state\.json"], ids=["rank-file", "manifest"])
def test_failed_save_leaves_the_previous_set_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, room: int, fsync: bool
) -> None:
    directory, first = _saved_set(tmp_path)
    before = _listing(directory)
    model = _net()
    optimizer = _optimizer(model)
    _train(model, optimizer, 3, seed=4)
    _fill_disk(monkeypatch, room, fsync, only=failing)
    with pytest.raises(OSError, match=r"no space left on device while writing '.*lowrank_state"):
        save_lowrank_state(optimizer, directory, model=model)
    assert _listing(directory) == before  # neither a temporary file nor this save's rank file is left
    fresh_model = _net()
    fresh = _optimizer(fresh_model)
    load_lowrank_state(fresh, directory, model=fresh_model)
    _assert_same_state(fresh, first)


def test_save_replaces_a_whole_set_and_legacy_sets_still_load(tmp_path: Path) -> None:
    """A directory saved before manifests existed loads; the next save's manifest supersedes it, and
    files of other generations (a save killed before its manifest) are never read and then removed."""
    from lowrank_optim.distributed.checkpoint import FORMAT

    model = _net()
    optimizer = _optimizer(model)
    _train(model, optimizer, 2)
    directory = tmp_path / "state"
    directory.mkdir()
    names = {id(p): n for n, p in model.named_parameters()}
    entries = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    torch.save({"format": FORMAT, "params": entries}, directory / "lowrank_state_rank00000.pt")  # the old layout
    # An orphan of a killed save (a generation file without its manifest), whose state is all zeros.
    orphan = {name: {k: torch.zeros_like(v) for k, v in entry.items()} for name, entry in entries.items()}
    torch.save({"format": FORMAT, "params": orphan}, directory / "lowrank_state_rank00000.0123456789abcdef.pt")
    fresh_model = _net()
    fresh = _optimizer(fresh_model)
    load_lowrank_state(fresh, directory, model=fresh_model)
    _assert_same_state(fresh, _snapshot(optimizer))

    _train(model, optimizer, 1)
    save_lowrank_state(optimizer, directory, model=model)
    files = _listing(directory)
    assert "lowrank_state.json" in files and "lowrank_state_rank00000.pt" not in files
    assert len([name for name in files if name.startswith("lowrank_state_rank")]) == 1, files
    load_lowrank_state(fresh, directory, model=fresh_model)
    _assert_same_state(fresh, _snapshot(optimizer))


def _damage_rank_file(directory: Path, damage: Callable[[bytes], bytes]) -> None:
    (file,) = directory.glob("lowrank_state_rank*.pt")
    file.write_bytes(damage(file.read_bytes()))


LOAD_FAILURES = [
    pytest.param("missing-last-entry", KeyError, r"no entry for parameter '3\.weight'", id="missing-last-entry"),
    pytest.param("last-shape", ValueError, r"parameter '2\.weight' basis_left was saved with shape \(6, 3\)",
                 id="last-parameter-shape-mismatch"),
    pytest.param("flipped", ValueError, r"is corrupted: SHA-256", id="rank-file-byte-flipped"),
    pytest.param("truncated", ValueError, r"has \d+ bytes, the manifest recorded \d+", id="rank-file-truncated"),
    pytest.param("no-file", FileNotFoundError, r"named by manifest .* is missing", id="rank-file-missing"),
    pytest.param("manifest", ValueError, r"manifest '.*lowrank_state\.json' cannot be read", id="manifest-damaged"),
]


@pytest.mark.parametrize("failure, error, message", LOAD_FAILURES)
def test_failed_load_leaves_the_state_untouched(
    tmp_path: Path, failure: str, error: type[Exception], message: str
) -> None:
    directory, _ = _saved_set(tmp_path)
    # The target has state of its own (other training), which a failed load must not touch.
    model = _net(extra=failure == "missing-last-entry")
    optimizer = _optimizer(model, last_rank=2 if failure == "last-shape" else 3)
    _train(model, optimizer, 3, seed=5)
    if failure == "flipped":
        _damage_rank_file(directory, lambda data: _flip(data, len(data) // 2))
    elif failure == "truncated":
        _damage_rank_file(directory, lambda data: data[:-100])
    elif failure == "no-file":
        next(directory.glob("lowrank_state_rank*.pt")).unlink()
    elif failure == "manifest":
        (directory / "lowrank_state.json").write_text('{"format": "lowrank_optim.named_state.manifest.v1", "files": [')
    before = _snapshot(optimizer)
    with pytest.raises(error, match=message):
        load_lowrank_state(optimizer, directory, model=model)
    _assert_same_state(optimizer, before)


def test_saved_set_is_readable_without_unpickling_code(tmp_path: Path) -> None:
    directory, _ = _saved_set(tmp_path)
    (file,) = directory.glob("lowrank_state_rank*.pt")
    assert set(torch.load(file, weights_only=True)["params"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_save_lowrank_state_before_any_step_is_refused_and_keeps_the_previous_save(tmp_path: Path) -> None:
    """An optimizer with no state used to replace a good save by a manifest naming no file."""
    model = nn.Linear(8, 6)
    trained = GaLoreAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}], lr=0.01)
    model(torch.randn(3, 8)).sum().backward()
    trained.step()
    save_lowrank_state(trained, tmp_path, model=model)
    listing = _listing(tmp_path)
    fresh = GaLoreAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias]}], lr=0.01)
    with pytest.raises(RuntimeError, match=r"has not stepped yet \(no state to save\)"):
        save_lowrank_state(fresh, tmp_path, model=model)
    assert _listing(tmp_path) == listing
    load_lowrank_state(fresh, tmp_path, model=model)
    assert torch.equal(fresh.state[model.weight]["exp_avg"], trained.state[model.weight]["exp_avg"])


def test_replacing_a_file_keeps_its_permissions(tmp_path: Path) -> None:
    from lowrank_optim._io import atomic_write_text

    target = tmp_path / "results.json"
    target.write_text("{}\n")
    target.chmod(0o600)
    atomic_write_text(target, '{"new": true}\n')
    assert target.read_text() == '{"new": true}\n' and (target.stat().st_mode & 0o777) == 0o600
