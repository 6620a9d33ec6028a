"""Class names → text embeddings, to change the vocabulary of a ``--vocab-mode input`` bundle at run time.

Each name's embedding comes from the first of these that has it:

1. a ``.npz`` of precomputed embeddings (``classes`` + ``embeddings`` arrays, the layout of a
   bundle's ``vocab.npz``), torch-free;
2. the bundle's own ``vocab.npz`` (the classes it was exported with), torch-free;
3. the bundle's ``text_encoder`` part (exported with ``--with-text-encoder``), torch-free: the
   runtime's :class:`~vlexport.runtime.text_encoder.TextEncoder` tokenises the names in the
   bundle's own prompt templates with the CLIP tokenizer the bundle ships, runs the part on
   onnxruntime and averages as the export does, with an on-disk cache.

The text tower is the bundle's, so new embeddings match the exported ones exactly: a class
encoded here gets the embedding the export baked (see the tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlexport.errors import UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.text_encoder import TEXT_PART, TextEncoder, templates_file_id

__all__ = ["parse_class_names", "load_embeddings_file", "VocabularyEncoder"]


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

    ``vocabulary_file`` is an optional ``.npz`` of precomputed embeddings. ``templates`` is no longer
    needed (bundles carry their prompt templates); when given it must be the templates file the
    bundle was exported with. The text encoder is loaded on first need, on ``backend``.
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
        self._backend_name = backend
        self._threads = threads
        self._known: dict[str, np.ndarray] = {}
        arrays = self.bundle.load_vocab()
        if "classes" in arrays and "embeddings" in arrays:
            self._known.update(zip((str(c) for c in arrays["classes"].tolist()), arrays["embeddings"].astype(np.float32)))
        if vocabulary_file is not None:
            self._known.update(load_embeddings_file(vocabulary_file))  # the user's file wins
        self._text: TextEncoder | None = None  # loaded on first need
        if templates is not None:
            self._check_templates_file(templates)

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
        if self._text is None:
            self._text = TextEncoder(self.bundle, backend=self._backend_name, threads=self._threads)
        return self._text.encode(names)

    def _check_templates_file(self, path: str | os.PathLike) -> None:
        """A ``templates`` file given by the user must be the one the bundle was exported with."""
        templates_id = str((self.bundle.manifest.get("vocabulary") or {}).get("templates", ""))
        p = Path(path).expanduser()
        try:
            lines = p.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the templates file {p}: {e}") from e
        found = templates_file_id([line.strip() for line in lines if line.strip()])
        if found != templates_id:
            raise UsageError(f"templates file {p} is {found}, but the bundle was exported with {templates_id!r} "
                             "(bundles carry their templates: leave the templates parameter empty)")

    def close(self) -> None:
        """Release the text encoder, if it was loaded."""
        if self._text is not None:
            self._text.close()
            self._text = None

