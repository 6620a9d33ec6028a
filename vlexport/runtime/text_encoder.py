"""Class names → text embeddings with a bundle's ``text_encoder`` part: the export-time bake, without torch.

For each class the bundle's prompt templates (``vocabulary.prompt_templates``) are filled with
the name, tokenised with the bundle's CLIP tokenizer (``text_tokenizer``, see
:mod:`vlexport.runtime.clip_tokenizer`) and run through the ``text_encoder`` part (FP32, on
onnxruntime by default); each prompt embedding is L2-normalised, the class embedding is their
mean, normalised again: what :func:`vlexport.models.clip.text.build_text_embeddings` computes with the
PyTorch tower at export (the tests hold them to 1e-5).

Embeddings are cached on disk in the export's own cache (:class:`~vlexport.runtime.text_cache.
TextEmbeddingCache`, under ``$VLEXPORT_CACHE`` or ``~/.cache/vlexport``), keyed by the bundle's
``provenance.text_encoder`` (CLIP model, weights sha256, activation), the templates id and the
class name: a name seen once, here or by an export with the same tower, is not encoded again.

Bundles are written with ``vlexport kdeov --with-text-encoder`` (``--vocab-mode input`` to swap
the detector's vocabulary with the result, see :meth:`DetectTask.set_vocabulary
<vlexport.runtime.tasks.detect.DetectTask.set_vocabulary>`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.clip_tokenizer import TOKENIZER_TYPE, CLIPTokenizer
from vlexport.runtime.text_cache import TextEmbeddingCache

log = logging.getLogger("vlexport")

__all__ = ["TextEncoder", "TEXT_PART", "templates_file_id", "check_class_names"]

TEXT_PART = "text_encoder"
_BATCH = 256  # prompts per text-encoder run


def templates_file_id(templates: Sequence[str]) -> str:
    """The templates id of a templates *file* (as :func:`vlexport.models.clip.text.resolve_templates` names it)."""
    digest = hashlib.sha256("\n".join(templates).encode("utf-8")).hexdigest()
    return f"file:{digest[:16]}"


def check_class_names(classes: Any) -> list[str]:
    """``classes`` as a list of non-empty, distinct strings (a UsageError naming the problem otherwise)."""
    if isinstance(classes, str):
        raise UsageError(f"class names: got the single string {classes!r}, expected a list such as [{classes!r}]")
    try:
        names = list(classes)
    except TypeError:
        raise UsageError(f"class names: got {type(classes).__name__}, expected a list of strings") from None
    if not names:
        raise UsageError('the vocabulary is empty: give at least one class name, e.g. ["person", "forklift"]')
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"class names must be non-empty strings, got {name!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"the vocabulary names {dupes} more than once")
    return names


class TextEncoder:
    """Embeds class names for one bundle with its ``text_encoder`` part (see the module docstring).

    ``backend`` (default onnxruntime, with the best provider here) and ``threads`` choose how the
    part runs; ``cache`` is the on-disk cache (default: ``TextEmbeddingCache()``), ``False`` for none.
    The part and the tokenizer are loaded on first need. After :meth:`encode`, :attr:`last`
    says how many classes were encoded and how many came from the cache; :attr:`runs` counts
    the text-encoder runs so far.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        *,
        backend: str | None = None,
        threads: int | None = None,
        cache: TextEmbeddingCache | bool = True,
        batch_size: int = _BATCH,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        root = self.bundle.root
        if TEXT_PART not in self.bundle.part_names:
            raise UsageError(
                f"{root}: this bundle has no {TEXT_PART!r} part to embed class names with; re-export it with "
                "--with-text-encoder, or give precomputed embeddings"
            )
        m = self.bundle.manifest
        vocab = m.get("vocabulary") or {}
        self.templates_id: str = str(vocab.get("templates") or "")
        templates = vocab.get("prompt_templates")
        tok = m.get("text_tokenizer")
        if not templates or not isinstance(tok, dict):
            raise BundleError(
                f"{root}: the bundle has a {TEXT_PART!r} part but not its prompt templates and tokenizer "
                "(exported by an older vlexport); export it again with --with-text-encoder"
            )
        if not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise BundleError(f"{root}: vocabulary.prompt_templates must be a list of strings with '{{}}'")
        if not self.templates_id or (self.templates_id.startswith("file:")
                                     and templates_file_id(templates) != self.templates_id):
            raise BundleError(f"{root}: the prompt templates do not match the templates id {self.templates_id!r}")
        if tok.get("type") != TOKENIZER_TYPE:
            raise BundleError(f"{root}: unknown text tokenizer {tok.get('type')!r}; this vlexport reads {TOKENIZER_TYPE!r}")
        self.templates: tuple[str, ...] = tuple(templates)
        self._tok_spec = tok
        te = (m.get("provenance") or {}).get("text_encoder") or {}
        self.model_name: str | None = te.get("model")
        self.weights_sha256: str | None = te.get("weights_sha256")
        self.activation: str | None = te.get("activation")
        if cache is True:
            cache = TextEmbeddingCache()
        self.cache: TextEmbeddingCache | None = cache or None
        if self.cache is not None and not (self.model_name and self.weights_sha256 and self.activation):
            log.warning("%s: provenance.text_encoder lacks the model, weights hash or activation: "
                        "class embeddings are not cached", root)
            self.cache = None
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self._backend_name = backend
        self._threads = threads
        self._loaded: tuple[Any, CLIPTokenizer, str, str, np.dtype, int | None] | None = None
        #: Text-encoder runs so far (each at most ``batch_size`` prompts).
        self.runs = 0
        #: ``{"encoded": n, "cached": n, "prompts": n, "seconds": s}`` of the last :meth:`encode`.
        self.last: dict[str, float] = {}

    @property
    def embed_dim(self) -> int | None:
        """The embedding size the part declares (None when its output axis is dynamic)."""
        out = self.bundle.part(TEXT_PART).io.outputs[0].shape
        return out[-1] if out and isinstance(out[-1], int) else None

    # -- encoding ------------------------------------------------------------------------
    def encode(self, classes: Sequence[str]) -> np.ndarray:
        """``float32 [len(classes), D]``: one unit-norm embedding per class name, in order."""
        t0 = time.perf_counter()
        names = check_class_names(classes)
        found: dict[str, np.ndarray] = {}
        dim = self.embed_dim
        if self.cache is not None:
            for name in names:
                value = self.cache.get(*self._ident(), name, activation=self.activation)
                if value is not None and (dim is None or value.shape == (dim,)):
                    found[name] = value
        misses = [n for n in names if n not in found]
        prompts = len(misses) * len(self.templates)
        if misses:
            for name, row in zip(misses, self._bake(misses)):
                found[name] = row
                if self.cache is not None:
                    self.cache.put(*self._ident(), name, row, activation=self.activation)
        self.last = {"encoded": len(misses), "cached": len(names) - len(misses), "prompts": prompts,
                     "seconds": time.perf_counter() - t0}
        rows = [found[n] for n in names]
        if len({r.shape for r in rows}) != 1:
            raise BundleError(f"{self.bundle.root}: cached and computed embeddings differ in size; clear the cache")
        return np.stack(rows).astype(np.float32, copy=False)

    def _ident(self) -> tuple[str, str, str]:
        return str(self.model_name), str(self.weights_sha256), self.templates_id

    def _bake(self, names: list[str]) -> np.ndarray:
        """Mean of the unit prompt embeddings per class, normalised again (the export's bake)."""
        backend, tokenizer, in_name, out_name, dtype, fixed = self._load()
        n_t = len(self.templates)
        tokens = tokenizer([t.format(n) for n in names for t in self.templates])
        # The end-of-text token has the largest id: its position + 1 is each prompt's length.
        lengths = tokens.argmax(axis=1) + 1
        order = np.argsort(lengths, kind="stable")  # similar lengths share a run: little padding
        emb: np.ndarray | None = None
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = fixed if fixed is not None else int(lengths[idx].max())
            # A causal tower pooled at end-of-text never sees the padding after it: trimming is exact.
            out = backend.infer({in_name: np.ascontiguousarray(tokens[idx, :width], dtype=dtype)})[out_name]
            self.runs += 1
            if emb is None:
                emb = np.zeros((len(tokens), out.shape[1]), np.float64)
            emb[idx] = out
        assert emb is not None  # names is non-empty
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        means = emb.reshape(len(names), n_t, -1).mean(axis=1)
        return (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _load(self) -> tuple[Any, CLIPTokenizer, str, str, np.dtype, int | None]:
        if self._loaded is not None:
            return self._loaded
        from vlexport.runtime.backends import open_part_backend

        root = self.bundle.root
        spec = self._tok_spec
        length = spec.get("context_length")
        if isinstance(length, bool) or not isinstance(length, int):
            raise BundleError(f"{root}: text_tokenizer.context_length must be an integer, got {length!r}")
        try:
            vocab, merges = self.bundle.verify(spec["vocab"]), self.bundle.verify(spec["merges"])
        except KeyError as e:
            raise BundleError(f"{root}: text_tokenizer lacks {e.args[0]!r}") from None
        tokenizer = CLIPTokenizer.from_files(vocab, merges, context_length=length, error=BundleError)
        io = self.bundle.part(TEXT_PART).io
        if len(io.inputs) != 1 or len(io.outputs) != 1:
            raise BundleError(f"{root}: the {TEXT_PART} part must have one input and one output")
        inp, out = io.inputs[0], io.outputs[0]
        if inp.dtype not in ("int64", "int32") or len(inp.shape) != 2 or len(out.shape) != 2:
            raise BundleError(
                f"{root}: the {TEXT_PART} part maps {inp.name} {inp.dtype} {list(inp.shape)} to "
                f"{out.name} {list(out.shape)}; expected integer token ids [prompts, length] → [prompts, D]"
            )
        fixed = inp.shape[1] if isinstance(inp.shape[1], int) else None
        if fixed is not None and fixed != length:
            raise BundleError(f"{root}: the tokenizer gives {length} tokens, the {TEXT_PART} part takes {fixed}")
        backend, _ = open_part_backend(self.bundle, TEXT_PART, "fp32", self._backend_name or "onnxruntime",
                                       threads=self._threads)
        self._loaded = (backend, tokenizer, inp.name, out.name, np.dtype(inp.dtype), fixed)
        return self._loaded

    def close(self) -> None:
        """Release the text-encoder part, if it was loaded."""
        if self._loaded is not None:
            self._loaded[0].close()
            self._loaded = None

    def __enter__(self) -> TextEncoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TextEncoder({str(self.bundle.root)!r}, templates={self.templates_id!r}, {len(self.templates)} template(s))"
