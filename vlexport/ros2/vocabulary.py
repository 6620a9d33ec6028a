"""Class names → text embeddings, to change the vocabulary of a ``--vocab-mode input`` bundle at run time.

Each name's embedding comes from the first of these that has it:

1. a ``.npz`` of precomputed embeddings (``classes`` + ``embeddings`` arrays, the layout of a
   bundle's ``vocab.npz``), torch-free;
2. the bundle's own ``vocab.npz`` (the classes it was exported with), torch-free;
3. the bundle's ``text_encoder`` part (exported with ``--with-text-encoder``), run on
   onnxruntime over the bundle's prompt templates. Tokenizing needs open_clip's CLIP tokenizer
   and the templates come from :mod:`vlexport.models.text`: this path needs the export extra
   (``pip install 'vlexport[export]'``, which brings torch).

The text tower is the bundle's, so new embeddings match the exported ones exactly: a class
encoded here gets the embedding the export baked (see the tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import BundleError, DependencyError, UsageError
from vlexport.runtime.bundle import Bundle

__all__ = ["parse_class_names", "load_embeddings_file", "VocabularyEncoder"]

TEXT_PART = "text_encoder"
_TOKENS = "tokens"
_EMBEDDINGS = "embeddings"
_CHUNK = 256  # prompts per text-encoder run


def parse_class_names(value: str | Sequence[str]) -> list[str]:
    """Class names from a string list, or from one comma-separated string ("person, red car").

    Names are stripped and blank ones dropped; the result must be non-empty and without duplicates.
    """
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise UsageError(f"class names: got {type(value).__name__}, expected a list of strings or 'a,b,c'")
    names = []
    for item in items:
        if not isinstance(item, str):
            raise UsageError(f"class names must be strings, got {item!r}")
        if item.strip():
            names.append(item.strip())
    if not names:
        raise UsageError('the vocabulary is empty: give at least one class name, e.g. ["person", "forklift"]')
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"the vocabulary names {dupes} more than once")
    return names


def load_embeddings_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{class name: embedding}`` from an ``.npz`` with ``classes`` ``[C]`` and ``embeddings`` ``[C, D]``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"vocabulary file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the vocabulary file {p} ({e}); expected an .npz with 'classes' and 'embeddings'")
    if "classes" not in arrays or "embeddings" not in arrays:
        raise UsageError(f"{p} has arrays {sorted(arrays)}; expected 'classes' and 'embeddings'")
    classes, emb = arrays["classes"], arrays["embeddings"]
    if classes.ndim != 1 or emb.ndim != 2 or emb.shape[0] != classes.shape[0] or emb.dtype.kind != "f":
        raise UsageError(
            f"{p}: got classes of shape {tuple(classes.shape)} and embeddings of shape {tuple(emb.shape)} "
            f"dtype {emb.dtype}; expected [C] names and float [C, D]"
        )
    return {str(c): np.asarray(e, np.float32) for c, e in zip(classes.tolist(), emb)}


class VocabularyEncoder:
    """Embeds class names for one ``--vocab-mode input`` bundle (see the module's docstring for the sources).

    ``vocabulary_file`` is an optional ``.npz`` of precomputed embeddings; ``templates`` the prompt
    templates file the bundle was exported with, needed only when it was a file (the manifest
    keeps its hash, not its text). The text encoder is loaded on first need, on ``backend``.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        *,
        vocabulary_file: str | os.PathLike | None = None,
        templates: str | os.PathLike | None = None,
        backend: str | None = None,
        threads: int | None = None,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        vocab = self.bundle.manifest.get("vocabulary") or {}
        if vocab.get("mode", "baked") != "input":
            raise UsageError(
                f"{self.bundle.root}: this bundle has its vocabulary baked into the graph; "
                "re-export it with --vocab-mode input to change classes at run time"
            )
        self._templates_path = templates
        self._backend_name = backend
        self._threads = threads
        self._known: dict[str, np.ndarray] = {}
        arrays = self.bundle.load_vocab()
        if "classes" in arrays and "embeddings" in arrays:
            self._known.update(zip((str(c) for c in arrays["classes"].tolist()), arrays["embeddings"].astype(np.float32)))
        if vocabulary_file is not None:
            self._known.update(load_embeddings_file(vocabulary_file))  # the user's file wins
        self._text: Any = None  # (backend, tokenizer, templates), loaded on first need

    @property
    def has_text_encoder(self) -> bool:
        """Whether the bundle ships a ``text_encoder`` part (any class name can then be embedded)."""
        return TEXT_PART in self.bundle.part_names

    def encode(self, classes: Sequence[str]) -> np.ndarray:
        """``float32 [len(classes), D]`` text embeddings, one row per class name, in order."""
        names = parse_class_names(classes)
        missing = [n for n in names if n not in self._known]
        if missing:
            if not self.has_text_encoder:
                raise UsageError(
                    f"no embedding for {missing}: this bundle has no {TEXT_PART!r} part; re-export it with "
                    "--with-text-encoder, or give a vocabulary file (.npz with 'classes' and 'embeddings') "
                    "that has these names"
                )
            self._known.update(zip(missing, self._encode_with_text_encoder(missing)))
        return np.stack([self._known[n] for n in names]).astype(np.float32, copy=False)

    # -- the text-encoder path -----------------------------------------------------------
    def _encode_with_text_encoder(self, names: list[str]) -> np.ndarray:
        backend, tokenize, templates = self._load_text_encoder()
        prompts = [t.format(n) for n in names for t in templates]
        sums = np.zeros((len(names), 0), np.float64)
        owner = np.arange(len(prompts)) // len(templates)  # prompt p belongs to class p // T
        for start in range(0, len(prompts), _CHUNK):
            tokens = tokenize(prompts[start:start + _CHUNK])
            emb = backend.infer({_TOKENS: tokens})[_EMBEDDINGS].astype(np.float64)
            if sums.shape[1] == 0:
                sums = np.zeros((len(names), emb.shape[1]), np.float64)
            np.add.at(sums, owner[start:start + len(tokens)], emb)
        # As at export: the mean of the unit prompt embeddings, normalised again.
        means = sums / len(templates)
        return (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _load_text_encoder(self) -> tuple[Any, Any, tuple[str, ...]]:
        if self._text is not None:
            return self._text
        templates = self._resolve_templates()
        tokenize = self._clip_tokenizer()
        from vlexport.runtime.backends import open_part_backend, resolve_backend

        part = self.bundle.part(TEXT_PART)
        precision = "fp32" if "fp32" in part.files else part.precisions[0]
        name = resolve_backend(self._backend_name) if self._backend_name else "onnxruntime"
        backend, _ = open_part_backend(self.bundle, TEXT_PART, precision, name, threads=self._threads)
        specs = {s.name: s for s in backend.inputs}
        if _TOKENS not in specs or _EMBEDDINGS not in {s.name for s in backend.outputs}:
            backend.close()
            raise BundleError(f"{self.bundle.root}: the {TEXT_PART} part does not map {_TOKENS!r} to {_EMBEDDINGS!r}")
        length = specs[_TOKENS].shape[1]

        def tokenize_np(prompts: list[str]) -> np.ndarray:
            tokens = tokenize(prompts).numpy().astype(np.int64)
            if isinstance(length, int) and tokens.shape[1] != length:
                raise BundleError(
                    f"{self.bundle.root}: the tokenizer gives {tokens.shape[1]} tokens, the text encoder takes {length}"
                )
            return tokens

        self._text = (backend, tokenize_np, templates)
        return self._text

    def _resolve_templates(self) -> tuple[str, ...]:
        templates_id = str((self.bundle.manifest.get("vocabulary") or {}).get("templates", ""))
        resolve = _export_extra("vlexport.models.text").resolve_templates
        if templates_id.startswith("file:"):
            if self._templates_path is None:
                raise UsageError(
                    f"{self.bundle.root} was exported with a prompt templates file ({templates_id}): "
                    "give that file (the node's 'templates' parameter) to encode new class names"
                )
            found_id, templates = resolve(str(self._templates_path))
            if found_id != templates_id:
                raise UsageError(
                    f"templates file {self._templates_path} is {found_id}, but the bundle was exported with {templates_id}"
                )
            return templates
        if not templates_id:
            raise BundleError(f"{self.bundle.root}: the manifest does not say which prompt templates it used")
        return resolve(templates_id)[1]

    def _clip_tokenizer(self) -> Any:
        te = (self.bundle.manifest.get("provenance") or {}).get("text_encoder") or {}
        model = te.get("model")
        if not model:
            raise BundleError(f"{self.bundle.root}: the manifest does not name its CLIP text model (provenance.text_encoder)")
        clip_towers = _export_extra("vlexport.models.clip_towers")
        # The same lookup the export used (the tiny preset borrows ViT-B-32's tokenizer).
        return clip_towers._get_tokenizer(model)

    def close(self) -> None:
        """Release the text encoder, if it was loaded."""
        if self._text is not None:
            self._text[0].close()
            self._text = None


def _export_extra(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DependencyError(
            "encoding new class names with the bundle's text encoder needs the CLIP tokenizer "
            f"(open_clip): pip install 'vlexport[export]', or give a vocabulary file ({e.name} is missing)"
        ) from e
