"""Non-maximum suppression and detection selection against hand-solved cases."""

from __future__ import annotations

import numpy as np

from vlexport.runtime.postprocess import box_iou_one_to_many, nms, select_detections


def B(*rows: list[float]) -> np.ndarray:
    return np.array(rows, np.float32)


def test_iou_hand_values() -> None:
    iou = box_iou_one_to_many(B([0, 0, 10, 10])[0], B([1, 1, 11, 11], [0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10]))
    np.testing.assert_allclose(iou, [81 / 119, 0.5, 0.0, 1.0], rtol=1e-6)


def test_nms_overlap_and_threshold() -> None:
    boxes = B([0, 0, 10, 10], [1, 1, 11, 11])  # IoU 81/119 = 0.68
    scores = np.array([0.9, 0.8], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1]


def test_nms_equal_to_threshold_is_kept() -> None:
    # IoU exactly 0.5: suppression needs strictly greater (as torchvision).
    assert nms(B([0, 0, 10, 10], [0, 0, 10, 5]), np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]


def test_nms_is_greedy_not_transitive() -> None:
    # A-B and B-C overlap (IoU 1/3), A-C do not: B goes, so C stays.
    boxes = B([0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10])
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), 0.3).tolist() == [0, 2]


def test_nms_sorts_by_score() -> None:
    boxes = B([0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21])
    assert nms(boxes, np.array([0.1, 0.9, 0.5]), 0.5).tolist() == [1, 2, 0]


def test_nms_class_aware_and_agnostic() -> None:
    boxes = B([0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10])
    scores = np.array([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5, class_ids=np.array([0, 1, 0])).tolist() == [0, 1]
    assert nms(boxes, scores, 0.5).tolist() == [0]


def test_nms_class_offset_handles_negative_coordinates() -> None:
    boxes = B([-50, -50, -40, -40], [-50, -50, -40, -40])
    assert nms(boxes, np.array([0.9, 0.8]), 0.5, class_ids=np.array([0, 1])).tolist() == [0, 1]


def test_nms_empty_and_max_keep() -> None:
    assert nms(np.zeros((0, 4)), np.zeros((0,)), 0.5).tolist() == []
    boxes = B([0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21])
    assert nms(boxes, np.array([0.1, 0.9, 0.5]), 0.5, max_keep=2).tolist() == [1, 2]


def test_select_detections_threshold_nms_topk() -> None:
    boxes = B([0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [100, 100, 110, 110], [0, 0, 10, 10])
    scores = np.array([0.9, 0.85, 0.6, 0.2, 0.7], np.float32)
    classes = np.array([0, 0, 1, 1, 2], np.int32)
    b, s, c = select_detections(boxes, scores, classes, 0.25, 0.5, 10)
    assert s.tolist() == np.float32([0.9, 0.7, 0.6]).tolist()
    assert c.tolist() == [0, 2, 1]
    assert b.dtype == np.float32 and b.shape == (3, 4)
    _, s, c = select_detections(boxes, scores, classes, 0.25, 0.5, 10, class_agnostic=True)
    assert c.tolist() == [0, 1]
    _, s, _ = select_detections(boxes, scores, classes, 0.25, 0.5, 1)
    assert s.tolist() == [np.float32(0.9)]
    b, s, c = select_detections(boxes, scores, classes, 0.95, 0.5, 10)
    assert b.shape == (0, 4) and s.shape == (0,) and c.shape == (0,)
