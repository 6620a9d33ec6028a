"""Parity images: the user's (``--val``: images, video or dataset) when given, else deterministic synthetic pictures."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vlexport.data.readers import parity_frames, synthetic_images


def yolo_preprocess(size: int) -> dict[str, Any]:
    """The manifest's pre-processing of YOLO-style students: letterbox to a square, grey 114
    padding, RGB, scaled to [0, 1] (what Ultralytics trains with)."""
    return {"size": [size, size], "resize": "letterbox", "pad_value": 114, "color": "RGB",
            "scale": 1.0 / 255.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def parity_batch(preprocess: dict[str, Any], source: str | None, count: int = 4, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Pre-process images exactly as the runtime does; returns ([N,3,H,W] float32, a source label)."""
    from vlexport.runtime.preprocess import Preprocessor

    if source:
        frames = parity_frames(source, count, seed=seed).frames
        label = str(source)
    else:
        frames = synthetic_images(count, seed=seed)
        label = f"synthetic(seed={seed})"
    pre = Preprocessor(preprocess)
    tensors = [pre(f)[0] for f in frames]
    return torch.from_numpy(np.concatenate(tensors, axis=0)), label
