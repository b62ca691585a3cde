"""The CLI refuses bad inputs and unusable output paths before any training, naming the option, its
value and what is allowed; and it loses no result at the end (``--json`` written atomically).

Bad inputs are run through the command's handler (what ``main`` calls), so that ``pytest.raises`` sees
the ``ValueError`` whose message ``main`` prints without a traceback (one test checks that printing).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lowrank_optim.__main__ import build_parser, main

PRETRAIN = ["pretrain", "--config", "test", "--method", "galore", "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--eval-batches", "1"]
COMPARE = ["compare", "--config", "test", "--methods", "adamw", "--per-layer-methods", "", "--steps", "2",
           "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-estimate"]


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


def _listing(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every refusal below must come before training: reaching it fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started before the refusal")

    monkeypatch.setattr("lowrank_optim.train.pretrain.pretrain", refuse)
    monkeypatch.setattr("lowrank_optim.demo.run_comparison", refuse)


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.npy"
    np.save(path, (np.arange(3000) % 200).astype(np.int32))
    return path


# --- --tokens ----------------------------------------------------------------------------------------

def _ids(bad: int, at: int, dtype: Any = np.int64) -> np.ndarray:
    ids = (np.arange(3000) % 200).astype(dtype)
    ids[at] = bad
    return ids


TOKENS = [
    pytest.param(np.arange(3000, dtype=np.float64), r"holds an array of dtype float64; token ids must be an integer array",
                 id="float64"),
    pytest.param(np.full(3000, 1.5, dtype=np.float32), r"holds an array of dtype float32", id="float32-fractional"),
    pytest.param(np.ones(3000, dtype=bool), r"holds an array of dtype bool", id="bool"),
    pytest.param(np.ones(3000, dtype=np.complex64), r"holds an array of dtype complex64", id="complex"),
    pytest.param(np.array([1, 2, "three"], dtype=object), r"holds an array of dtype object", id="object"),
    pytest.param(np.array(["1", "2"]), r"holds an array of dtype <U1", id="strings"),
    pytest.param(_ids(-1, 7), r"token id -1 at position 7 is outside \[0, 257\), the vocab_size of config 'test' "
                 r"\(1 of 3000 ids are outside\)", id="negative-id"),
    pytest.param(_ids(257, 11), r"token id 257 at position 11 is outside \[0, 257\)", id="id-equals-vocab"),
    pytest.param(_ids(2**63, 5, np.uint64), r"token id 9223372036854775808 at position 5 is outside", id="huge-uint64"),
    pytest.param(_ids(300, 12).reshape(3, 1000), r"token id 300 at position 12 \(index \(0, 12\) of shape \(3, 1000\)\)",
                 id="2d-array"),
]


@pytest.mark.parametrize("array, message", TOKENS)
def test_bad_tokens_array_is_refused(tmp_path: Path, no_training: None, array: np.ndarray, message: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=array.dtype == object)
    with pytest.raises(ValueError, match=rf"--tokens \('{re.escape(str(path))}'\).* {message}"):
        _run(PRETRAIN + ["--tokens", str(path)])


TOKEN_FILES = [
    pytest.param(lambda path: np.savez(path, ids=np.arange(10)), "ids.npz", r"is not a \.npy array of integer token ids",
                 id="npz-archive"),
    pytest.param(lambda path: path.write_text("1 2 3\n"), "ids.txt", r"is not a \.npy array of integer token ids",
                 id="text-file"),
    pytest.param(lambda path: None, "absent.npy", r"does not exist", id="missing"),
]


@pytest.mark.parametrize("write, name, message", TOKEN_FILES)
def test_unreadable_tokens_file_is_refused(
    tmp_path: Path, no_training: None, write: Callable[[Path], Any], name: str, message: str
) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=rf"--tokens \('{re.escape(str(path))}'\) {message}"):
        _run(PRETRAIN + ["--tokens", str(path)])


CONFLICTS = [
    pytest.param(["--text", "a.txt"], r"--tokens \(.*\) and --text \(a\.txt\) both give the training data; pass one",
                 id="tokens-and-text"),
    pytest.param(["--tokenizer", "tok.json"], r"--tokenizer \('tok\.json'\) applies to --text files; --tokens .* are "
                 r"already ids", id="tokens-and-tokenizer"),
]


@pytest.mark.parametrize("extra, message", CONFLICTS)
def test_tokens_with_text_is_refused(tokens: Path, no_training: None, extra: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _run(PRETRAIN + ["--tokens", str(tokens)] + extra)


def test_cli_prints_the_refusal_without_a_traceback(
    tmp_path: Path, no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, np.arange(10, dtype=np.float32))
    with pytest.raises(SystemExit) as exit_info:
        main(PRETRAIN + ["--tokens", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lowrank-optim pretrain: error: --tokens" in err and "dtype float32" in err and "Traceback" not in err


def test_integer_tokens_of_any_width_train(tmp_path: Path) -> None:
    path = tmp_path / "ids.npy"
    np.save(path, (np.arange(3000) % 200).astype(np.uint8))
    assert _run(PRETRAIN + ["--tokens", str(path)]) == 0


# --- output paths ------------------------------------------------------------------------------------

def _read_only_directory(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("running as root: a chmod 555 directory does not stop root from writing (the /sys cases "
                    "cover an unwritable directory for root)")
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    return directory


def _read_only_file_system(tmp_path: Path) -> Path:
    """``/sys`` (sysfs): no file can be created at its top level, not even by root."""
    sys_dir = Path("/sys")
    if not sys_dir.is_dir():
        pytest.skip("no /sys on this system")
    probe = sys_dir / "lowrank-optim-probe"
    try:
        probe.open("xb").close()
    except OSError:
        return sys_dir
    probe.unlink()
    pytest.skip("/sys is writable here")


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


# (option, where(tmp_path) -> value, message). The file options' values are file paths; --out's a directory.
PATHS = [
    *[
        case
        for option, name in (("--checkpoint", "ckpt.pt"), ("--json", "result.json"))
        for case in (
            pytest.param(option, lambda tmp, name=name: tmp / "missing" / name, r"directory '.*missing' does not exist; "
                         r"create it first", id=f"{option}-missing-parent"),
            pytest.param(option, lambda tmp: tmp, r"is a directory; it must be a file path", id=f"{option}-a-directory"),
            pytest.param(option, lambda tmp, name=name: _file(tmp) / name, r"'.*a-file' is not a directory",
                         id=f"{option}-parent-is-a-file"),
            pytest.param(option, lambda tmp, name=name: _read_only_directory(tmp) / name,
                         r"cannot create files in directory '.*read-only' \(permission denied\)",
                         id=f"{option}-read-only-directory"),
            pytest.param(option, lambda tmp, name=name: _read_only_file_system(tmp) / name,
                         r"cannot create files in directory '/sys' \((permission denied|read-only file system)\)",
                         id=f"{option}-read-only-file-system"),
        )
    ],
    pytest.param("--out", _file, r"exists and is not a directory; it must be a directory", id="--out-a-file"),
    pytest.param("--out", lambda tmp: (tmp / "out" / "results.json").mkdir(parents=True) or tmp / "out",
                 r"'.*results\.json' is a directory, where the file results\.json goes", id="--out-results-is-a-directory"),
    pytest.param("--out", lambda tmp: _file(tmp) / "out", r"'.*a-file' is not a directory, so '.*out' cannot be created",
                 id="--out-under-a-file"),
    pytest.param("--out", lambda tmp: _read_only_directory(tmp) / "new" / "out",
                 r"cannot create files in directory '.*read-only' \(permission denied\)", id="--out-read-only-directory"),
    pytest.param("--out", lambda tmp: _read_only_file_system(tmp) / "out",
                 r"cannot create files in directory '/sys' \((permission denied|read-only file system)\)",
                 id="--out-read-only-file-system"),
]


@pytest.mark.parametrize("option, where, message", PATHS)
def test_unusable_output_path_is_refused_before_training(
    tmp_path: Path, tokens: Path, no_training: None, option: str, where: Callable[[Path], Path], message: str
) -> None:
    value = where(tmp_path)
    before = _listing(tmp_path)
    argv = COMPARE if option == "--out" else PRETRAIN + ["--tokens", str(tokens)]
    with pytest.raises(ValueError, match=rf"{option} \('{re.escape(str(value))}'\)(: | ){message}"):
        _run(argv + [option, str(value)])
    assert _listing(tmp_path) == before  # the writability probe left nothing behind


CHECKPOINT_USE = [
    pytest.param([], r"--checkpoint \(.*\) already exists; pass --resume to continue that run or --overwrite to "
                 r"replace it", id="exists-without-resume-or-overwrite"),
    pytest.param(["--resume", "--overwrite"], r"--resume continues the checkpoint and --overwrite replaces it: choose one",
                 id="resume-and-overwrite"),
    pytest.param(["--overwrite", "--json", "{checkpoint}"], r"--json \(.*\) and --checkpoint \(.*\) name the same file",
                 id="json-is-the-checkpoint"),
]


@pytest.mark.parametrize("extra, message", CHECKPOINT_USE)
def test_checkpoint_misuse_is_refused_before_training(
    tmp_path: Path, tokens: Path, no_training: None, extra: list[str], message: str
) -> None:
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"another run's checkpoint")
    with pytest.raises(ValueError, match=message):
        _run(PRETRAIN + ["--tokens", str(tokens), "--checkpoint", str(checkpoint)]
             + [arg.format(checkpoint=checkpoint) for arg in extra])
    assert checkpoint.read_bytes() == b"another run's checkpoint"


def test_resume_needs_an_existing_checkpoint(tmp_path: Path, tokens: Path, no_training: None) -> None:
    missing = tmp_path / "ckpt.pt"
    with pytest.raises(
        ValueError, match=rf"--resume needs an existing checkpoint file, got --checkpoint='{re.escape(str(missing))}'"
    ):
        _run(PRETRAIN + ["--tokens", str(tokens), "--checkpoint", str(missing), "--resume"])


def test_overwrite_replaces_an_existing_checkpoint(tmp_path: Path, tokens: Path) -> None:
    from lowrank_optim.train.pretrain import load_checkpoint

    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"another run's checkpoint")
    assert _run(PRETRAIN + ["--tokens", str(tokens), "--checkpoint", str(checkpoint), "--overwrite"]) == 0
    assert load_checkpoint(checkpoint)["step"] == 2


class _NoSpace:
    """A temporary file on a full disk: every write fails as write(2) does then (ENOSPC)."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _NoSpace:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()


def test_json_is_written_atomically(tmp_path: Path, tokens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk when the results are written at the end: the message names --json's file, the file's
    previous content stays, and no temporary file remains."""
    import lowrank_optim._io as io_module

    result = tmp_path / "result.json"
    result.write_text('{"previous": true}\n')
    real = io_module._open_temporary

    def open_temporary(directory: Path, target: Path) -> tuple[Path, Any]:
        path, file = real(directory, target)
        return (path, _NoSpace(file)) if target.name == "result.json" else (path, file)

    monkeypatch.setattr(io_module, "_open_temporary", open_temporary)
    with pytest.raises(OSError, match=rf"no space left on device while writing '{re.escape(str(result))}'"):
        _run(PRETRAIN + ["--tokens", str(tokens), "--json", str(result)])
    assert result.read_text() == '{"previous": true}\n'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["result.json", "tokens.npy"]


def test_the_command_line_reports_a_full_disk_without_a_traceback(
    tmp_path: Path, tokens: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lowrank_optim._io as io_module
    from lowrank_optim.__main__ import main

    result = tmp_path / "result.json"
    real = io_module._open_temporary

    def open_temporary(directory: Path, target: Path) -> tuple[Path, Any]:
        path, file = real(directory, target)
        return (path, _NoSpace(file)) if target.name == "result.json" else (path, file)

    monkeypatch.setattr(io_module, "_open_temporary", open_temporary)
    with pytest.raises(SystemExit) as exit_info:
        main(PRETRAIN + ["--tokens", str(tokens), "--json", str(result)])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f"lowrank-optim pretrain: error: [Errno 28] no space left on device while writing '{result}'" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("kind", ["tokens", "text"])
def test_empty_training_data_is_refused(tmp_path: Path, kind: str, no_training: None) -> None:
    if kind == "tokens":
        path = tmp_path / "empty.npy"
        np.save(path, np.zeros(0, dtype=np.int32))
        argv, message = ["--tokens", str(path)], f"--tokens ({str(path)!r}) holds no tokens"
    else:
        path = tmp_path / "empty.txt"
        path.write_text("")
        argv, message = ["--text", str(path)], "the training split has 1 tokens, fewer than seq_len + 1"  # its separator
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(PRETRAIN + argv)
