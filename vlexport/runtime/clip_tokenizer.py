"""CLIP's byte-level BPE tokenizer (OpenAI CLIP / open_clip's ``SimpleTokenizer``) without torch.

The token ids equal ``open_clip.get_tokenizer("ViT-B-32")``'s (tests compare them on COCO and
LVIS-style names in all 80 prompt templates, punctuation, long names and non-ASCII text):

* cleaning, in Python, exactly as open_clip's ``clean="lower"``: ``ftfy.fix_text`` (which also
  NFC-normalises), ``html.unescape`` twice, whitespace collapsed to single spaces, lower case;
* the ``tokenizers`` library for the rest, configured as Hugging Face's ``CLIPTokenizerFast``:
  open_clip's split pattern (``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``,
  case-insensitive, the two special tokens first), the ByteLevel byte-to-unicode mapping, and a
  BPE whose word-final symbols carry the ``</w>`` suffix;
* ``<start_of_text>`` (49406) + ids + ``<end_of_text>`` (49407) in rows of ``context_length``
  (77) ids, zero-padded; a longer text is cut to 77 ids whose last is ``<end_of_text>``, as
  open_clip truncates.

The vocabulary and merges are plain files (``vocab.json`` + ``merges.txt``, Hugging Face's
layout): the exporter writes them into bundles that carry a ``text_encoder`` part
(:func:`write_tokenizer_files`, from open_clip's ``bpe_simple_vocab_16e6.txt.gz``), and the
runtime loads them with :meth:`CLIPTokenizer.from_files`.
"""

from __future__ import annotations

import gzip
import html
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.atomic import atomic_write
from vlexport.errors import DependencyError, UsageError, VlexportError

__all__ = [
    "CLIPTokenizer",
    "clean_text",
    "clip_vocab_and_merges",
    "write_tokenizer_files",
    "SOT_TOKEN",
    "EOT_TOKEN",
    "SOT_TOKEN_ID",
    "EOT_TOKEN_ID",
    "CONTEXT_LENGTH",
    "CLIP_VOCAB_SIZE",
    "TOKENIZER_TYPE",
    "VOCAB_FILE",
    "MERGES_FILE",
]

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
CONTEXT_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
#: The manifest's ``text_tokenizer.type`` of this tokenizer.
TOKENIZER_TYPE = "clip_bpe"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
# open_clip keeps merges[1 : 49152 - 256 - 2 + 1] of its file (line 0 is a version header).
_NUM_MERGES = 49152 - 256 - 2
# open_clip's pattern (compiled there with re.IGNORECASE; Oniguruma spells that "(?i)").
_SPLIT_PATTERN = (
    r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_SPECIAL_IDS = {SOT_TOKEN: SOT_TOKEN_ID, EOT_TOKEN: EOT_TOKEN_ID}


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's (and CLIP's) reversible byte → printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clean_text(text: str) -> str:
    """open_clip's ``clean="lower"``: ftfy.fix_text, html.unescape twice, whitespace collapsed, lower case."""
    try:
        import ftfy
    except ImportError as e:  # a base dependency; a broken install gets one clear line
        raise DependencyError("the CLIP tokenizer needs ftfy (a vlexport dependency): pip install ftfy") from e
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def clip_vocab_and_merges(bpe_path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token → id) and BPE merges from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

    Built exactly as ``SimpleTokenizer.__init__`` builds them: the 256 byte symbols, the same with
    ``</w>``, one token per merge, then the two special tokens (49408 ids).
    """
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    bad = [m for m in merges if len(m) != 2]
    if bad or len(merges) != _NUM_MERGES:
        raise ValueError(f"{bpe_path} is not CLIP's BPE merges file (got {len(merges)} merges, {len(bad)} malformed)")
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return dict(zip(tokens, range(len(tokens)))), merges  # type: ignore[return-value]


def write_tokenizer_files(folder: str | os.PathLike, bpe_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``vocab.json`` + ``merges.txt`` (plain text, Hugging Face's layout) into ``folder``, atomically."""
    vocab, merges = clip_vocab_and_merges(bpe_path)
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = root / VOCAB_FILE, root / MERGES_FILE
    with atomic_write(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with atomic_write(merges_path, "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merges_path


class CLIPTokenizer:
    """Text → CLIP token ids, ``int64 [N, context_length]``. Build it with :meth:`from_files`."""

    def __init__(self, tokenizer: Any, source: str, context_length: int = CONTEXT_LENGTH):
        self._tok = tokenizer
        self.source = source
        self.context_length = int(context_length)
        self.sot_token_id = SOT_TOKEN_ID
        self.eot_token_id = EOT_TOKEN_ID

    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        *,
        context_length: int = CONTEXT_LENGTH,
        error: type[VlexportError] = UsageError,
    ) -> CLIPTokenizer:
        """Load from ``vocab.json`` + ``merges.txt``; files that are not CLIP's raise ``error`` naming them."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        vocab_file, merges_file = Path(vocab_path), Path(merges_path)
        for what, p in (("vocabulary", vocab_file), ("merges", merges_file)):
            if not p.is_file():
                raise error(f"CLIP tokenizer {what} file not found: {p}")
        source = f"{vocab_file} + {merges_file.name}"
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            lines = merges_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise error(f"cannot read the CLIP tokenizer files {source}: {e}") from e
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split(" ")) for line in lines if line]
        if (
            not isinstance(vocab, dict)
            or vocab.get(SOT_TOKEN) != SOT_TOKEN_ID
            or vocab.get(EOT_TOKEN) != EOT_TOKEN_ID
            or len(merges) != _NUM_MERGES
            or any(len(m) != 2 for m in merges)
        ):
            raise error(f"{source}: not CLIP's BPE tokenizer files ({SOT_TOKEN}={SOT_TOKEN_ID}, "
                        f"{EOT_TOKEN}={EOT_TOKEN_ID} and {_NUM_MERGES} merges expected)")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise error(f"{source}: context length must be an integer of at least 2, got {context_length!r}")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                   end_of_word_suffix="</w>", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        return cls(tok, source, context_length)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **kwargs: Any) -> CLIPTokenizer:
        """Load ``vocab.json`` + ``merges.txt`` from ``folder``."""
        root = Path(folder)
        return cls.from_files(root / VOCAB_FILE, root / MERGES_FILE, **kwargs)

    # -- use ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The BPE ids of ``text`` (cleaned as open_clip does), without start/end tokens or truncation."""
        if not isinstance(text, str):
            raise UsageError(f"encode: expected a str, got {type(text).__name__}")
        return self._encode_cleaned([clean_text(text)])[0]

    def _encode_cleaned(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text, enc in zip(texts, self._tok.encode_batch(texts, add_special_tokens=False)):
            ids = list(enc.ids)
            if SOT_TOKEN in text or EOT_TOKEN in text:
                ids = _special_words(text, enc)
            out.append(ids)
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """``int64 [len(texts), context_length]``: start, ids, end, zeros; long texts cut as open_clip cuts them."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise UsageError(f"tokenize: expected strings, got {bad[0]}")
        length = self.context_length if context_length is None else int(context_length)
        result = np.zeros((len(texts), length), np.int64)
        for i, ids in enumerate(self._encode_cleaned([clean_text(t) for t in texts])):
            row = [SOT_TOKEN_ID, *ids, EOT_TOKEN_ID]
            if len(row) > length:
                row = row[:length]
                row[-1] = EOT_TOKEN_ID
            result[i, : len(row)] = row
        return result

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special tokens and padding dropped; words separated by spaces)."""
        keep = [int(i) for i in ids if int(i) not in (0, SOT_TOKEN_ID, EOT_TOKEN_ID)]
        pieces = [self._tok.id_to_token(i) or "" for i in keep]
        table = {c: b for b, c in _bytes_to_unicode().items()}
        words = "".join(pieces).split("</w>")
        text = " ".join(bytes(table[c] for c in w if c in table).decode("utf-8", errors="replace") for w in words)
        return text.strip()

    def __repr__(self) -> str:
        return f"CLIPTokenizer({self.source!r}, context_length={self.context_length})"


def _special_words(text: str, enc: Any) -> list[int]:
    """The ids of ``enc`` with each pre-token spelling a special token replaced by its one id.

    open_clip's split pattern matches ``<start_of_text>`` / ``<end_of_text>`` as words (where the
    scan reaches them) and maps exactly those words to the special ids; the BPE here would spell
    them out, so they are swapped back word by word.
    """
    words: dict[int, list[int]] = {}
    spans: dict[int, list[int]] = {}
    for tid, word, (start, end) in zip(enc.ids, enc.word_ids, enc.offsets):
        words.setdefault(word, []).append(tid)
        span = spans.setdefault(word, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    out: list[int] = []
    for word, ids in words.items():
        start, end = spans[word]
        special = _SPECIAL_IDS.get(text[start:end])
        out.extend([special] if special is not None else ids)
    return out
