"""mIoU of a bundle's segmenter: pixel confusion counts, per-class IoU and the evaluation loop.

The datasets it scores on load in :mod:`vlexport.data.segmentation`. Torch-free:
:func:`evaluate_segmenter` runs a runtime ``SegmentTask``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlexport.data.readers import read_image
from vlexport.data.segmentation import SegmentationDataset
from vlexport.errors import SourceError, UsageError

__all__ = [
    "ConfusionMatrix",
    "SegmentationMetrics",
    "evaluate_segmenter",
    "segmentation_class_mapping",
]

log = logging.getLogger("vlexport")


# -- scoring ------------------------------------------------------------------------------------
class ConfusionMatrix:
    """Pixel confusion counts ``[gt, pred]`` over ``num_classes`` classes.

    Ground-truth pixels equal to ``ignore_index`` (or outside ``0..num_classes-1``) are skipped.
    A prediction outside ``0..num_classes-1`` (a class the dataset does not have) counts against
    the ground-truth class (a false negative) and as no class's false positive.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes + 1), np.int64)  # last column: "other"

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise UsageError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
        if pred.dtype.kind not in "iu" or gt.dtype.kind not in "iu":
            raise UsageError(f"prediction and ground truth must be integer arrays, got {pred.dtype}, {gt.dtype}")
        n = self.num_classes
        g = gt.astype(np.int64).ravel()
        p = pred.astype(np.int64).ravel()
        keep = (g != self.ignore_index) & (g >= 0) & (g < n)
        g, p = g[keep], p[keep]
        p = np.where((p >= 0) & (p < n), p, n)
        self.matrix += np.bincount(g * (n + 1) + p, minlength=n * (n + 1)).reshape(n, n + 1)

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    def per_class_iou(self) -> np.ndarray:
        """``[num_classes]`` IoU; NaN for a class absent from both prediction and ground truth."""
        n = self.num_classes
        tp = np.diag(self.matrix[:, :n]).astype(np.float64)
        fn = self.matrix.sum(axis=1) - tp
        fp = self.matrix[:, :n].sum(axis=0) - tp
        union = tp + fp + fn
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes that occur (in prediction or ground truth); NaN if none does."""
        iou = self.per_class_iou()
        return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")

    def pixel_accuracy(self) -> float:
        """Correct pixels / scored pixels; NaN before any pixel was scored."""
        total = self.total
        return float(np.trace(self.matrix[:, : self.num_classes]) / total) if total else float("nan")


@dataclass
class SegmentationMetrics:
    """Accuracy of a segmenter on a dataset (IoU and accuracy as fractions in [0, 1])."""

    miou: float
    per_class_iou: dict[str, float]
    pixel_accuracy: float
    images: int
    seconds: float = 0.0
    classes: list[str] = field(default_factory=list)  # the dataset classes scored

    def to_dict(self) -> dict[str, Any]:
        def r(v: float) -> float | None:
            return None if v != v else round(float(v), 5)

        return {
            "miou": r(self.miou),
            "miou_points": None if self.miou != self.miou else round(100.0 * float(self.miou), 2),
            "pixel_accuracy": r(self.pixel_accuracy),
            "images": int(self.images),
            "seconds": round(float(self.seconds), 2),
            "classes": len(self.classes),
            "per_class_iou": {k: r(v) for k, v in self.per_class_iou.items()},
        }


def segmentation_class_mapping(
    predicted: Sequence[str], dataset_names: Sequence[str], class_map: Mapping[str, str] | None = None
) -> dict[int, int]:
    """``{predicted class index: dataset class index}`` by name (``class_map`` renames predicted
    names first, e.g. ``{"tv": "tvmonitor"}``); predicted classes without a match are left out."""
    lookup = {str(n): i for i, n in enumerate(dataset_names)}
    class_map = dict(class_map or {})
    unknown = sorted(set(class_map) - set(map(str, predicted)))
    if unknown:
        raise UsageError(f"class_map names {unknown}, which the segmenter does not predict")
    out = {}
    for i, name in enumerate(predicted):
        target = class_map.get(str(name), str(name))
        if target in lookup:
            out[i] = lookup[target]
    return out


def evaluate_segmenter(
    task: Any,
    dataset: SegmentationDataset,
    class_map: Mapping[str, str] | None = None,
    progress: bool = True,
    max_images: int | None = None,
) -> SegmentationMetrics:
    """Run ``task`` (a runtime SegmentTask: ``task.segment(bgr)``, ``task.classes``) on every image
    of ``dataset`` and score the label maps (mIoU, per-class IoU, pixel accuracy).

    Predicted classes map to the dataset's by name (after ``class_map`` renames). As for
    detection, only the dataset classes the segmenter can name are scored: pixels of other
    ground-truth classes are ignored, and a predicted class the dataset lacks counts as wrong on
    every scored pixel it covers. mIoU averages the scored classes that occur in the prediction
    or the ground truth.
    """
    from vlexport.evaluation.detection import evaluation_inputs

    t0 = time.perf_counter()
    dataset, classes = evaluation_inputs(task, dataset, max_images, "segmenter", "labels")
    mapping = segmentation_class_mapping(classes, dataset.names, class_map)
    if not mapping:
        raise UsageError(
            f"none of the segmenter's classes ({classes[:5]}...) is a class of the dataset "
            f"({dataset.names[:5]}...); pass class_map to match names"
        )
    scored = sorted(set(mapping.values()))
    n = dataset.num_classes
    pred_lut = np.full(len(classes), n, np.int64)  # unmatched -> "other" (never correct)
    for p_idx, d_idx in mapping.items():
        pred_lut[p_idx] = d_idx
    # Ground truth of classes the segmenter cannot name -> ignore.
    gt_lut_keep = np.zeros(n, bool)
    gt_lut_keep[scored] = True
    cm = ConfusionMatrix(n, dataset.ignore_index)
    from tqdm import tqdm

    for i in tqdm(range(len(dataset)), desc="evaluating", unit="img", disable=not progress, leave=False):
        img_path, mask_path = dataset.items[i]
        image = read_image(img_path)
        gt = dataset.read_mask(i)
        if gt.shape != image.shape[:2]:
            raise SourceError(f"{mask_path} is {gt.shape[1]}x{gt.shape[0]} but its image {img_path} is "
                              f"{image.shape[1]}x{image.shape[0]}")
        seg = task.segment(image)
        pred = pred_lut[np.asarray(seg.label_map)]
        valid = (gt >= 0) & (gt < n)
        drop = valid.copy()
        drop[valid] = ~gt_lut_keep[gt[valid]]
        gt = np.where(drop, dataset.ignore_index, gt)
        cm.update(pred, gt)
    iou = cm.per_class_iou()
    per_class = {dataset.names[c]: float(iou[c]) for c in scored}
    scored_iou = iou[scored]
    miou = float(np.nanmean(scored_iou)) if np.any(~np.isnan(scored_iou)) else float("nan")
    seconds = time.perf_counter() - t0
    log.info("mIoU %.3f, pixel accuracy %.3f on %d images (%.1f s)", miou, cm.pixel_accuracy(), len(dataset), seconds)
    return SegmentationMetrics(miou, per_class, cm.pixel_accuracy(), len(dataset), seconds,
                               [dataset.names[c] for c in scored])
