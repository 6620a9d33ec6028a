"""Binary (foreground / background) segmentation from a `multiscale` bundle's ``segmenter`` part.

The graph maps one letterboxed, normalised image to one logit per input pixel:
``images [1, 3, S, S] -> logits [1, 1, S, S]``. Here, in numpy/OpenCV:

1. pre-process with the manifest's letterbox (:class:`~vlexport.runtime.preprocess.Preprocessor`);
2. run the graph;
3. map the logits back to the frame: crop the letterbox padding away (the image region is
   ``[pad_y, pad_y + new_h) x [pad_x, pad_x + new_w)``), resize that region bilinearly to the
   frame's ``W x H`` (OpenCV ``INTER_LINEAR``);
4. foreground where ``sigmoid(logit) > threshold``, computed as ``logit > log(t / (1 - t))``
   (the same test, without an exponential per pixel).

The result is a :class:`Segmentation` with classes ``["background", <class name>]`` (label 1 is
the object). :meth:`BinarySegmentTask.probability` gives the sigmoid map at the frame's size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.manifest import check_number
from vlexport.runtime.preprocess import LetterboxInfo
from vlexport.runtime.results import FrameStamp
from vlexport.runtime.segmentation import Segmentation
from vlexport.runtime.tasks.base import PartTask

__all__ = ["BinarySegmentTask", "logits_to_source", "threshold_logit"]

LOGITS_OUTPUT = "logits"
_OVERRIDES = ("threshold",)


def threshold_logit(threshold: float) -> float:
    """The logit ``l`` with ``sigmoid(l) == threshold``: ``sigmoid(x) > t  ⇔  x > l``."""
    t = float(threshold)
    return math.log(t / (1.0 - t))


def logits_to_source(logits: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Model-input logits ``[S, S]`` → ``[H, W]`` float32 logits in the source frame's pixels.

    Crops the letterbox padding away, then resizes the image region bilinearly to the source size.
    """
    arr = np.asarray(logits, np.float32)
    if arr.ndim != 2:
        raise ValueError(f"logits_to_source: expected [S, S] logits, got shape {arr.shape}")
    new_w, new_h = info.resized
    region = arr[info.pad_y: info.pad_y + new_h, info.pad_x: info.pad_x + new_w]
    if region.shape != (new_h, new_w):
        raise ValueError(f"logits_to_source: a {arr.shape} map cannot hold the letterboxed {new_w}x{new_h} "
                         f"region at ({info.pad_x}, {info.pad_y})")
    h, w = info.src_shape
    if (new_h, new_w) == (h, w):
        return np.ascontiguousarray(region)
    return cv2.resize(np.ascontiguousarray(region), (w, h), interpolation=cv2.INTER_LINEAR)


def _settings(bundle: Bundle, threshold: Any) -> tuple[float, list[str]]:
    """(threshold, classes) from the manifest's ``segment`` section, with the override applied."""
    where = str(bundle.root)
    seg = bundle.section("segment")
    if not seg.present:
        raise BundleError(f"{where}: the manifest has no 'segment' settings (threshold, classes)")
    pre = bundle.preprocess
    if pre.get("resize", "letterbox") != "letterbox":
        raise BundleError(f"{where}: preprocess resize {pre.get('resize')!r} is not supported for a binary "
                          "segmenter (expected 'letterbox')")
    classes = seg.get("classes", bundle.classes)
    if not isinstance(classes, list) or len(classes) != 2 or not all(isinstance(c, str) and c for c in classes):
        raise BundleError(f"{where}: segment.classes must be [background name, object name], got {classes!r}")
    # A probability strictly inside (0, 1): its logit is the cut on the raw scores.
    manifest_threshold = seg.number("threshold", 0.5, min=0, max=1, exclusive=True)
    value = manifest_threshold if threshold is None else check_number(threshold, "threshold", min=0, max=1,
                                                                      exclusive=True)
    return value, list(classes)


class BinarySegmentTask(PartTask):
    """Frames in (BGR uint8), two-class :class:`Segmentation` label maps in source pixels out.

    ``threshold`` (a probability in (0, 1)) replaces the manifest's ``segment.threshold``. After
    each call :attr:`timings` holds the milliseconds spent per stage (preprocess, infer,
    postprocess).
    """

    part_name = "segmenter"

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        precision: str | None = None,
        backend: str | None = None,
        threads: int | None = None,
        *,
        threshold: float | None = None,
        **unknown: Any,
    ):
        if unknown:
            raise UsageError(f"unknown binary segment option(s) {sorted(unknown)}; choose from {list(_OVERRIDES)}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.threshold, self.classes = _settings(self.bundle, threshold)  # cheap checks before loading
        self._cut = threshold_logit(self.threshold)
        super().__init__(self.bundle, precision=precision, backend=backend, threads=threads)

    def _check_io(self, where: str) -> None:
        super()._check_io(where)
        outs = {s.name: s for s in self.backend.outputs}
        if LOGITS_OUTPUT not in outs:
            raise BundleError(f"{where}: the segmenter has no {LOGITS_OUTPUT!r} output (it has {sorted(outs)})")
        shape = outs[LOGITS_OUTPUT].shape
        size = self.preprocessor.size
        if len(shape) != 4 or shape[1] != 1 or any(isinstance(d, int) and d != s for d, s in zip(shape[2:], size)):
            raise BundleError(f"{where}: output {LOGITS_OUTPUT!r} has shape {list(shape)}, expected "
                              f"[n, 1, {size[0]}, {size[1]}]")

    # -- running -----------------------------------------------------------------------
    def segment(self, bgr: np.ndarray, stamp: FrameStamp | None = None) -> Segmentation:
        """Segment one BGR uint8 frame; the label map (0 background, 1 object) has the frame's size."""
        return self.segment_batch([bgr], None if stamp is None else [stamp])[0]

    def segment_batch(
        self, images: Sequence[np.ndarray], stamps: Sequence[FrameStamp | None] | None = None
    ) -> list[Segmentation]:
        """Segment several frames (fed to the graph as many at a time as it takes)."""
        cut = np.float32(self._cut)

        def finish(out: dict[str, np.ndarray], infos: list[LetterboxInfo], stamps: list[Any]) -> list[Segmentation]:
            return [Segmentation((logits > cut).astype(np.int32), self.classes, stamp)
                    for logits, stamp in zip(self._source_logits(out, infos), stamps)]

        return self._run_batches(images, stamps, "segment_batch", {}, finish)

    def logits(self, bgr: np.ndarray) -> np.ndarray:
        """The object logits of one frame at its size, ``[H, W]`` float32 (before the threshold)."""
        return self._run_batches([bgr], None, "logits", {},
                                 lambda out, infos, _: self._source_logits(out, infos))[0]

    def probability(self, bgr: np.ndarray) -> np.ndarray:
        """The object probability ``sigmoid(logits)`` of one frame at its size, ``[H, W]`` float32."""
        x = self.logits(bgr)
        return (1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))).astype(np.float32)

    def _source_logits(self, out: dict[str, np.ndarray], infos: list[LetterboxInfo]) -> list[np.ndarray]:
        logits = np.asarray(out[LOGITS_OUTPUT])
        expected = (len(infos), 1, *self.preprocessor.size)
        if logits.shape != expected:
            raise BundleError(f"{self.bundle.root}: the segmenter returned logits of shape {tuple(logits.shape)}, "
                              f"expected {expected}")
        return [logits_to_source(logits[i, 0], info) for i, info in enumerate(infos)]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(threshold=self.threshold, classes=list(self.classes))
        return d
