"""Image embeddings from a bundle's ``image_encoder`` part."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from vlexport.errors import BundleError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.results import Embedding, FrameStamp
from vlexport.runtime.tasks.base import PartTask

__all__ = ["EmbedTask"]

OUTPUT = "embeddings"


class EmbedTask(PartTask):
    """Frames in (BGR uint8), L2-normalised :class:`Embedding` vectors out.

    Takes the same arguments as :class:`~vlexport.runtime.tasks.detect.DetectTask` without the
    detection overrides. After each call :attr:`timings` holds the milliseconds per stage.
    """

    part_name = "image_encoder"

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        precision: str | None = None,
        backend: str | None = None,
        threads: int | None = None,
    ):
        super().__init__(bundle, precision=precision, backend=backend, threads=threads)
        if OUTPUT not in {s.name for s in self.backend.outputs}:
            self.close()
            raise BundleError(f"{self.bundle.root}: the image encoder has no {OUTPUT!r} output")
        if len(self.backend.inputs) != 1:
            self.close()
            raise BundleError(
                f"{self.bundle.root}: the image encoder takes {[s.name for s in self.backend.inputs]}, "
                "expected only 'images'"
            )

    def embed(self, bgr: np.ndarray, stamp: FrameStamp | None = None) -> Embedding:
        """Embed one BGR uint8 frame."""
        return self.embed_batch([bgr], None if stamp is None else [stamp])[0]

    def embed_batch(
        self, images: Sequence[np.ndarray], stamps: Sequence[FrameStamp | None] | None = None
    ) -> list[Embedding]:
        """Embed several frames (one graph run per batch the model accepts)."""
        return self._run_batches(
            images, stamps, "embed_batch", {},
            lambda out, _infos, batch_stamps: [Embedding(v, s) for v, s in zip(out[OUTPUT], batch_stamps)],
        )
