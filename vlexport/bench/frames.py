"""The frame `vlexport bench` measures on: the first of ``--source``, else a synthetic one."""

from __future__ import annotations

import numpy as np

from vlexport.errors import SourceError

__all__ = ["first_frame", "read_frame", "synthetic_frame"]


def synthetic_frame(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A deterministic BGR uint8 frame: a colour gradient with a few filled shapes and some noise."""
    import cv2

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * x / width, 255 * y / height, 128 + 64 * np.sin(x / 37 + y / 53)], axis=-1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 80))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(img, (x0, y0), (x0 + int(rng.integers(30, 160)), y0 + int(rng.integers(30, 160))), color, -1)
    return img


def read_frame(source: str | None) -> tuple[np.ndarray, str]:
    """The first frame of ``source`` (a SourceError when none can be read), or a synthetic frame."""
    image, label, _ = first_frame(source)
    return image, label


def first_frame(source: str | None) -> tuple[np.ndarray, str, bool]:
    """(first frame, its label, whether the source is live: a camera or a stream, with no end)."""
    if source is None:
        return synthetic_frame(), "synthetic", False
    from vlexport.runtime.sources import open_source

    with open_source(source) as src:
        for frame in src:
            return frame.image, str(source), bool(src.live)
    raise SourceError(f"source {source!r} gave no readable frame")
