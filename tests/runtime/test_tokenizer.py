"""GPT-2 byte-level BPE tokenizer on the real GPT-2 vocabulary and merges (shared assets)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.tokenizer import GPT2Tokenizer, find_tokenizer_files


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    root = Path(os.environ.get("VLEXPORT_ASSETS", "/work/shared/assets")) / "tokenizers" / "gpt2"
    if not (root / "encoder.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {root} (set VLEXPORT_ASSETS)")
    return root


@pytest.fixture(scope="module")
def tok(gpt2_dir: Path) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")


def test_known_ids(tok: GPT2Tokenizer) -> None:
    # Reference ids from GPT-2's published tokenizer.
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello") == [18435]  # a leading space is part of the token
    assert tok.encode("Hello") != tok.encode(" Hello")
    assert tok.eos_token_id == 50256
    assert tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>") == [50256]


def test_ids_come_from_the_vocabulary_file(tok: GPT2Tokenizer, gpt2_dir: Path) -> None:
    vocab = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    # Byte-level BPE writes a space as "Ġ"; whole common words are single tokens.
    assert tok.encode(" the") == [vocab["Ġthe"]]
    assert tok.encode("A dog") == [vocab["A"], vocab["Ġdog"]]
    assert vocab["<|endoftext|>"] == 50256


@pytest.mark.parametrize("text", [
    "A man riding a wave on top of a surfboard.",
    "café naïve — 日本語 🙂🚌 émoji",
    "  leading and trailing spaces  \n\ttabs",
    "",
])
def test_round_trip(tok: GPT2Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tok.decode(ids) == text


def test_emoji_is_split_into_byte_tokens(tok: GPT2Tokenizer) -> None:
    ids = tok.encode("🙂")
    assert len(ids) > 1  # four UTF-8 bytes, none of them a whole token in GPT-2's vocabulary
    assert tok.decode(ids) == "🙂"


def test_decode_skips_special_tokens_on_request(tok: GPT2Tokenizer) -> None:
    ids = [15496, 995, 50256]
    assert tok.decode(ids) == "Hello world<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    with pytest.raises(UsageError, match="outside the vocabulary"):
        tok.decode([15496, 50257])


def test_hugging_face_file_names_and_folder_lookup(gpt2_dir: Path, tmp_path: Path) -> None:
    shutil.copy(gpt2_dir / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_dir / "vocab.bpe", tmp_path / "merges.txt")
    assert find_tokenizer_files(tmp_path) == (tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert find_tokenizer_files(gpt2_dir) == (gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    assert GPT2Tokenizer.from_folder(tmp_path).encode("Hello world") == [15496, 995]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no GPT-2 tokenizer files"):
        find_tokenizer_files(empty)
    with pytest.raises(UsageError, match="tokenizer folder not found"):
        find_tokenizer_files(tmp_path / "nowhere")


def test_from_hf_cache_offline(gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = tmp_path / "hub" / "models--gpt2" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    shutil.copy(gpt2_dir / "encoder.json", snap / "vocab.json")
    shutil.copy(gpt2_dir / "vocab.bpe", snap / "merges.txt")
    (tmp_path / "hub" / "models--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert GPT2Tokenizer.from_hf_cache().encode(" Hello") == [18435]
    with pytest.raises(UsageError, match="no 'distilgpt2' tokenizer"):
        GPT2Tokenizer.from_hf_cache("distilgpt2")


def test_missing_and_unreadable_files(gpt2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="vocabulary file not found: .*missing.json"):
        GPT2Tokenizer.from_files(tmp_path / "missing.json", gpt2_dir / "vocab.bpe")
    with pytest.raises(BundleError, match="merges file not found: .*merges.txt"):
        GPT2Tokenizer.from_files(gpt2_dir / "encoder.json", tmp_path / "merges.txt", error=BundleError)
    bad = tmp_path / "vocab.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="cannot read the tokenizer files"):
        GPT2Tokenizer.from_files(bad, gpt2_dir / "vocab.bpe")


def test_a_vocabulary_that_is_not_gpt2_is_refused(gpt2_dir: Path, tmp_path: Path) -> None:
    vocab = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    small = {k: v for k, v in vocab.items() if v < 1000}
    small["<|endoftext|>"] = 1000
    (tmp_path / "vocab.json").write_text(json.dumps(small))
    merges = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    kept = [m for m in merges[1:] if m and "".join(m.split(" ")) in small]
    (tmp_path / "merges.txt").write_text("\n".join([merges[0]] + kept) + "\n")
    with pytest.raises(UsageError, match="loaded a vocabulary of 1001 tokens, expected GPT-2's 50257"):
        GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    # The same files load when the caller expects another size.
    t = GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", expected_vocab_size=None)
    assert t.vocab_size == 1001 and t.eos_token_id == 1000
    no_eos = {k: v for k, v in small.items() if k != "<|endoftext|>"}
    (tmp_path / "vocab.json").write_text(json.dumps(no_eos))
    with pytest.raises(UsageError, match=re.escape("no '<|endoftext|>' token")):
        GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", expected_vocab_size=None)
