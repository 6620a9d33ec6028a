"""COCO-style detection accuracy (mAP50-95, mAP50) of a bundle's detector on a labelled dataset.

pycocotools does the matching and averaging, exactly as the COCO benchmark does (101-point
interpolated AP, IoU 0.50:0.05:0.95, up to 100 detections an image, crowd regions ignored), so
the numbers compare with published ones. Torch-free: it runs a runtime :class:`DetectTask`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlexport.data.detection import DetectionDataset, category_id, to_coco_gt
from vlexport.data.readers import read_image
from vlexport.errors import DependencyError, SourceError, UsageError

__all__ = ["DetectionMetrics", "evaluate_detector", "evaluate_predictions", "coco_evaluate", "class_mapping"]

log = logging.getLogger("vlexport")


@dataclass
class DetectionMetrics:
    """Accuracy of a detector on a dataset. AP values lie in [0, 1]."""

    map50_95: float
    map50: float
    images: int
    detections: int
    per_class: dict[str, float] | None
    seconds: float
    classes: list[str] = field(default_factory=list)  # the dataset classes scored (the detector's)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, keyed like the attributes: AP as fractions (``map50_95``) and as points
        ×100 (``map50_95_points``), as the manifest and the CLI report them."""
        d: dict[str, Any] = {
            "map50_95": round(float(self.map50_95), 5),
            "map50": round(float(self.map50), 5),
            "map50_95_points": round(100.0 * float(self.map50_95), 2),
            "map50_points": round(100.0 * float(self.map50), 2),
            "images": int(self.images),
            "detections": int(self.detections),
            "seconds": round(float(self.seconds), 2),
            "classes": len(self.classes),
        }
        if self.per_class is not None:
            d["per_class"] = {k: round(float(v), 5) for k, v in self.per_class.items()}
        return d


def _pycocotools() -> tuple[Any, Any]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise DependencyError("detection mAP (vlexport validate) needs pycocotools: pip install 'vlexport[eval]'") from e
    return COCO, COCOeval


def coco_evaluate(
    gt_dict: dict[str, Any],
    predictions: Sequence[dict[str, Any]],
    *,
    per_class: bool = False,
    category_ids: Iterable[int] | None = None,
) -> tuple[float, float, dict[int, float] | None]:
    """(mAP50-95, mAP50, per-category AP50-95 or None) of COCO-format ``predictions``
    (``image_id``, ``category_id``, ``bbox`` xywh, ``score``) against ``gt_dict``.

    ``category_ids`` limits the score to those categories (those a detector can predict); by
    default all. Categories without ground truth do not count, as in COCO. No prediction gives
    0.0 (pycocotools itself cannot load an empty result list).
    """
    cats = sorted({int(c["id"]) for c in gt_dict.get("categories", [])} if category_ids is None
                  else {int(c) for c in category_ids})
    present = sorted({int(a["category_id"]) for a in gt_dict.get("annotations", [])
                      if not a.get("iscrowd", 0)} & set(cats))
    if not present:
        raise UsageError("the evaluation images have no ground-truth boxes of the classes scored, so mAP is undefined")
    if not predictions:
        return 0.0, 0.0, {c: 0.0 for c in present} if per_class else None
    COCO, COCOeval = _pycocotools()
    image_ids = {int(im["id"]) for im in gt_dict["images"]}
    cat_ids = {int(c["id"]) for c in gt_dict["categories"]}
    for p in predictions:
        if int(p["image_id"]) not in image_ids:
            raise UsageError(f"a prediction names image_id {p['image_id']}, which the ground truth does not have")
        if int(p["category_id"]) not in cat_ids:
            raise UsageError(f"a prediction names category_id {p['category_id']}, which the ground truth does not have")
    # pycocotools prints its progress; keep it out of the user's terminal.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {k: v for k, v in gt_dict.items()}
        gt.dataset.setdefault("info", {})
        gt.createIndex()
        dt = gt.loadRes([dict(p) for p in predictions])
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.catIds = cats
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    map50_95 = max(float(stats[0]), 0.0)  # -1 means "no ground truth": counted as 0 here
    map50 = max(float(stats[1]), 0.0)
    classes = None
    if per_class:
        # precision: [IoU thresholds, recall points, categories, area ranges, max dets]
        precision = ev.eval["precision"][:, :, :, 0, -1]
        classes = {}
        for k, cid in enumerate(ev.params.catIds):
            pr = precision[:, :, k]
            valid = pr > -1
            if valid.any():
                classes[int(cid)] = float(np.mean(pr[valid]))
    return map50_95, map50, classes


def evaluate_predictions(gt_dict: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(mAP50-95, mAP50) in [0, 1] of COCO-format ``predictions`` against a COCO ground-truth dict."""
    m, m50, _ = coco_evaluate(gt_dict, predictions)
    return m, m50


def _norm(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").split())


def class_mapping(model_classes: Sequence[str], dataset_names: Sequence[str]) -> dict[int, int]:
    """Model class index → dataset class index, by name (case, spaces and underscores ignored).

    Model classes the dataset lacks are left out (their detections are not scored); no common
    class at all is an error, since every score would be 0.
    """
    lookup = {_norm(n): i for i, n in enumerate(dataset_names)}
    mapping = {i: lookup[_norm(c)] for i, c in enumerate(model_classes) if _norm(c) in lookup}
    if not mapping:
        raise UsageError(
            f"the detector's classes ({', '.join(list(model_classes)[:5])}…) share no name with the dataset's "
            f"({', '.join(list(dataset_names)[:5])}…); evaluate on a dataset that labels them"
        )
    return mapping


def evaluation_inputs(task: Any, dataset: Any, max_images: int | None, model: str, outputs: str) -> tuple[Any, list[str]]:
    """The dataset limited to ``max_images`` and the task's class names, or a clear UsageError."""
    if max_images is not None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise UsageError(f"max_images must be a positive integer, got {max_images!r}")
        dataset = dataset.subset(range(min(max_images, len(dataset))))
    if len(dataset) == 0:
        raise UsageError("the evaluation dataset has no images")
    classes = list(getattr(task, "classes", None) or [])
    if not classes:
        raise UsageError(f"the {model} reports no class names, so its {outputs} cannot be matched to the dataset")
    return dataset, classes


def evaluate_detector(
    task: Any,
    dataset: DetectionDataset,
    *,
    progress: bool = True,
    max_images: int | None = None,
    per_class: bool = False,
    only_classes: Sequence[str] | None = None,
) -> DetectionMetrics:
    """Run ``task`` (a runtime DetectTask: ``task.detect(bgr)``, ``task.classes``) on every image
    of ``dataset`` and score it with pycocotools.

    Predicted classes map to the dataset's by name, so a closed-vocabulary COCO bundle and an
    open-vocabulary one with any subset of COCO's names both work: only the classes both know
    are scored (a 4-class vocabulary is not charged for the 76 COCO classes it cannot name), and
    detections of classes the dataset lacks are ignored. ``max_images`` evaluates the first N
    images only. ``only_classes`` scores those dataset class names alone (e.g. the novel classes
    of an open-vocabulary split, the detector still predicting every class it has). For a fair
    score use images the model was not calibrated on (:meth:`DetectionDataset.disjoint_split`).

    Set the task's ``score_threshold`` low (e.g. 0.001) for a COCO-comparable mAP: detections it
    drops can never count.
    """
    _pycocotools()  # a missing pycocotools fails now, not after running the detector on every image
    t0 = time.perf_counter()
    dataset, classes = evaluation_inputs(task, dataset, max_images, "detector", "detections")
    mapping = class_mapping(classes, dataset.names)
    gt = to_coco_gt(dataset)
    predictions: list[dict[str, Any]] = []
    from tqdm import tqdm

    for i, item in enumerate(tqdm(dataset.items, desc="evaluating", unit="img", disable=not progress, leave=False)):
        image = read_image(item.image_path)
        h, w = image.shape[:2]
        if (w, h) != (item.width, item.height):
            raise SourceError(
                f"{item.image_path} decodes to {w}x{h} but its annotations say {item.width}x{item.height}"
            )
        det = task.detect(image)
        boxes = np.asarray(det.boxes, np.float64)
        for box, score, cls in zip(boxes, np.asarray(det.scores), np.asarray(det.class_ids)):
            target = mapping.get(int(cls))
            if target is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            predictions.append({"image_id": i + 1, "category_id": category_id(target),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    scored = sorted(set(mapping.values()))
    if only_classes is not None:
        wanted = {_norm(n) for n in only_classes}
        scored = [i for i in scored if _norm(dataset.names[i]) in wanted]
        if not scored:
            raise UsageError(f"none of the classes {sorted(only_classes)} is both predicted and in the dataset")
    m, m50, by_cat = coco_evaluate(gt, predictions, per_class=per_class,
                                   category_ids=[category_id(i) for i in scored])
    named = None
    if by_cat is not None:
        named = {dataset.names[cid - 1]: ap for cid, ap in by_cat.items()}
    seconds = time.perf_counter() - t0
    log.info("mAP50-95 %.3f, mAP50 %.3f on %d images (%d detections, %.1f s)", m, m50, len(dataset),
             len(predictions), seconds)
    return DetectionMetrics(m, m50, len(dataset), len(predictions), named, seconds,
                            [dataset.names[i] for i in scored])
