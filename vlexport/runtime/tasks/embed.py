"""Image embeddings from a bundle's ``image_encoder`` part."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.preprocess import check_image
from vlexport.runtime.results import Embedding, FrameStamp
from vlexport.runtime.tasks.base import PartTask, now_ms, stack_feeds

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
        if isinstance(images, np.ndarray):
            raise UsageError("embed_batch: expected a list of HxWx3 uint8 arrays, got a single array")
        images = list(images)
        if not images:
            return []
        for i, img in enumerate(images):
            check_image(img, what=f"image {i}")
        stamps = list(stamps) if stamps is not None else [None] * len(images)
        if len(stamps) != len(images):
            raise UsageError(f"embed_batch: got {len(stamps)} stamps for {len(images)} images")
        times = {"preprocess": 0.0, "infer": 0.0, "postprocess": 0.0}
        out: list[Embedding] = []
        for chunk in self._chunks(len(images)):
            t0 = now_ms()
            tensor, _ = self.preprocessor.batch(images[chunk])
            t1 = now_ms()
            vectors = self.backend.infer(stack_feeds(tensor, {}))[OUTPUT]
            t2 = now_ms()
            out += [Embedding(v, s) for v, s in zip(vectors, stamps[chunk])]
            times["preprocess"] += t1 - t0
            times["infer"] += t2 - t1
            times["postprocess"] += now_ms() - t2
        self.timings = times
        return out
