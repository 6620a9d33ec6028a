"""DETR detection (and instance masks) from a `detr` bundle's ``detector`` part, without torch.

The graph already does DETR's ``PostProcess`` (boxes in source pixels, best real class per
query); this task resizes and normalises the frame by DETR's rule, keeps the queries whose score
is above the threshold (as the official demo: ``score > threshold``, no NMS), orders them by score
and, for segmentation models, brings their masks to the source size as ``PostProcessSegm`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.manifest import check_number
from vlexport.runtime.detr_preprocess import IMAGENET_MEAN, IMAGENET_STD, detr_preprocess
from vlexport.runtime.results import Detections, FrameStamp
from vlexport.runtime.tasks.base import IMAGE_INPUT, PartTask, now_ms

__all__ = ["DetrTask"]

SIZE_INPUT = "orig_size"
_OUTPUTS = ("boxes", "scores", "labels")
_MASKS = "masks"
# Mask probabilities are brought back to logits before resizing (PostProcessSegm interpolates the
# logits): clipping keeps log(p / (1 - p)) finite where float32 rounded p to 0 or 1.
_P_EPS = 1e-7


class DetrTask(PartTask):
    """Frames in (BGR uint8), :class:`Detections` out (with ``masks`` for segmentation bundles).

    ``score_threshold`` (default: the manifest's, 0.7 as the official demo) keeps queries with a
    higher score; ``mask_threshold`` (default 0.5) binarises the mask probabilities;
    ``max_detections`` (default: all queries) keeps the best N. After each call :attr:`timings`
    holds the milliseconds spent per stage.
    """

    part_name = "detector"

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        precision: str | None = None,
        backend: str | None = None,
        threads: int | None = None,
        *,
        score_threshold: float | None = None,
        mask_threshold: float | None = None,
        max_detections: int | None = None,
        **unknown: Any,
    ):
        bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        if unknown:
            names = sorted(unknown)
            hint = " (DETR has no NMS)" if "iou_threshold" in names else ""
            raise UsageError(f"unknown DETR option(s) {names}{hint}; "
                             "choose from ['mask_threshold', 'max_detections', 'score_threshold']")
        post = bundle.section("postprocess")
        if post.get("type") != "detr":
            raise BundleError(f"{bundle.root}: postprocess type {post.get('type')!r} is not 'detr'")
        self.score_threshold = post.number("score_threshold", 0.7, min=0, max=1, override=score_threshold)
        self.mask_threshold = post.number("mask_threshold", 0.5, min=0, max=1, override=mask_threshold)
        # No cap in the manifest: DETR keeps every query above the score threshold unless told.
        self.max_detections: int | None = (
            None if max_detections is None else check_number(max_detections, "max_detections", integer=True, min=1))
        self.has_masks = post.flag("masks", False)
        super().__init__(bundle, precision=precision, backend=backend, threads=threads)
        self.classes: list[str] = self.bundle.classes
        self.timings = {}

    # -- set-up and checks ---------------------------------------------------------------
    def _setup_preprocessing(self, where: str) -> None:
        pre = self.bundle.preprocess
        if pre.get("resize") != "detr":
            raise BundleError(f"{where}: preprocess resize {pre.get('resize')!r} is not 'detr'")
        try:
            self.short_side = int(pre["short_side"])
            self.max_size = None if pre.get("max_size") is None else int(pre["max_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: preprocess needs 'short_side' and 'max_size' integers, got {pre}") from e
        # The runtime implements one normalisation (detr_preprocess): refuse a manifest that says otherwise.
        expected = {"color": "RGB", "scale": 1.0 / 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        for key, value in expected.items():
            got = pre.get(key)
            same = got == value if isinstance(value, str) else (
                got is not None and np.allclose(np.asarray(got, np.float64), value, rtol=0, atol=1e-9))
            if not same:
                raise BundleError(f"{where}: preprocess {key} {got!r} is not DETR's ({value!r})")

    def _check_io(self, where: str) -> None:
        inputs = {s.name: s for s in self.backend.inputs}
        if set(inputs) != {IMAGE_INPUT, SIZE_INPUT}:
            raise BundleError(f"{where}: the detector takes {sorted(inputs)}, expected {[IMAGE_INPUT, SIZE_INPUT]}")
        shape = inputs[IMAGE_INPUT].shape
        if len(shape) != 4 or shape[0] != 1 or shape[1] != 3 or isinstance(shape[2], int) or isinstance(shape[3], int):
            raise BundleError(f"{where}: input {IMAGE_INPUT!r} has shape {list(shape)}, expected [1, 3, height, width] "
                              "with dynamic height and width")
        outs = {s.name for s in self.backend.outputs}
        wanted = set(_OUTPUTS) | ({_MASKS} if self.has_masks else set())
        if not wanted <= outs:
            raise BundleError(f"{where}: the detector outputs {sorted(outs)}, expected {sorted(wanted)}")

    # -- running -----------------------------------------------------------------------
    def detect(self, bgr: np.ndarray, stamp: FrameStamp | None = None) -> Detections:
        """Detect objects in one BGR uint8 frame; boxes are xyxy in the frame's pixels."""
        return self.detect_batch([bgr], None if stamp is None else [stamp])[0]

    def detect_batch(
        self, images: Sequence[np.ndarray], stamps: Sequence[FrameStamp | None] | None = None
    ) -> list[Detections]:
        """Detect in several frames (one graph run each: every frame keeps its own size)."""
        return self._one_by_one(images, stamps, "detect_batch", self._detect_one)

    def _detect_one(self, image: np.ndarray, stamp: FrameStamp | None, times: dict[str, float]) -> Detections:
        t0 = now_ms()
        x, resized = detr_preprocess(image, self.short_side, self.max_size)
        h, w = image.shape[:2]
        feeds = {IMAGE_INPUT: x[None], SIZE_INPUT: np.array([[w, h]], np.float32)}
        t1 = now_ms()
        out = self.backend.infer(feeds)
        t2 = now_ms()
        result = self._select(out, (w, h), resized, stamp)
        times["preprocess"] += t1 - t0
        times["infer"] += t2 - t1
        times["postprocess"] += now_ms() - t2
        return result

    def _select(self, out: dict[str, np.ndarray], source: tuple[int, int], resized: tuple[int, int],
                stamp: FrameStamp | None) -> Detections:
        scores = out["scores"][0]
        keep = np.flatnonzero(scores > self.score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: self.max_detections]
        ids = out["labels"][0][keep].astype(np.int64)
        n = len(self.classes)
        labels = [self.classes[i] if 0 <= i < n else f"class{i}" for i in ids.tolist()]
        masks = None
        if self.has_masks:
            masks = _masks_to_source(out[_MASKS][0][keep], resized, source, self.mask_threshold)
        return Detections(out["boxes"][0][keep], scores[keep], ids, labels, stamp, masks=masks)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(score_threshold=self.score_threshold, mask_threshold=self.mask_threshold,
                 max_detections=self.max_detections, masks=self.has_masks, classes=len(self.classes),
                 short_side=self.short_side, max_size=self.max_size)
        return d


def _masks_to_source(probs: np.ndarray, resized: tuple[int, int], source: tuple[int, int],
                     threshold: float) -> np.ndarray:
    """``[K, h, w]`` probabilities at stride 4 → ``[K, H, W]`` bool masks at the source size.

    As ``PostProcessSegm``: bilinear (half-pixel) up to the resized input size on the logits,
    threshold, then nearest-neighbour to the source size.
    """
    import cv2

    (rw, rh), (sw, sh) = resized, source
    out = np.zeros((probs.shape[0], sh, sw), bool)
    if probs.shape[0] == 0:
        return out
    p = np.clip(probs.astype(np.float32), _P_EPS, 1.0 - _P_EPS)
    logits = np.log(p) - np.log1p(-p)
    cut = float(np.log(threshold) - np.log1p(-threshold)) if 0.0 < threshold < 1.0 else (
        -np.inf if threshold <= 0.0 else np.inf)
    for i, m in enumerate(logits):
        up = cv2.resize(m, (rw, rh), interpolation=cv2.INTER_LINEAR) > cut
        out[i] = cv2.resize(up.view(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST).astype(bool)
    return out
