"""GPT-2's byte-level BPE tokenizer, built from ``vocab.json`` + ``merges.txt`` with the ``tokenizers`` library.

No transformers and no network: the tokenizer is assembled from its parts (a BPE model from the
vocabulary and merges, the ByteLevel pre-tokenizer without a prefix space, the ByteLevel decoder,
``<|endoftext|>`` as a special token), which is what GPT-2's own fast tokenizer is. The same files
also ship under OpenAI's original names ``encoder.json`` + ``vocab.bpe``; both pairs are accepted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlexport.errors import UsageError, VlexportError

__all__ = ["GPT2Tokenizer", "find_tokenizer_files", "resolve_gpt2_tokenizer", "hf_hub_cache", "EOS_TOKEN", "GPT2_VOCAB_SIZE", "FILE_PAIRS"]

EOS_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
#: (vocabulary, merges) file names, Hugging Face's first, then OpenAI's originals.
FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def find_tokenizer_files(folder: str | os.PathLike, error: type[VlexportError] = UsageError) -> tuple[Path, Path]:
    """The ``(vocab, merges)`` paths in ``folder``.

    ``vocab.json`` + ``merges.txt`` (Hugging Face's names) first, else ``encoder.json`` + ``vocab.bpe``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise error(f"tokenizer folder not found: {root}")
    for vocab, merges in FILE_PAIRS:
        if (root / vocab).is_file() and (root / merges).is_file():
            return root / vocab, root / merges
    names = " or ".join(f"{v} + {m}" for v, m in FILE_PAIRS)
    raise error(f"{root} holds no GPT-2 tokenizer files (expected {names})")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, resolved as ``huggingface_hub`` does (no import of it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


class GPT2Tokenizer:
    """Text <-> GPT-2 token ids. Build it with :meth:`from_files`, :meth:`from_folder` or :meth:`from_hf_cache`."""

    def __init__(self, tokenizer: Any, source: str, files: tuple[Path, Path] | None = None):
        self._tok = tokenizer
        self.source = source
        #: The ``(vocab, merges)`` files it was loaded from (None when built another way).
        self.files = files
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"{source}: the vocabulary has no {EOS_TOKEN!r} token")
        self.eos_token_id: int = int(eos)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        *,
        expected_vocab_size: int | None = GPT2_VOCAB_SIZE,
        error: type[VlexportError] = UsageError,
    ) -> GPT2Tokenizer:
        """Load from a vocabulary JSON and a merges file.

        ``expected_vocab_size`` (GPT-2's 50257 by default; None skips the check) guards against
        loading some other BPE vocabulary. Missing or unreadable files raise ``error`` naming the file.
        """
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab, merges = Path(vocab_path), Path(merges_path)
        for what, p in (("vocabulary", vocab), ("merges", merges)):
            if not p.is_file():
                raise error(f"tokenizer {what} file not found: {p}")
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise error(f"cannot read the tokenizer files {vocab} and {merges}: {e}") from e
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        source = f"{vocab} + {merges.name}"
        if tok.token_to_id(EOS_TOKEN) is None:
            raise error(f"{source}: the vocabulary has no {EOS_TOKEN!r} token; these are not GPT-2 tokenizer files")
        # As in GPT-2's own tokenizer, "<|endoftext|>" in text encodes to the one special id.
        tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
        size = tok.get_vocab_size(with_added_tokens=True)
        if expected_vocab_size is not None and size != expected_vocab_size:
            raise error(
                f"{source}: loaded a vocabulary of {size} tokens, expected GPT-2's {expected_vocab_size}; "
                "these are not GPT-2 tokenizer files"
            )
        return cls(tok, source, (vocab, merges))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **kwargs: Any) -> GPT2Tokenizer:
        """Load from a folder holding ``vocab.json`` + ``merges.txt`` or ``encoder.json`` + ``vocab.bpe``."""
        vocab, merges = find_tokenizer_files(folder, kwargs.get("error", UsageError))
        return cls.from_files(vocab, merges, **kwargs)

    @classmethod
    def from_hf_cache(cls, name: str = "gpt2", cache_dir: str | os.PathLike | None = None) -> GPT2Tokenizer:
        """Load a model's ``vocab.json`` + ``merges.txt`` from the Hugging Face hub cache, offline.

        Looks in ``cache_dir`` (default: ``HF_HUB_CACHE``, ``HF_HOME/hub`` or
        ``~/.cache/huggingface/hub``) under ``models--{name}/snapshots/*/``: the snapshot that
        ``refs/main`` names first, then the others, newest first.
        """
        hub = Path(cache_dir).expanduser() if cache_dir is not None else hf_hub_cache()
        repo = hub / ("models--" + name.replace("/", "--"))
        snaps = repo / "snapshots"
        candidates = sorted(snaps.glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True) if snaps.is_dir() else []
        ref = repo / "refs" / "main"
        if ref.is_file():
            main = snaps / ref.read_text(encoding="utf-8").strip()
            candidates = [main] + [c for c in candidates if c != main]
        for snap in candidates:
            vocab, merges = snap / "vocab.json", snap / "merges.txt"
            if vocab.is_file() and merges.is_file():
                return cls.from_files(vocab, merges)
        raise UsageError(
            f"no {name!r} tokenizer (vocab.json + merges.txt) in the Hugging Face cache at {repo}; "
            "download it once on a machine with network access, or pass the files with from_files()"
        )

    # -- use ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (50257 for GPT-2)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no prefix space is added: ``"Hello"`` and ``" Hello"`` differ)."""
        if not isinstance(text, str):
            raise UsageError(f"encode: expected a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; ``skip_special_tokens`` drops ``<|endoftext|>``.

        An id outside the vocabulary is a UsageError (the library would silently drop it).
        """
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise UsageError(f"decode: token ids {bad[:5]} are outside the vocabulary (0..{n - 1})")
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def __repr__(self) -> str:
        return f"GPT2Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


def resolve_gpt2_tokenizer(folder: str | os.PathLike | None = None) -> tuple[GPT2Tokenizer, Path, Path]:
    """GPT-2's tokenizer and its two files: from ``folder``, else the local Hugging Face cache's ``gpt2``."""
    if folder is not None:
        vocab, merges = find_tokenizer_files(folder)
        return GPT2Tokenizer.from_files(vocab, merges), vocab, merges
    tok = GPT2Tokenizer.from_hf_cache("gpt2")
    return (tok, *tok.files)

