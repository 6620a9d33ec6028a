"""Parity images: the user's (``--val``: images, video or dataset) when given, else deterministic synthetic pictures."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vlexport.calibration.readers import calibration_frames, synthetic_images


def parity_batch(preprocess: dict[str, Any], source: str | None, count: int = 4, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Pre-process images exactly as the runtime does; returns ([N,3,H,W] float32, a source label)."""
    from vlexport.runtime.preprocess import Preprocessor

    if source:
        frames = calibration_frames(source, count, seed=seed).frames
        label = str(source)
    else:
        frames = synthetic_images(count, seed=seed)
        label = f"synthetic(seed={seed})"
    pre = Preprocessor(preprocess)
    tensors = [pre(f)[0] for f in frames]
    return torch.from_numpy(np.concatenate(tensors, axis=0)), label
