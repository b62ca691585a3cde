"""Byte-level tokenizer, an embedded text corpus and batch sampling for the demo and tests.

The corpus needs no download: it is the Python standard library's own source code, read from the
running interpreter, so every machine with the same Python version gets the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CORPUS_BYTES",
    "ByteTokenizer",
    "TokenStream",
    "load_text_files",
    "stdlib_corpus",
]

#: Enough text for a few thousand CPU demo steps while reading in well under a second.
DEFAULT_CORPUS_BYTES = 4 * 1024 * 1024

# Stdlib directories that are not stdlib source worth training on, or are third-party code.
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


class ByteTokenizer:
    """UTF-8 bytes as token ids ``0..255`` plus an end-of-document token ``eos`` (256)."""

    eos: int = 256
    vocab_size: int = 257

    def encode(self, text: str | bytes) -> Tensor:
        """1-D int64 token ids of ``text`` (strings are UTF-8 encoded); no ``eos`` is appended."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: Tensor | Iterable[int]) -> str:
        """Text of ``ids``; ``eos`` becomes a newline and invalid UTF-8 becomes U+FFFD."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        for value in values:
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"token id ({value}) must be in [0, {self.vocab_size})")
        documents = [bytes(values[start:end]) for start, end in _split_at(values, self.eos)]
        return "\n".join(document.decode("utf-8", errors="replace") for document in documents)

    def encode_documents(self, documents: Iterable[str | bytes]) -> Tensor:
        """All documents' ids concatenated, each followed by ``eos`` so the model sees boundaries."""
        eos = torch.tensor([self.eos], dtype=torch.long)
        pieces = [piece for document in documents for piece in (self.encode(document), eos)]
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)


def _split_at(values: Sequence[int], separator: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` bounds of the runs of ``values`` between ``separator`` entries."""
    start = 0
    for index, value in enumerate(values):
        if value == separator:
            yield start, index
            start = index + 1
    yield start, len(values)


def _stdlib_source_files() -> Iterator[Path]:
    """The standard library's ``.py`` files in a fixed order (sorted, top-down)."""
    root = Path(os.__file__).resolve().parent
    for directory, subdirectories, files in os.walk(root):
        # Sorting in place fixes os.walk's traversal order, which is filesystem-dependent otherwise.
        subdirectories[:] = sorted(name for name in subdirectories if name not in _SKIPPED_STDLIB_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory, name)


def stdlib_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> Tensor:
    """Token ids (``ByteTokenizer``) of the standard library's source, ``eos``-separated, ``max_bytes`` long.

    Deterministic for a given Python installation; only the files needed to reach ``max_bytes`` are read.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes ({max_bytes}) must be >= 1")
    tokenizer = ByteTokenizer()
    documents: list[bytes] = []
    total = 0
    for path in _stdlib_source_files():
        if total >= max_bytes:
            break
        document = path.read_bytes()
        documents.append(document)
        total += len(document) + 1  # + eos
    if not documents:
        raise RuntimeError(f"no .py files found under the standard library directory {Path(os.__file__).parent}")
    return tokenizer.encode_documents(documents)[:max_bytes]


def read_documents(paths: Iterable[str | os.PathLike[str]]) -> list[str | bytes]:
    """User text as documents: each plain file is one (raw bytes), each ``.jsonl`` line's ``"text"`` is one."""
    documents: list[str | bytes] = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as file:
                for line_number, line in enumerate(file, start=1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(
                            f"{path}:{line_number}: each .jsonl line must be an object with a string 'text' field"
                        )
                    documents.append(record["text"])
        else:
            documents.append(path.read_bytes())
    return documents


def load_text_files(paths: Iterable[str | os.PathLike[str]], tokenizer_file: str | None = None) -> Tensor:
    """Token ids of user text (documents as :func:`read_documents` splits them).

    Without ``tokenizer_file``: the byte tokenizer, documents separated by its ``eos``. With a Hugging Face
    ``tokenizers`` JSON file (needs the ``tokenizers`` package): each document encoded by it (raw files
    decoded as UTF-8, undecodable bytes replaced) and the ids concatenated; separators are whatever the
    tokenizer's own post-processor adds (e.g. T5's ``</s>``).
    """
    documents = read_documents(paths)
    if tokenizer_file is None:
        return ByteTokenizer().encode_documents(documents)
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise ValueError(
            f"tokenizer_file ({tokenizer_file!r}) needs the 'tokenizers' package (pip install tokenizers)"
        ) from error
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    texts = [doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc for doc in documents]
    ids = [token_id for encoding in tokenizer.encode_batch(texts) for token_id in encoding.ids]
    return torch.tensor(ids, dtype=torch.long)


class TokenStream:
    """A token sequence split into a training head and a held-out validation tail.

    Training batches are random contiguous windows of ``seq_len + 1`` tokens (so each window gives
    ``seq_len`` next-token targets when passed as both inputs and labels); evaluation batches are
    the validation tail cut into consecutive windows, always the same ones.
    """

    def __init__(self, tokens: Tensor, seq_len: int, val_fraction: float = 0.05) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len < 1:
            raise ValueError(f"seq_len ({seq_len}) must be >= 1")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction ({val_fraction}) must be in (0, 1)")
        self.seq_len = seq_len
        self.window = seq_len + 1
        num_val = int(len(tokens) * val_fraction)
        self.train_tokens = tokens[: len(tokens) - num_val]
        self.val_tokens = tokens[len(tokens) - num_val :]
        for split, split_tokens in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(split_tokens) < self.window:
                raise ValueError(
                    f"the {split} split has {len(split_tokens)} tokens, fewer than seq_len + 1 ({self.window}); "
                    "use more text or a shorter seq_len"
                )

    @property
    def num_eval_windows(self) -> int:
        return len(self.val_tokens) // self.window

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Tensor]:
        """Endless ``(batch_size, seq_len + 1)`` int64 batches; the same seed gives the same batches."""
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        generator = torch.Generator().manual_seed(seed)
        num_starts = len(self.train_tokens) - self.window + 1
        offsets = torch.arange(self.window)
        while True:
            starts = torch.randint(num_starts, (batch_size,), generator=generator)
            yield self.train_tokens[starts[:, None] + offsets]

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[Tensor]:
        """Consecutive non-overlapping validation windows, ``(<= batch_size, seq_len + 1)`` each."""
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        windows = self.val_tokens[: self.num_eval_windows * self.window].view(-1, self.window)
        for batch_index, batch in enumerate(windows.split(batch_size)):
            if max_batches is not None and batch_index >= max_batches:
                return
            yield batch
