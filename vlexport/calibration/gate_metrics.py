"""The task metric the accuracy gate measures, per task, on held-out images of ``--val``.

* detection (yolo, kdeov): COCO mAP50-95 on a YOLO or COCO dataset;
* semantic segmentation (sclip): mIoU on id masks (COCO128 + semantic.yaml) or VOC pairs;
* binary segmentation (multiscale): foreground IoU on the same masks, every labelled class but
  ``background`` counting as foreground.

Images the calibration used are set aside, so INT8 is never scored on what it was calibrated on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import UsageError

log = logging.getLogger("vlexport")

__all__ = ["GateMetric", "gate_metric", "binary_iou", "labelled_kind"]


@dataclass
class GateMetric:
    """How the gate scores one precision of a staged bundle: ``evaluate(bundle, precision)`` gives
    (the metric as a fraction in [0, 1], the full figures)."""

    name: str  # "map50_95", "miou", "iou"
    label: str  # "mAP50-95", "mIoU", "IoU"
    images: int
    evaluate: Callable[[Path, str], tuple[float, dict[str, Any]]]


def _held_out(items: list[Any], path_of: Callable[[Any], str], calib_names: Iterable[str], val: str) -> list[int]:
    calib = {str(Path(n).resolve()) for n in calib_names}
    keep = [i for i, it in enumerate(items) if str(Path(path_of(it)).resolve()) not in calib]
    if not keep:
        raise UsageError(f"every image of --val {val} is a calibration image: evaluate on images the "
                         "calibration did not see (a smaller --calib-size or another --calib source)")
    return keep


def binary_iou(task: Any, dataset: Any, progress: bool = True) -> dict[str, Any]:
    """Foreground IoU of a binary segmenter (``task.segment``: label 1 = object) on ``dataset``."""
    from tqdm import tqdm

    from vlexport.data.readers import read_image

    background = {i for i, n in enumerate(dataset.names) if n.lower() in ("background", "unlabeled")}
    inter = union = 0
    for i in tqdm(range(len(dataset)), desc="evaluating", unit="img", disable=not progress, leave=False):
        image = read_image(dataset.items[i][0])
        gt = dataset.read_mask(i)
        valid = gt != dataset.ignore_index
        fg = valid & ~np.isin(gt, list(background))
        pred = (np.asarray(task.segment(image).label_map) == 1) & valid
        inter += int(np.count_nonzero(pred & fg))
        union += int(np.count_nonzero(pred | fg))
    iou = inter / union if union else 1.0
    return {"iou": iou, "images": len(dataset)}


def gate_metric(task: str, family: str, val: str, calib_names: Iterable[str]) -> GateMetric:
    """The metric of ``task`` (a bundle's task; ``family`` tells binary from semantic segmentation)."""
    from vlexport import runtime

    calib_names = list(calib_names)
    if task == "detect":
        from vlexport.data.detection import load_detection_dataset
        from vlexport.evaluation.detection import evaluate_detector

        ds = load_detection_dataset(val)
        ds = ds.subset(_held_out(ds.items, lambda it: it.image_path, calib_names, val))

        def evaluate(bundle: Path, precision: str) -> tuple[float, dict[str, Any]]:
            t = runtime.load(bundle, precision=precision, backend="onnxruntime", score_threshold=0.001,
                             max_detections=300)
            try:
                m = evaluate_detector(t, ds, progress=True)
            finally:
                t.close()
            return m.map50_95, m.to_dict()

        return GateMetric("map50_95", "mAP50-95", len(ds.items), evaluate)
    if task == "segment":
        from vlexport.data.segmentation import load_segmentation_dataset
        from vlexport.evaluation.segmentation import evaluate_segmenter

        ds = load_segmentation_dataset(val)
        ds = ds.subset(_held_out(ds.items, lambda it: it[0], calib_names, val))
        binary = family == "multiscale"

        def evaluate(bundle: Path, precision: str) -> tuple[float, dict[str, Any]]:
            t = runtime.load(bundle, precision=precision, backend="onnxruntime")
            try:
                if binary:
                    d = binary_iou(t, ds)
                    return d["iou"], d
                m = evaluate_segmenter(t, ds, progress=True)
            finally:
                t.close()
            return m.miou, m.to_dict()

        return GateMetric("iou" if binary else "miou", "IoU" if binary else "mIoU", len(ds.items), evaluate)
    raise UsageError(f"the accuracy gate measures detection mAP and segmentation (m)IoU; the {family} family's "
                     f"task is {task!r}")


def labelled_kind(task: str, val: str) -> str | None:
    """What kind of labelled dataset ``--val`` is for ``task`` (None: images only, no gate)."""
    if task == "detect":
        from vlexport.data.detection import dataset_kind

        return dataset_kind(val)
    try:
        from vlexport.data.segmentation import load_segmentation_dataset

        return load_segmentation_dataset(val).kind
    except Exception:  # not a segmentation dataset: parity only, like unlabelled detection images
        return None
