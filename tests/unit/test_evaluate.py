"""COCO mAP via pycocotools: hand-checked cases and the detector loop over a real dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlexport.data.detection import DetectionDataset, DetectionItem, load_detection_dataset, to_coco_gt
from vlexport.evaluation.detection import (
    DetectionMetrics,
    class_mapping,
    coco_evaluate,
    evaluate_detector,
    evaluate_predictions,
)
from vlexport.errors import SourceError, UsageError
from vlexport.runtime.results import Detections

pytest.importorskip("pycocotools")


def _gt(boxes_per_image: list[list[tuple[float, float, float, float, int]]], num_classes: int = 2) -> dict:
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image, start=1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for x, y, w, h, c in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}


def _perfect(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
            for a in gt["annotations"] if not a["iscrowd"]]


def test_predictions_equal_to_ground_truth_score_one():
    gt = _gt([[(10, 10, 100, 50, 1), (200, 100, 40, 80, 2)], [(0, 0, 640, 480, 1)]])
    assert evaluate_predictions(gt, _perfect(gt)) == (pytest.approx(1.0), pytest.approx(1.0))


def test_no_predictions_score_zero():
    gt = _gt([[(10, 10, 100, 50, 1)]])
    assert evaluate_predictions(gt, []) == (0.0, 0.0)
    m, m50, per = coco_evaluate(gt, [], per_class=True)
    assert (m, m50, per) == (0.0, 0.0, {1: 0.0})


def test_shifted_box_gives_known_ap():
    # GT [0,0,100,100]; the prediction moved 20 px right has IoU 80/120 = 0.667: a hit at the
    # IoU thresholds 0.50, 0.55, 0.60, 0.65 and a miss at the six above → AP50-95 = 4/10.
    gt = _gt([[(0, 0, 100, 100, 1)]], num_classes=1)
    pred = [{"image_id": 1, "category_id": 1, "bbox": [20, 0, 100, 100], "score": 0.8}]
    m, m50 = evaluate_predictions(gt, pred)
    assert m == pytest.approx(0.4) and m50 == pytest.approx(1.0)


def test_false_positive_ranked_first_halves_precision():
    # Two GT boxes; three predictions: a miss with the highest score, then both hits.
    # Precision at recall 0.5 is 1/2, at recall 1.0 is 2/3; interpolated → AP = 2/3 at every IoU.
    gt = _gt([[(0, 0, 100, 100, 1), (300, 300, 100, 100, 1)]], num_classes=1)
    pred = [
        {"image_id": 1, "category_id": 1, "bbox": [500, 10, 50, 50], "score": 0.95},
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [300, 300, 100, 100], "score": 0.8},
    ]
    m, m50 = evaluate_predictions(gt, pred)
    # 101-point interpolation: recall points 0..1.0 all see precision max(1/2, 2/3) = 2/3.
    assert m == pytest.approx(2 / 3, abs=1e-6) and m50 == pytest.approx(2 / 3, abs=1e-6)


def test_wrong_ids_and_empty_ground_truth_are_errors():
    gt = _gt([[(0, 0, 10, 10, 1)]])
    with pytest.raises(UsageError, match="image_id 7"):
        evaluate_predictions(gt, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(UsageError, match="category_id 9"):
        evaluate_predictions(gt, [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(UsageError, match="no ground-truth boxes"):
        evaluate_predictions(_gt([[]]), [])
    with pytest.raises(UsageError, match="no ground-truth boxes of the classes scored"):
        coco_evaluate(gt, [], category_ids=[2])


def test_scoring_only_some_categories():
    # Class 1 found perfectly, class 2 missed: over both AP = 0.5, over class 1 alone AP = 1.
    gt = _gt([[(0, 0, 100, 100, 1), (300, 300, 50, 50, 2)]])
    pred = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 0.9}]
    assert coco_evaluate(gt, pred)[:2] == (pytest.approx(0.5), pytest.approx(0.5))
    assert coco_evaluate(gt, pred, category_ids=[1])[:2] == (pytest.approx(1.0), pytest.approx(1.0))


def test_coco128_ground_truth_against_itself(assets):
    coco = load_detection_dataset(assets / "coco128/annotations/instances_train2017.json")
    gt = to_coco_gt(coco)
    m, m50, per = coco_evaluate(gt, _perfect(gt), per_class=True)
    assert m == pytest.approx(1.0) and m50 == pytest.approx(1.0)
    assert len(per) == 71 and all(v == pytest.approx(1.0) for v in per.values())  # 71 classes in COCO128


def test_class_mapping_by_name():
    assert class_mapping(["Person", "traffic_light", "unicorn"], ["person", "car", "traffic light"]) == {0: 0, 1: 2}
    with pytest.raises(UsageError, match="share no name"):
        class_mapping(["unicorn"], ["person"])


# -- the detector loop ----------------------------------------------------------------------------
class OracleTask:
    """Stands in for a DetectTask: returns the ground truth of each image in turn, in its own
    class order (reversed, plus a class the dataset lacks) so that the name mapping is exercised."""

    def __init__(self, dataset: DetectionDataset, drop_every: int = 0):
        self.classes = ["unicorn"] + list(reversed(dataset.names))
        self._items = iter(dataset.items)
        self._drop_every = drop_every
        self.calls = 0

    def detect(self, bgr: np.ndarray) -> Detections:
        item = next(self._items)
        assert bgr.shape[:2] == (item.height, item.width)
        self.calls += 1
        n = len(self.classes) - 1
        keep = item.iscrowd == 0 if item.iscrowd is not None else np.ones(len(item), bool)
        boxes, cls = item.boxes[keep], item.class_ids[keep]
        ours = np.array([n - c for c in cls], dtype=np.int64)  # dataset index → reversed index
        if self._drop_every:
            boxes, ours = boxes[:: self._drop_every], ours[:: self._drop_every]
        # Plus a confident detection of a class the dataset does not have: it must be ignored.
        boxes = np.concatenate([boxes, [[0, 0, 50, 50]]]).astype(np.float32)
        ours = np.concatenate([ours, [0]])
        scores = np.full(len(ours), 0.9, np.float32)
        return Detections(boxes, scores, ours, [self.classes[i] for i in ours])


def test_evaluate_detector_oracle_scores_one(assets):
    ds = load_detection_dataset(assets / "coco128/data.yaml")
    task = OracleTask(ds)
    metrics = evaluate_detector(task, ds, progress=False, per_class=True)
    assert isinstance(metrics, DetectionMetrics) and task.calls == 128
    assert metrics.map50_95 == pytest.approx(1.0) and metrics.map50 == pytest.approx(1.0)
    assert metrics.images == 128 and metrics.detections == ds.num_boxes  # the unicorns were dropped
    d = metrics.to_dict()
    assert d["map50_95"] == 1.0 and d["map50_95_points"] == 100.0 and d["per_class"]["person"] == 1.0
    assert set(d) >= {"map50", "map50_points", "images", "detections", "seconds"} and d["classes"] == 80


def test_evaluate_detector_partial_and_max_images(assets):
    ds = load_detection_dataset(assets / "coco128/annotations/instances_train2017.json")
    metrics = evaluate_detector(OracleTask(ds, drop_every=2), ds, progress=False, max_images=20)
    assert metrics.images == 20
    assert 0.2 < metrics.map50_95 < 0.9 and metrics.map50 == pytest.approx(metrics.map50_95)


class SilentTask:
    classes = ["person", "car"]

    def detect(self, bgr):
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), [])


def test_evaluate_detector_no_detections_and_errors(assets, tmp_path):
    ds = load_detection_dataset(assets / "coco128/data.yaml")
    metrics = evaluate_detector(SilentTask(), ds, progress=False, max_images=5)
    assert (metrics.map50_95, metrics.map50, metrics.detections) == (0.0, 0.0, 0)
    with pytest.raises(UsageError, match="max_images"):
        evaluate_detector(SilentTask(), ds, max_images=0)

    class Unicorns(SilentTask):
        classes = ["unicorn"]

    with pytest.raises(UsageError, match="share no name"):
        evaluate_detector(Unicorns(), ds, progress=False)
    # Annotations for another image size: the boxes would be wrong, so it is an error.
    item = ds.items[0]
    wrong = DetectionDataset(ds.root, ds.names, [DetectionItem(item.image_path, item.boxes, item.class_ids,
                                                               item.width + 1, item.height)], "yolo")
    with pytest.raises(SourceError, match="decodes to"):
        evaluate_detector(SilentTask(), wrong, progress=False)


def test_evaluate_a_real_bundle(tiny_bundle, assets):
    """End to end with a runtime DetectTask (tiny random-weight bundle: the score is near 0,
    the point is that real detections flow through the name mapping into pycocotools)."""
    from vlexport.runtime.tasks.detect import DetectTask

    ds = load_detection_dataset(assets / "coco128/data.yaml")
    with DetectTask(tiny_bundle, score_threshold=0.001) as task:
        metrics = evaluate_detector(task, ds, progress=False, max_images=6, per_class=True)
    assert metrics.images == 6 and metrics.detections > 0
    assert 0.0 <= metrics.map50_95 <= metrics.map50 <= 1.0
    # Only the vocabulary's classes are scored, and only those with ground truth in the 6 images.
    assert metrics.classes == ["person", "car", "bus", "dog"]  # in the dataset's order
    assert set(metrics.per_class) <= {"person", "bus", "car", "dog"} and "person" in metrics.per_class


def test_dataset_paths_are_real(assets):
    # Guard for the tests above: the shared COCO128 is where the README says.
    assert Path(assets / "coco128/images/train2017").is_dir()
