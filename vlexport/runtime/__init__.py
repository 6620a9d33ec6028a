"""The torch-free runtime: open a bundle, run its task on frames, write results.

>>> import vlexport.runtime as vr
>>> task = vr.load("bundles/kdeov-n")            # DetectTask for a detect bundle
>>> dets = task.detect(cv2.imread("bus.jpg"))    # Detections in source pixels

Importing this package loads numpy only; OpenCV and onnxruntime load with the first task.
Nothing here imports torch.
"""

from __future__ import annotations

import os
from typing import Any

from vlexport.runtime.bundle import Bundle
from vlexport.runtime.results import Caption, Detections, Embedding, FrameStamp

__all__ = ["Bundle", "Caption", "Detections", "Embedding", "FrameStamp", "load"]


def load(
    bundle_path: str | os.PathLike | Bundle,
    precision: str | None = None,
    backend: str | None = None,
    task: str | None = None,
    threads: int | None = None,
    **overrides: Any,
) -> Any:
    """Open a bundle and return its task object (``DetectTask``, ``EmbedTask``, ``SegmentTask`` or ``CaptionTask``).

    ``task`` defaults to the manifest's; ``task="embed"`` runs the ``image_encoder`` part of a
    detect bundle. ``precision`` (fp32/fp16/int8) defaults to the best the device runs;
    ``overrides`` are task options: ``score_threshold`` … (detect), ``prob_threshold``,
    ``area_threshold``, ``logit_scale`` (segment), ``max_length``, ``method``, ``num_beams``, ``use_cache`` … (caption).
    """
    from vlexport.errors import UsageError
    from vlexport.runtime.tasks import task_class

    bundle = bundle_path if isinstance(bundle_path, Bundle) else Bundle.open(bundle_path)
    name = task if task is not None else bundle.task
    cls = task_class(name, bundle.family)
    if name not in ("detect", "segment", "caption") and overrides:
        raise UsageError(f"task {name!r} takes no options {sorted(overrides)}")
    return cls(bundle, precision=precision, backend=backend, threads=threads, **overrides)
