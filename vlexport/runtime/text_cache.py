"""The on-disk cache of class text embeddings, shared by the export-time bake and the runtime.

Torch-free, so the runtime's text encoder (:mod:`vlexport.runtime.text_encoder`) and the export
(:mod:`vlexport.models.clip.text`, which re-exports :class:`TextEmbeddingCache`) read and write the
same entries: a class embedded once, on either side, is not embedded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["TextEmbeddingCache"]


class TextEmbeddingCache:
    """On-disk cache of class text embeddings: one float32 ``[D]`` ``.npy`` file per key.

    The key is the sha256 of ``json.dumps([model_name, weights_sha256, activation, templates_id,
    class_name])``: the same weights run with QuickGELU or GELU give other embeddings.
    Files live under ``<root>/text/<key[:2]>/<key>.npy`` with ``root`` defaulting to
    ``$VLEXPORT_CACHE`` or ``~/.cache/vlexport``. Writes are atomic; a cache that cannot be written
    logs one warning and is then bypassed: the cache never fails an export.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        if root is None:
            root = os.environ.get("VLEXPORT_CACHE") or Path("~/.cache/vlexport").expanduser()
        self.root = Path(root).expanduser()
        self.dir = self.root / "text"
        self._writable = True

    def __repr__(self) -> str:
        return f"TextEmbeddingCache({str(self.root)!r})"

    @staticmethod
    def key(model_name: str, weights_sha256: str, templates_id: str, class_name: str, *, activation: str) -> str:
        """The cache key of one class embedding (``activation``: the text tower's, e.g. ``"quickgelu"``)."""
        payload = json.dumps([model_name, weights_sha256, activation, templates_id, class_name])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        # Two-character shards keep directories small for large vocabularies (LVIS: 1203 classes).
        return self.dir / key[:2] / f"{key}.npy"

    def get(
        self, model_name: str, weights_sha256: str, templates_id: str, class_name: str, *, activation: str
    ) -> np.ndarray | None:
        """The cached ``float32 [D]`` embedding, or ``None`` when absent or unreadable."""
        path = self.path(self.key(model_name, weights_sha256, templates_id, class_name, activation=activation))
        try:
            value = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # truncated or foreign file: recompute, it gets overwritten
            logger.debug("ignoring unreadable text-embedding cache file %s: %s", path, exc)
            return None
        if value.ndim != 1 or value.dtype != np.float32 or not np.isfinite(value).all():
            logger.debug("ignoring malformed text-embedding cache file %s", path)
            return None
        return value

    def put(
        self,
        model_name: str,
        weights_sha256: str,
        templates_id: str,
        class_name: str,
        embedding: np.ndarray,
        *,
        activation: str,
    ) -> bool:
        """Store one embedding atomically; returns False (after one warning) when the cache is not writable."""
        if not self._writable:
            return False
        value = np.ascontiguousarray(embedding, dtype=np.float32)
        if value.ndim != 1:
            raise ValueError(f"a text embedding must be 1-D, got shape {value.shape}")
        path = self.path(self.key(model_name, weights_sha256, templates_id, class_name, activation=activation))
        tmp_name: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", suffix=".npy", delete=False) as tmp:
                tmp_name = tmp.name
                np.save(tmp, value, allow_pickle=False)
            os.replace(tmp_name, path)
            return True
        except OSError as exc:
            self._writable = False
            logger.warning(
                "text-embedding cache %s is not writable (%s); continuing without caching", self.dir, exc
            )
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass
            return False
