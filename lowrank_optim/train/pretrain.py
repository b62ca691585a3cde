"""The pretraining loop: one method on one token stream, with evaluation, checkpoints and resume.

Per update: ``accumulation`` micro-batches of ``batch_size`` random windows (loss divided by
``accumulation``), one optimizer update (or per-layer updates during the last backward), then one
scheduler step (cosine, 10% warmup, to 10% of the peak lr). Throughput is tokens of the training
batches per second of wall time, evaluation and checkpointing included (the papers' convention), except
the one update profiled for its memory peak.

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) are written atomically (``.._io``) and
carry what a resume needs to verify them: a format name and version, a description of the run (method,
preset, model config, settings, a fingerprint of the tokens) and a SHA-256 over everything else.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .._io import atomic_save, check_writable_file
from ..data import TokenStream
from ..memory import peak_extra_memory
from ..models import LlamaConfig
from ..optim import optimizer_state_bytes
from .measure import tensor_bytes
from .methods import MethodPreset, build_model, build_optimizer, cosine_with_warmup
from .per_layer import PerLayerUpdates
from .progress import Progress

__all__ = [
    "CHECKPOINT_FORMAT",
    "data_fingerprint",
    "CHECKPOINT_VERSION",
    "RESUME_SETTINGS",
    "TrainSettings",
    "check_checkpoint_target",
    "check_resumable",
    "evaluate",
    "load_checkpoint",
    "load_trained_model",
    "pretrain",
    "save_checkpoint",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How to train (the method is given separately as a :class:`MethodPreset`)."""

    steps: int
    batch_size: int
    seq_len: int
    accumulation: int = 1
    per_layer: bool = False
    eval_every: int = 0  # 0: evaluate only at the start and the end
    eval_batches: int = 8
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    gradient_checkpointing: bool = False
    measure_memory: bool = True  # peak of the last update (profiler on CPU), also the stacked-bar parts
    log_every: int = 0  # 0: steps / 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "accumulation", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        for name in ("eval_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype ({self.dtype!r}) must be one of {sorted(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def check_window_fits(seq_len: int, model_config: LlamaConfig, config_name: str | None = None) -> None:
    """A training window is ``seq_len + 1`` tokens (inputs plus their next-token targets, shifted inside
    the model), so ``seq_len`` must be below the model's ``max_seq_len``."""
    if seq_len + 1 > model_config.max_seq_len:
        where = f" of config {config_name!r}" if config_name is not None else ""
        raise ValueError(
            f"seq_len ({seq_len}) must be < max_seq_len ({model_config.max_seq_len}){where}: a training window "
            "is seq_len + 1 tokens (the inputs and their next-token targets)"
        )


@torch.no_grad()
def evaluate(model: nn.Module, stream: TokenStream, batch_size: int, max_batches: int) -> float:
    """Mean next-token loss over the first ``max_batches`` validation batches (the same every call)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_targets = 0.0, 0
    for batch in stream.eval_batches(batch_size, max_batches):
        batch = batch.to(device)
        num_targets = batch.shape[0] * (batch.shape[1] - 1)
        total_loss += model(batch, labels=batch).loss.float().item() * num_targets
        total_targets += num_targets
    model.train(was_training)
    return total_loss / total_targets


def _sample(stream: TokenStream, generator: torch.Generator, batch_size: int) -> Tensor:
    """``batch_size`` random training windows, drawn exactly as ``TokenStream.train_batches``."""
    num_starts = len(stream.train_tokens) - stream.window + 1
    starts = torch.randint(num_starts, (batch_size,), generator=generator)
    return stream.train_tokens[starts[:, None] + torch.arange(stream.window)]


CHECKPOINT_FORMAT = "lowrank_optim.pretrain_checkpoint"
#: 2: the first versioned format. The unversioned dicts written before (version "1", no ``format`` key)
#: carry nothing to verify a resume against, and are refused.
CHECKPOINT_VERSION = 2
#: TrainSettings fields a resume must request with the saved values: they change what is computed (the
#: schedule's length, the batches, the initial weights, the arithmetic's precision) or what a curve means
#: (eval_batches: the held-out set of every evaluation). The others only change how the same updates
#: are run or reported (device, per_layer and gradient_checkpointing give the same arithmetic,
#: eval_every/log_every/measure_memory what is measured) and may differ.
RESUME_SETTINGS = ("steps", "batch_size", "seq_len", "accumulation", "seed", "dtype", "eval_batches")

# What torch.load (2.13) itself detects in a damaged file, measured on a small torch.save archive:
# * a flipped byte inside a tensor record (``archive/data/0``): nothing. The zip records have CRC-32s,
#   but PyTorchStreamReader does not check them on read; the tensor silently loads with a wrong value.
# * a flipped bit in the pickle (``data.pkl``, 232 bytes, every bit position 0 tried): 22 positions
#   harmless, 29 load a silently different value (a digit, a letter, a key), the other 181 raise
#   assorted errors (UnpicklingError, UnicodeDecodeError, IndexError, TypeError, RuntimeError).
# * a truncated file: RuntimeError "failed finding central directory" (the zip directory is at the end).
# So the checkpoint carries its own checksum: SHA-256 over a canonical encoding of every entry
# (:func:`_digest`), tensors' bytes included. It is computed from the objects being saved and, on load,
# from the loaded objects; the tensors are hashed one at a time in place (a transient copy only for a
# non-contiguous one), so a checkpoint is never held twice in memory, and no second pass over the file
# is needed.
_CHECKSUM = "checksum"


def _put(hasher: Any, tag: bytes, payload: bytes) -> None:
    # Tag and length prefix: ["ab", "c"] and ["a", "bc"] must not hash alike.
    hasher.update(tag + len(payload).to_bytes(8, "little") + payload)


def _digest(value: Any, hasher: Any) -> None:
    """Feed a canonical encoding of ``value`` (what ``torch.load(weights_only=True)`` gives back: dicts,
    lists/tuples, strings, numbers, None, dtypes, strided tensors) into ``hasher``. Lists and tuples
    encode alike (a container type is not the data); anything else is refused, so that no entry of a
    checkpoint could escape the checksum."""
    if isinstance(value, Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"cannot checksum a tensor with layout {value.layout}")
        tensor = value.detach().cpu().resolve_conj().resolve_neg().reshape(-1)  # reshape: a copy if not contiguous
        _put(hasher, b"T", f"{tensor.dtype}{tuple(value.shape)}".encode())
        _put(hasher, b"t", tensor.view(torch.uint8).numpy().data)  # type: ignore[arg-type]
    elif isinstance(value, dict):
        _put(hasher, b"D", str(len(value)).encode())
        for key, item in value.items():
            _digest(key, hasher)
            _digest(item, hasher)
    elif isinstance(value, (list, tuple)):
        _put(hasher, b"L", str(len(value)).encode())
        for item in value:
            _digest(item, hasher)
    elif isinstance(value, str):
        _put(hasher, b"S", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, bool):  # before int: bool is an int
        _put(hasher, b"B", b"1" if value else b"0")
    elif isinstance(value, int):
        _put(hasher, b"I", str(value).encode())
    elif isinstance(value, float):
        _put(hasher, b"F", value.hex().encode())
    elif value is None:
        _put(hasher, b"N", b"")
    elif isinstance(value, torch.dtype):
        _put(hasher, b"Y", str(value).encode())
    else:
        raise TypeError(f"cannot checksum a value of type {type(value).__name__}")


def _content_digest(content: dict[str, Any]) -> str:
    hasher = hashlib.sha256()
    _digest({key: value for key, value in content.items() if key != _CHECKSUM}, hasher)
    return hasher.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (plain containers and tensors; by :func:`pretrain`: ``run``, ``step``, model,
    optimizer, scheduler, RNG states, curves) to ``path`` atomically, with the format name, version and
    a SHA-256 checksum added, so that :func:`load_checkpoint` can detect any damage."""
    content = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    content.update((key, value) for key, value in state.items() if key not in content)
    content[_CHECKSUM] = {"algorithm": "sha256", "digest": _content_digest(content)}
    atomic_save(content, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``torch.load(weights_only=True)``, on the
    CPU) and verify it: format, version and checksum. Raises ``ValueError`` saying what is wrong (not
    readable: truncated or damaged; not a checkpoint of this format; an unsupported version; checksum
    mismatch: damaged)."""
    shown = str(path)
    if not Path(path).is_file():
        raise ValueError(f"checkpoint ({shown!r}) does not exist or is not a file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises a different type for each kind of damage (see above)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"checkpoint ({shown!r}) cannot be read: it is truncated or corrupted, or not a checkpoint "
            f"({type(error).__name__}: {first_line})"
        ) from error
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        if isinstance(content, dict) and "model" in content and "optimizer" in content and "format" not in content:
            raise ValueError(
                f"checkpoint ({shown!r}) has no format version: it was written by an older lowrank_optim, without "
                "the checksum and run description a resume is verified against; start a new run instead"
            )
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"checkpoint ({shown!r}) is not a {CHECKPOINT_FORMAT!r} file (found format {found!r})")
    if content.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint ({shown!r}) has format version {content.get('version')!r}; this lowrank_optim reads "
            f"version {CHECKPOINT_VERSION}"
        )
    checksum = content.get(_CHECKSUM)
    if not (
        isinstance(checksum, dict) and checksum.get("algorithm") == "sha256" and isinstance(checksum.get("digest"), str)
    ):
        raise ValueError(
            f"checkpoint ({shown!r}) is corrupted: its checksum entry is missing or malformed ({checksum!r})"
        )
    try:
        actual = _content_digest(content)
    except TypeError as error:  # damage that unpickled into an unexpected type
        raise ValueError(f"checkpoint ({shown!r}) is corrupted: {error}") from error
    if actual != checksum["digest"]:
        raise ValueError(
            f"checkpoint ({shown!r}) is corrupted: SHA-256 of its contents is {actual[:16]}..., the checkpoint "
            f"recorded {checksum['digest'][:16]}..."
        )
    return content


def data_fingerprint(stream: TokenStream) -> dict[str, Any]:
    """Sizes and SHA-256 of the token stream: the saved data-sampler state only means the same batches on
    the same tokens. Hashing is about 1 GB/s, a small fraction of even one update per token."""
    hasher = hashlib.sha256()
    _digest([stream.train_tokens, stream.val_tokens], hasher)
    return {
        "train_tokens": len(stream.train_tokens),
        "val_tokens": len(stream.val_tokens),
        "sha256": hasher.hexdigest(),
    }


def load_trained_model(path: str | os.PathLike[str], *, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(model, run description)``: the built-in model a :func:`pretrain` checkpoint trained, with its
    weights (verified by :func:`load_checkpoint`), rebuilt from the recorded config, preset, seed and
    dtype. A checkpoint of a user's own model is refused: load its ``"model"`` state dict into that model."""
    content = load_checkpoint(path)
    run = content.get("run") or {}
    model_info = run.get("model_config") or {}
    if "class" in model_info:
        raise ValueError(
            f"checkpoint ({str(path)!r}) holds a model of your own ({model_info['class']}), which cannot be rebuilt "
            "from it: load its 'model' state dict (load_checkpoint(path)['model']) into that model"
        )
    config = LlamaConfig.from_dict(model_info)
    preset = MethodPreset(**run["preset"])
    settings = run["settings"]
    model = build_model(config, preset=preset, device=device, dtype=_DTYPES[settings["dtype"]], seed=settings["seed"])
    model.load_state_dict(content["model"])
    return model, run


def _plain(value: Any) -> Any:
    """``value`` as what a checkpoint's run description may hold (``torch.load(weights_only=True)`` and
    the checksum read plain numbers, strings, None, lists and dicts); anything else by its ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return repr(value)


def _model_description(model: nn.Module) -> dict[str, Any]:
    """What identifies a user's model for a resume: its class, parameter count and a SHA-256 over its
    parameter names and shapes (the values are the checkpoint's)."""
    hasher = hashlib.sha256()
    for name, param in model.named_parameters():
        hasher.update(f"{name}:{tuple(param.shape)};".encode())
    cls = type(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": sum(param.numel() for param in model.parameters()),
        "shapes_sha256": hasher.hexdigest(),
    }


def _optimizer_description(optimizer: Optimizer) -> dict[str, Any]:
    """A user's optimizer for a resume: its class, defaults and the settings of each param group (with its
    size), as built: loading the saved state dict would otherwise replace changed group settings silently."""
    cls = type(optimizer)
    groups = [
        {"parameters": len(group["params"]), **{key: _plain(value) for key, value in group.items() if key != "params"}}
        for group in optimizer.param_groups
    ]
    return {"optimizer": f"{cls.__module__}.{cls.__qualname__}", "defaults": _plain(optimizer.defaults), "groups": groups}


def _run_description(
    name: str, preset: dict[str, Any], model: dict[str, Any], settings: TrainSettings, stream: TokenStream
) -> dict[str, Any]:
    return {
        "method": name,
        "preset": preset,
        "model_config": model,
        "settings": asdict(settings),
        "data": data_fingerprint(stream),
    }


def check_resumable(saved: Any, requested: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuse (``ValueError``) to resume the run described by ``requested`` from a checkpoint whose run
    description ``saved`` differs in the method, a preset field, a model config field, one of
    :data:`RESUME_SETTINGS` or the tokens; the message lists every difference, saved vs requested."""
    shown = str(path)
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint ({shown!r}) has no run description to verify the resume against")
    if saved.get("method") != requested["method"]:
        raise ValueError(
            f"checkpoint ({shown!r}) was written by method {saved.get('method')!r}; this run asks for method "
            f"{requested['method']!r}"
        )
    unset = "(unset)"
    differences = []
    for section, label, keys in (
        ("preset", "preset field", None),
        ("model_config", "model config field", None),
        ("settings", "setting", RESUME_SETTINGS),
        ("data", "tokens", None),
    ):
        old, new = saved.get(section) or {}, requested[section]
        for key in keys or sorted(set(old) | set(new)):
            if old.get(key, unset) != new.get(key, unset):
                differences.append(f"{label} {key!r}: saved {old.get(key, unset)!r}, requested {new.get(key, unset)!r}")
    if differences:
        raise ValueError(
            f"checkpoint ({shown!r}) does not match this run, so it is not resumed: " + "; ".join(differences)
        )


def check_checkpoint_target(
    checkpoint: str | os.PathLike[str] | None,
    *,
    resume: bool,
    overwrite: bool,
    names: tuple[str, str, str] = ("checkpoint", "resume=True", "overwrite=True"),
) -> None:
    """Before any training: ``checkpoint`` can be written later (see ``_io.check_writable_file``), exists
    if ``resume``, and, if it exists, is replaced only with ``overwrite`` (a new run must not destroy
    another run's checkpoint by accident). ``names``: how the caller calls the checkpoint path, resume
    and overwrite (the CLI: ``--checkpoint``, ``--resume``, ``--overwrite``)."""
    what, resume_name, overwrite_name = names
    if resume and overwrite:
        raise ValueError(f"{resume_name} continues the checkpoint and {overwrite_name} replaces it: choose one")
    if checkpoint is None:
        if resume:
            raise ValueError(f"{resume_name} needs an existing checkpoint file, got {what}=None")
        return
    check_writable_file(checkpoint, what)
    exists = Path(checkpoint).exists()
    if resume and not exists:
        raise ValueError(f"{resume_name} needs an existing checkpoint file, got {what}={str(checkpoint)!r}")
    if exists and not resume and not overwrite:
        raise ValueError(
            f"{what} ({str(checkpoint)!r}) already exists; pass {resume_name} to continue that run or "
            f"{overwrite_name} to replace it"
        )


def _check_user_model(model: nn.Module, settings: TrainSettings) -> None:
    """A user's model is trained as it is: the settings that the built-in LLaMA is built from must agree
    with it rather than be silently ignored."""
    params = list(model.parameters())
    if not params:
        raise ValueError(f"model ({type(model).__name__}) has no parameters to train")
    devices = sorted({str(param.device) for param in params})
    dtypes = sorted({str(param.dtype).removeprefix("torch.") for param in params})
    target = torch.device(settings.device)
    # "cuda" means the current CUDA device: parameters report "cuda:0", which is the same place.
    placed = len({param.device for param in params}) == 1 and all(
        param.device.type == target.type and target.index in (None, param.device.index) for param in params
    )
    if not placed:
        raise ValueError(
            f"settings.device ({settings.device!r}) must be where the model's parameters are ({devices}): a "
            "model passed to pretrain is trained where it is (move it, or change settings.device)"
        )
    if dtypes != [settings.dtype]:
        raise ValueError(
            f"settings.dtype ({settings.dtype!r}) must be the dtype of the model's parameters ({dtypes}): a model "
            "passed to pretrain is trained in its own dtype (convert it, or change settings.dtype)"
        )
    if settings.gradient_checkpointing:
        raise ValueError(
            "settings.gradient_checkpointing=True applies to the built-in LLaMA; a model passed to pretrain is "
            "trained as it is (switch checkpointing on in the model itself)"
        )


def pretrain(
    model: LlamaConfig | nn.Module,
    method: MethodPreset | Optimizer | Callable[[nn.Module], Optimizer],
    stream: TokenStream,
    settings: TrainSettings,
    *,
    scheduler: Callable[[Optimizer, int], LRScheduler] | None = None,
    name: str | None = None,
    callbacks: Sequence[Callable[[int, nn.Module], None]] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a model with a method on ``stream``; returns curves and summary figures.

    ``model``: a :class:`LlamaConfig` (the built-in LLaMA, built for the method by :func:`build_model`
    from ``settings.seed``, ``dtype``, ``device`` and ``gradient_checkpointing``) or your own
    ``nn.Module``, trained as it is. A module is called ``model(input_ids, labels=input_ids)`` and must
    return an object with a scalar ``.loss`` (the next-token convention of our LLaMA and Hugging Face
    causal LMs: the shift happens inside); its parameters must be on ``settings.device`` in
    ``settings.dtype``. ``method``: a :class:`MethodPreset` (its registered method builds the optimizer;
    with your own module, only methods that do not replace layers: convert first, e.g.
    ``convert_to_sltrain``, and pass an optimizer), an optimizer over the model's parameters, or a
    callable ``model -> optimizer``. ``scheduler``: ``(optimizer, total_steps) -> LRScheduler``,
    stepped once per update (default :func:`cosine_with_warmup`). ``name``: how logs and results call
    the run (default: the method's name, or the optimizer's class name). ``callbacks``: each is called
    ``callback(update, model)`` after every update (e.g. :class:`lowrank_optim.welore.SpectrumTracker`).

    ``checkpoint``: file written atomically every ``checkpoint_every`` updates and at the end (model,
    optimizer, scheduler, update count, data-sampler and global RNG states, the run's description and a
    checksum; see :func:`save_checkpoint`). With ``resume=True`` training continues from it
    bit-identically (loaded with ``torch.load(weights_only=True)``), after it has been verified against
    this run (:func:`load_checkpoint`, :func:`check_resumable`; for your own model: its class, parameter
    names and shapes, and the optimizer's class and defaults). Without ``resume`` an existing
    ``checkpoint`` is replaced only with ``overwrite=True``. All of this is checked before the model is
    built, so a mistake costs seconds, not a run.
    """
    if settings.seq_len != stream.seq_len:
        raise ValueError(f"settings.seq_len ({settings.seq_len}) must equal the stream's seq_len ({stream.seq_len})")
    if isinstance(model, LlamaConfig):
        check_window_fits(settings.seq_len, model)
        if not isinstance(method, MethodPreset):
            raise ValueError(
                f"method ({type(method).__name__}) must be a MethodPreset when model is a LlamaConfig: the model is "
                "built for the method; to train with your own optimizer, pass your model as well"
            )
    elif isinstance(model, nn.Module):
        _check_user_model(model, settings)
        if isinstance(method, MethodPreset) and method.spec.layer is not None:
            raise ValueError(
                f"method {method.method!r} replaces the target linears (Method.layer), which pretrain does not do to "
                "a model you pass: convert it first (e.g. lowrank_optim.nn.convert_to_sltrain) and pass its optimizer "
                "(torch.optim.AdamW(model.parameters(), ...))"
            )
    else:
        raise ValueError(f"model ({type(model).__name__}) must be a LlamaConfig or an nn.Module")
    if not isinstance(method, (MethodPreset, Optimizer)) and not callable(method):
        raise ValueError(
            f"method ({type(method).__name__}) must be a MethodPreset, an optimizer, or a callable model -> optimizer"
        )
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every ({checkpoint_every}) must be >= 0 (0: only at the end)")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name ({name!r}) must be a non-empty string")
    check_checkpoint_target(checkpoint, resume=resume, overwrite=overwrite)
    # The run's description first (for a resume check before anything slow); the built-in model after.
    optimizer: Optimizer | None = None
    if isinstance(method, MethodPreset):
        method_name, preset_info = method.method, method.to_dict()
    else:
        assert isinstance(model, nn.Module)  # a LlamaConfig with anything but a preset is refused above
        optimizer = method if isinstance(method, Optimizer) else method(model)
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"the optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        _check_optimizes(optimizer, model)
        method_name, preset_info = type(optimizer).__name__, _optimizer_description(optimizer)
    model_info = model.to_dict() if isinstance(model, LlamaConfig) else _model_description(model)
    run = _run_description(method_name, preset_info, model_info, settings, stream)
    saved: dict[str, Any] | None = None
    if resume:
        assert checkpoint is not None  # check_checkpoint_target refuses resume without one
        saved = load_checkpoint(checkpoint)
        check_resumable(saved.get("run"), run, checkpoint)
    device = torch.device(settings.device)
    if isinstance(model, LlamaConfig):
        assert isinstance(method, MethodPreset)  # checked above
        model = build_model(
            model,
            preset=method,
            device=device,
            dtype=settings.torch_dtype,
            seed=settings.seed,
            gradient_checkpointing=settings.gradient_checkpointing,
        )
    if optimizer is None:
        assert isinstance(method, MethodPreset)
        optimizer = build_optimizer(model, method)
    device = next(model.parameters()).device  # batches go where the model is ("cuda" resolved to its index)
    name = (name or method_name) + ("+per-layer" if settings.per_layer else "")
    model.train()
    schedule = (scheduler or cosine_with_warmup)(optimizer, settings.steps)
    updates = PerLayerUpdates(optimizer) if settings.per_layer else None
    data_generator = torch.Generator().manual_seed(settings.seed)
    start_step = 0
    history: dict[str, list] = {"train": [], "eval": []}
    resumed = saved is not None
    if saved is not None:
        # Loaded on the CPU: the RNG states must be CPU tensors; load_state_dict moves the rest to the
        # parameters' device.
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        data_generator.set_state(saved["data_rng"])
        torch.set_rng_state(saved["cpu_rng"])
        start_step = int(saved["step"])
        history = {"train": [tuple(x) for x in saved["train_curve"]], "eval": [tuple(x) for x in saved["eval_curve"]]}
        saved = None  # the model and optimizer hold what they need: no second copy for the whole run
    log_every = settings.log_every or max(1, settings.steps // 10)
    progress = Progress(settings.steps, name, log=log, every=log_every, start=start_step)
    if resumed:
        progress.message(f"[{name}] resumed from {checkpoint} at update {start_step}")
    else:
        initial = evaluate(model, stream, settings.batch_size, settings.eval_batches)
        history["eval"].append((0, initial))
        progress.message(f"[{name}] update 0/{settings.steps}  eval loss {initial:.4f}")

    def save() -> None:
        assert checkpoint is not None  # called only when a checkpoint path was given
        save_checkpoint(
            checkpoint,
            {
                "run": run,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(),
                "data_rng": data_generator.get_state(),
                "cpu_rng": torch.get_rng_state(),
                "step": step,
                "train_curve": history["train"],
                "eval_curve": history["eval"],
            },
        )

    def update() -> float:
        total = 0.0
        for micro in range(settings.accumulation):
            batch = _sample(stream, data_generator, settings.batch_size).to(device)
            loss = model(batch, labels=batch).loss / settings.accumulation
            last = micro == settings.accumulation - 1
            if updates is None:
                loss.backward()
            else:
                updates.backward(loss, step=last)
            total += loss.item()
        if updates is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        schedule.step()
        return total

    tokens_per_update = settings.accumulation * settings.batch_size * settings.seq_len
    peak = None
    profiled_seconds = 0.0  # the profiled update is slower; it is left out of the throughput
    step = start_step
    start_time = time.perf_counter()
    for step in range(start_step + 1, settings.steps + 1):
        if settings.measure_memory and step == settings.steps and step > 1:
            # The last update is a steady-state one (the state exists): measure its allocator peak.
            resident = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()) + optimizer_state_bytes(optimizer)
            losses: list[float] = []

            def measured(losses: list[float] = losses) -> None:  # run once, right here
                losses.append(update())

            profile_start = time.perf_counter()
            peak = resident + peak_extra_memory(measured, device)
            profiled_seconds = time.perf_counter() - profile_start
            loss = losses[0]
        else:
            loss = update()
        history["train"].append((step, loss))
        for callback in callbacks:
            callback(step, model)
        if progress.tty or step % log_every == 0 or step == settings.steps:
            elapsed = time.perf_counter() - start_time
            rate = (step - start_step) * tokens_per_update / elapsed
            skipped = _skipped_updates(optimizer)
            note = f"  {skipped} parameter update(s) skipped so far (NaN/Inf gradients)" if skipped else ""
            # float(): a user's scheduler may hold its lrs as 0-dim tensors.
            progress.update(step, loss, float(schedule.get_last_lr()[0]), rate, note)
        if settings.eval_every and step % settings.eval_every == 0 and step != settings.steps:
            evaluated = evaluate(model, stream, settings.batch_size, settings.eval_batches)
            history["eval"].append((step, evaluated))
            progress.message(f"[{name}] update {step}/{settings.steps}  eval loss {evaluated:.4f}")
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
            save()
    seconds = time.perf_counter() - start_time - profiled_seconds
    timed_updates = settings.steps - start_step - (1 if profiled_seconds else 0)
    final = evaluate(model, stream, settings.batch_size, settings.eval_batches)
    history["eval"].append((settings.steps, final))
    if checkpoint is not None:
        save()
    progress.message(f"[{name}] final eval loss {final:.4f}  perplexity {math.exp(final):.2f}")
    param_bytes = tensor_bytes(model.parameters())
    return {
        "method": name,
        "preset": preset_info,
        "settings": asdict(settings),
        "initial_eval_loss": history["eval"][0][1],
        "final_eval_loss": final,
        "final_perplexity": math.exp(final),
        "tokens_per_s": timed_updates * tokens_per_update / seconds,
        "train_seconds": seconds,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "weight_bytes": param_bytes + tensor_bytes(model.buffers()),
        # Full gradients (of the trainable parameters: a user's model may freeze some) exist only without
        # per-layer updates, or between accumulated micro-batches.
        "gradient_bytes": 0 if settings.per_layer and settings.accumulation == 1 else tensor_bytes(
            param for param in model.parameters() if param.requires_grad
        ),
        "peak_bytes": peak,
        "train_curve": history["train"],
        "eval_curve": history["eval"],
        "parameters": sum(p.numel() for p in model.parameters()),
        # Parameter updates the low-rank optimizers skipped for a NaN/Inf gradient, since this process
        # started (nonfinite="skip"); torch's AdamW does not skip, so always 0 for adamw and sltrain.
        "skipped_updates": _skipped_updates(optimizer),
    }


def _check_optimizes(optimizer: Optimizer, model: nn.Module) -> None:
    """Refuse an optimizer that does not update every trainable parameter of ``model``, or updates
    tensors that are not the model's (a model copied after the optimizer was built, say)."""
    owned = {id(param) for group in optimizer.param_groups for param in group["params"]}
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    ids = {id(param) for param in model.parameters()}
    missing = [name for name, param in model.named_parameters() if param.requires_grad and id(param) not in owned]
    strangers = len(owned - ids)
    if missing or strangers:
        details = []
        if missing:
            details.append(
                f"{len(missing)} of the model's {len(trainable)} trainable parameters are not in it (first: {missing[:3]})"
            )
        if strangers:
            details.append(f"it holds {strangers} tensor(s) that are not parameters of the model")
        raise ValueError(
            f"the optimizer ({type(optimizer).__name__}) must update exactly the model's trainable parameters: "
            + "; ".join(details)
        )


def _skipped_updates(optimizer: Optimizer) -> int:
    """How many parameter updates ``optimizer`` skipped for non-finite gradients (0 for torch's optimizers)."""
    counts = getattr(optimizer, "skipped_updates", None)
    return sum(counts().values()) if callable(counts) else 0
