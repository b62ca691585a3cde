"""Byte tokenizer, embedded corpus and batch sampling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lowrank_optim.data import ByteTokenizer, TokenStream, load_text_files, stdlib_corpus

CORPUS_BYTES = 200_000


@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    return stdlib_corpus(max_bytes=CORPUS_BYTES)


@pytest.mark.parametrize("text", ["", "plain ascii", "naïve — ünïcödé ✓ 日本語", "line\nbreaks\tand\x00nul"])
def test_tokenizer_round_trip(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.long and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_tokenizer_documents_are_eos_separated() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode_documents(["ab", b"c"])
    assert ids.tolist() == [97, 98, tokenizer.eos, 99, tokenizer.eos]
    assert tokenizer.decode(ids) == "ab\nc\n"
    with pytest.raises(ValueError, match=re.escape("token id (257) must be in [0, 257)")):
        tokenizer.decode([257])


def test_stdlib_corpus_is_deterministic_and_capped(corpus: torch.Tensor) -> None:
    assert torch.equal(corpus, stdlib_corpus(max_bytes=CORPUS_BYTES))
    assert len(corpus) == CORPUS_BYTES
    assert int(corpus.min()) >= 0 and int(corpus.max()) <= ByteTokenizer.eos
    assert (corpus == ByteTokenizer.eos).any()  # more than one file
    assert "import" in ByteTokenizer().decode(corpus[:20_000])


def test_load_text_files(tmp_path: Path) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_text("hello")
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert ByteTokenizer().decode(load_text_files([plain, records])) == "hello\none\ntwo\n"
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(
        ValueError, match=re.escape(f"{broken}:1: each .jsonl line must be an object with a string 'text' field")
    ):
        load_text_files([broken])


def test_train_batches_are_reproducible_from_the_seed(corpus: torch.Tensor) -> None:
    stream = TokenStream(corpus, seq_len=32)
    first, second, other = (stream.train_batches(4, seed) for seed in (7, 7, 8))
    batches = [next(first) for _ in range(3)]
    assert all(torch.equal(batch, next(second)) for batch in batches)
    assert not torch.equal(batches[0], next(other))
    assert batches[0].shape == (4, 33) and batches[0].dtype == torch.long


def test_train_windows_are_contiguous_slices_of_the_training_split(corpus: torch.Tensor) -> None:
    stream = TokenStream(corpus, seq_len=8)
    text = ByteTokenizer().decode(stream.train_tokens)
    for window in next(stream.train_batches(16, seed=0)):
        assert ByteTokenizer().decode(window) in text


def test_train_and_validation_are_disjoint(corpus: torch.Tensor) -> None:
    stream = TokenStream(corpus, seq_len=16, val_fraction=0.05)
    assert len(stream.val_tokens) == int(0.05 * len(corpus))
    assert torch.equal(torch.cat([stream.train_tokens, stream.val_tokens]), corpus)
    # Tag every token with its position to check where sampled windows come from.
    positions = TokenStream(torch.arange(len(corpus)), seq_len=16, val_fraction=0.05)
    boundary = len(positions.train_tokens)
    train_batches = positions.train_batches(64, seed=0)
    assert all(int(next(train_batches).max()) < boundary for _ in range(50))
    assert all(int(batch.min()) >= boundary for batch in positions.eval_batches(64))


def test_eval_batches_are_fixed_consecutive_windows(corpus: torch.Tensor) -> None:
    stream = TokenStream(corpus, seq_len=16)
    batches = list(stream.eval_batches(batch_size=5))
    assert all(torch.equal(a, b) for a, b in zip(batches, stream.eval_batches(batch_size=5), strict=True))
    assert sum(len(batch) for batch in batches) == stream.num_eval_windows
    assert torch.equal(torch.cat(batches).flatten(), stream.val_tokens[: stream.num_eval_windows * 17])
    assert len(list(stream.eval_batches(batch_size=5, max_batches=2))) == 2


def test_too_little_text_is_rejected() -> None:
    with pytest.raises(ValueError, match=re.escape("the validation split has 5 tokens, fewer than seq_len + 1 (17)")):
        TokenStream(torch.zeros(100, dtype=torch.long), seq_len=16)


def test_text_files_with_a_hugging_face_tokenizer_file(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "low": 1, "rank": 2, "adam": 3}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    (tmp_path / "a.txt").write_text("low rank adam")
    (tmp_path / "b.jsonl").write_text('{"text": "rank low"}\n\n{"text": "unknown adam"}\n')

    ids = load_text_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], tokenizer_file=str(tokenizer_file))
    assert ids.dtype == torch.long
    assert ids.tolist() == [1, 2, 3, 2, 1, 0, 3]
