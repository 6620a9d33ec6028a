"""Why runtime NMS stays in numpy: where cv2.dnn.NMSBoxesBatched agrees with it and where it does not.

If OpenCV changes on one of the documented differences, the module docstring of
vlexport.runtime.postprocess needs revisiting.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vlexport.runtime.postprocess import nms, select_detections


def _cv_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, classes: np.ndarray | None = None) -> list[int]:
    b = boxes.astype(np.float64)
    xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1).tolist()
    s = scores.astype(np.float64).tolist()
    if classes is None:
        keep = cv2.dnn.NMSBoxes(xywh, s, 0.0, iou)
    else:
        keep = cv2.dnn.NMSBoxesBatched(xywh, s, classes.astype(int).tolist(), 0.0, iou)
    return np.asarray(keep, np.int64).reshape(-1).tolist()


@pytest.mark.parametrize("seed", range(20))
def test_ordinary_boxes_keep_the_same_boxes_in_the_same_order(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    xy = rng.uniform(0, 600, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 200, (n, 2))], 1).astype(np.float32)
    scores = rng.uniform(0.01, 1, n).astype(np.float32)
    classes = rng.integers(0, 80, n)
    iou = float(rng.choice([0.3, 0.45, 0.5, 0.7]))
    assert nms(boxes, scores, iou).tolist() == _cv_nms(boxes, scores, iou)
    assert nms(boxes, scores, iou, class_ids=classes).tolist() == _cv_nms(boxes, scores, iou, classes)
    assert nms(boxes, scores, iou, class_ids=classes, max_keep=10).tolist() == _cv_nms(boxes, scores, iou, classes)[:10]
    # Many equal scores: both keep the lower index first.
    tied = np.maximum(np.round(scores * 10) / 10, 0.1).astype(np.float32)
    assert nms(boxes, tied, iou, class_ids=classes).tolist() == _cv_nms(boxes, tied, iou, classes)


def test_where_opencv_differs():
    # A score equal to the threshold: kept here (>=), dropped by OpenCV (>, and no threshold below 0).
    boxes = np.float32([[0, 0, 10, 10], [20, 20, 30, 30]])
    scores = np.float32([0.9, 0.0])
    _, kept, _ = select_detections(boxes, scores, np.array([0, 0]), 0.0, 0.5, 10)
    assert kept.tolist() == [np.float32(0.9), np.float32(0.0)]
    assert _cv_nms(boxes, scores, 0.5) == [0]
    # Negative coordinates: OpenCV's class offset (c * (max coordinate + 1)) lets classes suppress each other.
    neg = np.float32([[-100, -100, -10, -10], [-100, -100, -10, -10]])
    two = np.float32([0.9, 0.8])
    assert nms(neg, two, 0.5, class_ids=np.array([0, 1])).tolist() == [0, 1]
    assert _cv_nms(neg, two, 0.5, np.array([0, 1])) == [0]
    # Zero-area boxes have IoU 0 here; OpenCV lets them suppress one another.
    flat = np.float32([[0, 0, 0, 10], [0, 0, 0, 10], [5, 5, 5, 5]])
    assert nms(flat, np.float32([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 1, 2]
    assert _cv_nms(flat, np.float32([0.9, 0.8, 0.7]), 0.5) == [0]
