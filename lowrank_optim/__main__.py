"""Command line: ``lowrank-optim <command> [options]`` or ``python -m lowrank_optim <command> [options]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .train.methods import METHODS

if TYPE_CHECKING:
    from torch import Tensor

_DTYPE_NAMES = ("float32", "bfloat16")
#: Seeds per method of ``demo`` (``compare``: 1) unless ``--seeds`` says.
DEMO_SEEDS = 3


def _method_list(text: str) -> list[str]:
    methods = [method.strip() for method in text.split(",") if method.strip()]
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: choose a comma-separated list from {', '.join(METHODS)} (or empty)")
    return methods


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


def _number_list(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be comma-separated numbers, e.g. -0.5,0,0.5") from None


def _positive_float(text: str) -> float:
    import math

    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number > 0")
    return value


def _add_model_options(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument(
        "--config",
        default=default_config,
        metavar="NAME_OR_JSON",
        help="LLaMA config: packaged name (test, tiny, 60m, 130m, 350m, 1b, 3b, 7b) or a LlamaConfig JSON path "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--presets",
        metavar="NAME_OR_JSON",
        help="method presets: packaged size name (test, tiny, 60m, 130m, 350m, 1b, 7b) or a JSON path with one "
        "object per method (default: the --config name's, or for a config file those of the packaged size nearest "
        "in parameter count)",
    )


def _add_compare_options(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser, "tiny")
    parser.add_argument("--methods", type=_method_list, metavar="LIST",
                        help=f"methods to train, comma-separated from {', '.join(METHODS)} (default: every method the "
                        "presets have)")
    parser.add_argument("--per-layer-methods", type=_method_list, metavar="LIST",
                        help="methods whose per-layer-update variant also runs (default: as --methods; empty string: none)")
    parser.add_argument("--steps", type=_positive, metavar="N", help="updates per run (default: 200)")
    parser.add_argument("--tokens-budget", type=_positive, metavar="T",
                        help="instead of --steps: training tokens per run, the same for every method "
                        "(T // (batch x seq-len) updates)")
    parser.add_argument("--per-layer-steps", type=int, default=30, metavar="N",
                        help="updates per per-layer variant; their arithmetic equals the normal run's, so they only "
                        "measure speed and memory (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help="sequences per update, also per eval batch (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, metavar="L",
                        help="tokens per sequence, below the config's max_seq_len (default: %(default)s)")
    parser.add_argument("--text", nargs="+", default=[], metavar="FILE",
                        help="train on these files (.jsonl: each line's 'text'; other files: raw bytes) instead of "
                        "the built-in corpus (the Python standard library's source)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the initial weights and the batch order, shared by all methods (default: %(default)s)")
    parser.add_argument("--eval-batches", type=int, default=8, metavar="N",
                        help="held-out batches per evaluation, always the same ones (default: %(default)s)")
    parser.add_argument("--out", default="demo_out", metavar="DIR",
                        help="directory for results.json, loss_curves.png and memory.png (default: %(default)s)")
    parser.add_argument("--no-estimate", dest="estimate", action="store_false",
                        help="skip the estimated-memory table for the paper sizes at the end")
    parser.add_argument("--sweep-lr", action="store_true",
                        help="instead of one run per method: each method at 5 learning rates over 1.5 decades around "
                        "its preset (--steps updates each), then --seeds seeds at the best one; writes sweep.json and "
                        "sweep_lr.png (about (5 + seeds - 1) x the time of one run per method)")
    parser.add_argument("--sweep-offsets", type=_number_list, metavar="LIST",
                        help="with --sweep-lr: the grid as comma-separated log10 factors of each preset's lr "
                        "(default: -0.75,-0.375,0,0.375,0.75; a list starting with '-' is written --sweep-offsets=-0.5,0,0.5)")
    parser.add_argument("--sweep-field", choices=("lr", "other_lr"),
                        help="with --sweep-lr: the rate swept, lr or other_lr (the embeddings', lm_head's and norms' "
                        "rate, centred on the preset's other_lr or lr) (default: lr)")
    parser.add_argument("--grid-seeds", type=_positive, metavar="K",
                        help="with --sweep-lr: seeds at every grid point, the best being the lowest mean (default: 1)")
    parser.add_argument("--seeds", type=_positive, metavar="N",
                        help="seeds per method, --seed, --seed + 1, ...: the table gives the mean ± std of the final "
                        f"eval loss (default: compare 1, demo {DEMO_SEEDS}; with --sweep-lr: seeds at each method's best "
                        "learning rate, default 2)")
    parser.add_argument("--eval-every", type=_positive, metavar="N",
                        help="updates between evaluations (default: a quarter of the run)")
    parser.add_argument("--target-loss", type=_positive_float, metavar="L",
                        help="also report the training tokens and seconds each method needed to reach eval loss L "
                        "(at the resolution of --eval-every)")


def _add_moment_format_option(parser: argparse.ArgumentParser) -> None:
    from .optim.moments import moment_format_names

    parser.add_argument("--moment-format", choices=moment_format_names(), default=None,
                        help="how every parameter's Adam moments are stored: full (plain tensors) or 8bit (block-wise "
                        "uint8 codes + one fp32 scale per 256 elements; moments under 4096 elements stay plain) "
                        "(default: the preset's moment_format, else full)")


def _estimate(args: argparse.Namespace) -> int:
    import torch

    from .estimate import estimate_memory, format_estimate_table
    from .models import LlamaConfig
    from .train.methods import check_methods_available, presets_for_config

    dtype = getattr(torch, args.dtype)
    if args.config is None:
        if args.methods is not None or args.presets is not None:
            given = "--methods" if args.methods is not None else "--presets"
            raise ValueError(f"{given} applies with --config; without it the table covers every packaged paper size")
        print(format_estimate_table(dtype=dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                                    gradient_checkpointing=args.checkpointing,
                                    moment_format=args.moment_format or "full"))
        return 0
    config = LlamaConfig.from_name_or_path(args.config)
    presets, presets_name, line = presets_for_config(args.config, config, args.presets)
    methods = list(presets) if args.methods is None else args.methods
    check_methods_available(methods, presets, presets_name, "--methods")
    print(line)
    for method in methods:
        estimate = estimate_memory(config, presets[method], dtype=dtype, batch_size=args.batch_size,
                                   seq_len=args.seq_len, gradient_checkpointing=args.checkpointing,
                                   per_layer=args.per_layer, accumulation=args.accumulation,
                                   moment_format=args.moment_format)
        parts = {name: value / 1e9 for name, value in estimate.__dict__.items()}
        print(f"{method:8s} " + "  ".join(f"{name} {value:.3f}" for name, value in parts.items())
              + f"  weights+states {estimate.weights_and_states / 1e9:.3f}  total {estimate.total / 1e9:.3f} GB")
    return 0


def _measure(args: argparse.Namespace) -> int:
    import torch

    from .estimate import estimate_memory
    from .models import LlamaConfig
    from .train.measure import measure_training_step
    from .train.methods import check_methods_available, presets_for_config

    config = LlamaConfig.from_name_or_path(args.config)
    presets, presets_name, line = presets_for_config(args.config, config, args.presets)
    methods = list(presets) if args.methods is None else args.methods
    check_methods_available(methods, presets, presets_name, "--methods")
    print(line)
    dtype = getattr(torch, args.dtype)
    for method in methods:
        for per_layer in (False, True) if args.per_layer else (False,):
            measured = measure_training_step(config, presets[method], per_layer=per_layer, batch_size=args.batch_size,
                                             seq_len=args.seq_len, device=args.device, dtype=dtype,
                                             gradient_checkpointing=args.checkpointing, moment_format=args.moment_format)
            estimated = estimate_memory(config, presets[method], dtype=dtype, batch_size=args.batch_size,
                                        seq_len=args.seq_len, gradient_checkpointing=args.checkpointing,
                                        per_layer=per_layer, moment_format=args.moment_format)
            name = method + ("+per-layer" if per_layer else "")
            print(f"{name:18s} peak {measured.peak / 2**20:9.2f} MiB (estimated {estimated.total / 2**20:9.2f})  "
                  f"weights {measured.weights / 2**20:.2f}  grads {measured.gradients / 2**20:.2f}  "
                  f"states {measured.optimizer_states / 2**20:.2f} MiB (estimated {estimated.state_bytes / 2**20:.2f})  "
                  f"step {measured.step_seconds:.2f} s")
    return 0


def _load_tokens(path: str, vocab_size: int, config_name: str) -> Tensor:
    """The ``--tokens`` file as flat int64 ids, refused unless it is a .npy integer array with every id
    in ``[0, vocab_size)``: a float array would be truncated silently, a bool array read as ids 0 and 1,
    and an id outside the embedding table either crashes the first forward (too large) or indexes it
    from the end (negative)."""
    import numpy as np
    import torch

    try:
        with open(path, "rb") as file:
            # The header first: it names the dtype even of an object array, which np.load refuses to read.
            version = np.lib.format.read_magic(file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            dtype = read_header[version](file)[2] if version in read_header else None
    except FileNotFoundError:
        raise ValueError(f"--tokens ({path!r}) does not exist") from None
    except ValueError as error:  # not a .npy file (numpy: "the magic string is not correct", ...)
        raise ValueError(f"--tokens ({path!r}) is not a .npy array of integer token ids ({error})") from error
    if dtype is not None and dtype.kind not in "iu":
        raise ValueError(
            f"--tokens ({path!r}) holds an array of dtype {dtype}; token ids must be an integer array "
            "(int8-int64 or uint8-uint64)"
        )
    array = np.load(path, allow_pickle=False)  # no pickle: nothing in the file is executed
    if array.dtype.kind not in "iu":  # a .npy format version without a header reader above
        raise ValueError(f"--tokens ({path!r}) holds an array of dtype {array.dtype}; token ids must be an integer array")
    flat = array.reshape(-1)
    outside = np.flatnonzero((flat < 0) | (flat >= vocab_size))
    if outside.size:
        index = int(outside[0])
        where = f"position {index}"
        if array.ndim > 1:
            where += f" (index {tuple(int(i) for i in np.unravel_index(index, array.shape))} of shape {array.shape})"
        raise ValueError(
            f"--tokens ({path!r}): token id {int(flat[index])} at {where} is outside [0, {vocab_size}), the "
            f"vocab_size of config {config_name!r} ({outside.size} of {flat.size} ids are outside)"
        )
    return torch.from_numpy(flat.astype(np.int64))


def _pretrain(args: argparse.Namespace) -> int:
    from ._io import atomic_write_text, check_writable_file
    from .data import TokenStream, load_text_files, stdlib_corpus
    from .models import LlamaConfig
    from .train.methods import check_methods_available, presets_for_config
    from .train.pretrain import TrainSettings, check_checkpoint_target, check_window_fits, pretrain

    if args.tokens is not None and args.text:
        raise ValueError(
            f"--tokens ({args.tokens!r}) and --text ({' '.join(args.text)}) both give the training data; pass one"
        )
    if args.tokens is not None and args.tokenizer is not None:
        raise ValueError(
            f"--tokenizer ({args.tokenizer!r}) applies to --text files; --tokens ({args.tokens!r}) are already ids"
        )
    if args.tokenizer is not None and not args.text:
        raise ValueError(f"--tokenizer ({args.tokenizer!r}) applies to --text files; none were given")
    # Every output path before anything slow (reading text, training): a mistake must not cost a run.
    check_checkpoint_target(args.checkpoint, resume=args.resume, overwrite=args.overwrite,
                            names=("--checkpoint", "--resume", "--overwrite"))
    if args.json is not None:
        check_writable_file(args.json, "--json")
        if args.checkpoint is not None and Path(args.json).resolve() == Path(args.checkpoint).resolve():
            raise ValueError(f"--json ({args.json!r}) and --checkpoint ({args.checkpoint!r}) name the same file")
    config = LlamaConfig.from_name_or_path(args.config)
    check_window_fits(args.seq_len, config, args.config)  # before reading any text
    presets, presets_name, line = presets_for_config(args.config, config, args.presets)
    check_methods_available([args.method], presets, presets_name, "--method")
    preset = presets[args.method]
    if args.moment_format is not None:  # e.g. galore-torch's galore_adamw8bit_per_layer: --moment-format 8bit --per-layer
        preset = dataclasses.replace(preset, moment_format=args.moment_format)
    print(line)
    if args.tokens is not None:
        tokens = _load_tokens(args.tokens, config.vocab_size, args.config)
    elif args.text:
        tokens = load_text_files(args.text, tokenizer_file=args.tokenizer)
    else:
        tokens = stdlib_corpus()
    if tokens.numel() == 0:
        source = f"--tokens ({args.tokens!r})" if args.tokens is not None else f"--text ({', '.join(args.text)})"
        raise ValueError(f"{source} holds no tokens; the training data needs at least one window of seq_len + 1")
    if int(tokens.max()) >= config.vocab_size:
        raise ValueError(f"token id {int(tokens.max())} is outside the config's vocab_size ({config.vocab_size})")
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             accumulation=args.accumulation, per_layer=args.per_layer, eval_every=args.eval_every,
                             eval_batches=args.eval_batches, seed=args.seed, dtype=args.dtype, device=args.device,
                             gradient_checkpointing=args.checkpointing, measure_memory=False)
    result = pretrain(config, preset, TokenStream(tokens, args.seq_len), settings, checkpoint=args.checkpoint,
                      checkpoint_every=args.checkpoint_every, resume=args.resume, overwrite=args.overwrite)
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _welore(args: argparse.Namespace) -> int:
    import copy
    import math

    from ._io import atomic_write_text, check_writable_file
    from .data import TokenStream, load_text_files, stdlib_corpus
    from .nn import SLTrainLinear, merge_sltrain
    from .train.methods import TARGET_MODULES
    from .train.pretrain import data_fingerprint, evaluate, load_trained_model
    from .welore import compress, uniform_plan, weight_spectra, welore_plan

    if args.json is not None:
        check_writable_file(args.json, "--json")
    for target in args.targets:
        if not 0.0 < target < 1.0:
            raise ValueError(f"--targets: {target!r} must be a fraction in (0, 1)")
    model, run = load_trained_model(args.checkpoint)
    settings = run["settings"]
    tokens = load_text_files(args.text) if args.text else stdlib_corpus()
    stream = TokenStream(tokens, settings["seq_len"])
    same = data_fingerprint(stream) == run.get("data")
    config = run["model_config"]
    print(f"checkpoint {args.checkpoint}: {run['method']}, hidden {config['hidden_size']}, {config['num_layers']} layers; "
          "held-out tokens " + ("of the run" if same else "NOT the run's (other --text): the losses are on other data"))
    if any(isinstance(module, SLTrainLinear) for module in model.modules()):
        merge_sltrain(model)  # WeLore factors dense matrices: W = s·BA + S of each SLTrain layer
        print("SLTrain layers merged into their dense weights (merge_sltrain) before the analysis")
    spectra = weight_spectra(model, TARGET_MODULES)
    print(f"{'matrix':40s} {'shape':>11s} {'stable rank':>11s} {'90% energy':>10s}")
    for spectrum in spectra:
        shape = f"{spectrum.shape[0]}x{spectrum.shape[1]}"
        print(f"{spectrum.name:40s} {shape:>11s} {spectrum.stable_rank:11.2f} {spectrum.energy_rank(0.9):10d}")
    batch_size = settings["batch_size"]
    dense = evaluate(model, stream, batch_size, args.eval_batches)
    rows = [{"rule": "dense", "target": 0.0, "eval_loss": dense}]
    print(f"\ndense: eval loss {dense:.4f}, ppl {math.exp(dense):.2f} ({args.eval_batches} held-out batches)")
    print(f"{'compression':>26} {'params removed':>14} {'ranks removed':>13} {'LRCs':>5} {'eval loss':>9} {'ppl':>8}")
    for target in args.targets:
        for rule, planner in (("welore", welore_plan), ("uniform", uniform_plan)):
            plan = planner(spectra, target, by=args.by, min_ratio=args.min_ratio)
            compressed = copy.deepcopy(model)
            compress(compressed, plan, TARGET_MODULES)
            loss = evaluate(compressed, stream, batch_size, args.eval_batches)
            label = f"{rule} {target:.0%} of {args.by}"
            print(f"{label:>26} {plan.parameter_reduction:14.1%} {plan.rank_reduction:13.1%} "
                  f"{sum(m.lrc for m in plan.matrices):5d} {loss:9.4f} {math.exp(loss):8.2f}")
            rows.append({"rule": rule, "target": target, "eval_loss": loss, "plan": plan.to_dict()})
    if args.json is not None:
        report = {"checkpoint": str(args.checkpoint), "by": args.by, "min_ratio": args.min_ratio,
                  "held_out_of_the_run": same, "spectra": {s.name: s.to_dict() for s in spectra}, "results": rows}
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank-optim",
        description="Memory-efficient LLaMA pretraining: estimate, measure and compare "
        f"{', '.join(METHODS)}.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, help_text, seeds in (
        ("demo", "the CPU comparison on the tiny LLaMA with all methods at their tuned learning rates, "
         f"{DEMO_SEEDS} seeds each, plots and the estimate table (make demo)", DEMO_SEEDS),
        ("compare", "train chosen methods from the same start on the same batches; table, JSON and PNG plots", 1),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_compare_options(sub)
        sub.set_defaults(handler=_compare, default_seeds=seeds)

    sub = commands.add_parser("estimate", help="estimated memory per component from shapes alone",
                              description="Without --config: the table for 60M-7B beside the published estimates. "
                              "With --config: one line per method, in GB (1e9 bytes).")
    sub.add_argument("--config", metavar="NAME_OR_JSON", help="one LLaMA config (default: the 60M-7B table)")
    sub.add_argument("--presets", metavar="NAME_OR_JSON",
                     help="method presets (default: the --config name's, or the packaged size nearest in parameters)")
    sub.add_argument("--methods", type=_method_list, metavar="LIST",
                     help="methods, comma-separated (default: every method the presets have)")
    sub.add_argument("--dtype", choices=_DTYPE_NAMES, default="bfloat16",
                     help="weights, gradients and moments (default: %(default)s, the papers' pure bf16)")
    sub.add_argument("--batch-size", type=int, default=1, metavar="B", help="for activations (default: %(default)s)")
    sub.add_argument("--seq-len", type=int, default=256, metavar="L", help="for activations (default: %(default)s)")
    sub.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                     help="activation checkpointing per decoder layer (default: on)")
    sub.add_argument("--per-layer", action="store_true", help="per-layer updates (one gradient at a time)")
    sub.add_argument("--accumulation", type=int, default=1, metavar="K",
                     help="micro-batches per update; above 1 the full gradients persist (default: %(default)s)")
    _add_moment_format_option(sub)
    sub.set_defaults(handler=_estimate)

    sub = commands.add_parser("measure", help="measured peak memory of one training step, beside the estimate",
                              description="Peak of a steady-state step (forward, backward, optimizer step): "
                              "torch.cuda.max_memory_allocated on CUDA, the profiler's allocation timeline on CPU.")
    _add_model_options(sub, "tiny")
    sub.add_argument("--methods", type=_method_list, metavar="LIST",
                     help="methods, comma-separated (default: every method the presets have)")
    sub.add_argument("--per-layer", action="store_true", help="also measure each method with per-layer updates")
    sub.add_argument("--batch-size", type=int, default=1, metavar="B", help="(default: %(default)s)")
    sub.add_argument("--seq-len", type=int, default=128, metavar="L", help="(default: %(default)s)")
    sub.add_argument("--dtype", choices=_DTYPE_NAMES, default="float32", help="(default: %(default)s)")
    sub.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    sub.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    _add_moment_format_option(sub)
    sub.set_defaults(handler=_measure)

    sub = commands.add_parser("pretrain", help="pretrain one method; eval, checkpoints, resume, JSON results",
                              description="Cosine schedule with 10%% warmup to 10%% of the peak lr; progress lines; "
                              "throughput = training tokens per second of wall time.")
    _add_model_options(sub, "tiny")
    sub.add_argument("--method", choices=METHODS, default="galore", help="(default: %(default)s)")
    _add_moment_format_option(sub)
    sub.add_argument("--text", nargs="+", default=[], metavar="FILE",
                     help="text or .jsonl files (default: the built-in stdlib corpus, byte-level tokens)")
    sub.add_argument("--tokenizer", metavar="JSON",
                     help="a Hugging Face tokenizers file for --text (needs the 'tokenizers' package)")
    sub.add_argument("--tokens", metavar="NPY", help="pre-tokenized ids in a .npy array (flattened)")
    sub.add_argument("--steps", type=int, default=300, metavar="N", help="updates (default: %(default)s)")
    sub.add_argument("--batch-size", type=int, default=16, metavar="B", help="sequences per micro-batch (default: %(default)s)")
    sub.add_argument("--accumulation", type=int, default=1, metavar="K", help="micro-batches per update (default: %(default)s)")
    sub.add_argument("--seq-len", type=int, default=128, metavar="L", help="(default: %(default)s)")
    sub.add_argument("--per-layer", action="store_true", help="per-layer updates (no global-norm clipping)")
    sub.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    sub.add_argument("--dtype", choices=_DTYPE_NAMES, default="float32",
                     help="pure-precision weights and states (default: %(default)s)")
    sub.add_argument("--device", default="cpu", help="(default: %(default)s)")
    sub.add_argument("--eval-every", type=int, default=0, metavar="N", help="also evaluate every N updates")
    sub.add_argument("--eval-batches", type=int, default=8, metavar="N", help="(default: %(default)s)")
    sub.add_argument("--seed", type=int, default=0, metavar="S", help="(default: %(default)s)")
    sub.add_argument("--checkpoint", metavar="FILE", help="checkpoint file (written every --checkpoint-every and at the end)")
    sub.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="(default: only at the end)")
    sub.add_argument("--resume", action="store_true",
                     help="continue from --checkpoint, after verifying it (checksum, method, presets, model, settings)")
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an existing --checkpoint with a new run (without it, or --resume, an existing "
                     "checkpoint is an error)")
    sub.add_argument("--json", metavar="FILE", help="write the results (curves included) here")
    sub.set_defaults(handler=_pretrain)

    sub = commands.add_parser("welore", help="WeLore on a pretrain checkpoint: weight spectra, and held-out loss after "
                              "non-uniform (WeLore) vs uniform compression",
                              description="Stable and energy ranks of the attention and MLP matrices of a `pretrain` "
                              "checkpoint, then its held-out loss compressed at each target by WeLore's ranks and by one "
                              "uniform rank ratio (lowrank_optim.welore).")
    sub.add_argument("--checkpoint", required=True, metavar="FILE", help="a checkpoint written by `pretrain`")
    sub.add_argument("--targets", type=_number_list, default=[0.3, 0.5], metavar="LIST",
                     help="fractions to remove, comma-separated (default: 0.3,0.5)")
    sub.add_argument("--by", choices=("ranks", "parameters"), default="parameters",
                     help="what the targets count (default: %(default)s)")
    sub.add_argument("--min-ratio", type=float, default=0.0, metavar="R",
                     help="an LRC must drop more than this fraction of its ranks (default: %(default)s)")
    sub.add_argument("--text", nargs="+", default=[], metavar="FILE", help="held-out text (default: the built-in corpus)")
    sub.add_argument("--eval-batches", type=_positive, default=16, metavar="N", help="(default: %(default)s)")
    sub.add_argument("--json", metavar="FILE", help="write the spectra, plans and losses here")
    sub.set_defaults(handler=_welore)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        # Configuration mistakes (bad sizes, unknown names) read better without a traceback.
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    except OSError as error:
        # A full disk or a vanished directory at a write (lowrank_optim._io names the path and says the
        # previous file is intact): the message is what matters, not the traceback.
        parser.exit(1, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
