"""Result dataclasses: validation messages, JSON output; and drawing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlexport.runtime.draw import class_color, draw_detections
from vlexport.runtime.results import Detections, Embedding, FrameStamp


def dets(k: int = 2, stamp: FrameStamp | None = None) -> Detections:
    boxes = np.array([[10, 10, 50, 60], [60.123456, 5, 90, 40]], np.float64)[:k]
    return Detections(boxes, np.array([0.87654, 0.5])[:k], np.array([0, 2])[:k], ["person", "car"][:k], stamp)


def test_detections_coerce_and_len() -> None:
    d = dets()
    assert len(d) == 2 and d.boxes.dtype == np.float32 and d.class_ids.dtype == np.int64
    assert len(Detections.empty()) == 0
    assert len(Detections([], [], [], [])) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"boxes": np.zeros((2, 5))}, "boxes: got shape (2, 5), expected (K, 4)"),
        ({"scores": np.zeros((3,))}, "scores: got shape (3,), expected (2,)"),
        ({"class_ids": np.zeros((2, 1), np.int64)}, "class_ids: got shape (2, 1), expected (2,)"),
        ({"class_ids": np.array([0.5, 1.0])}, "class_ids: got dtype float64"),
        ({"labels": ["a"]}, "labels: got 1 labels, expected 2"),
        ({"stamp": 3}, "stamp: got int"),
    ],
)
def test_detections_validation_messages(kwargs: dict, message: str) -> None:
    base = dict(
        boxes=np.zeros((2, 4)), scores=np.zeros(2), class_ids=np.zeros(2, np.int64), labels=["a", "b"], stamp=None
    )
    base.update(kwargs)
    with pytest.raises(ValueError) as e:
        Detections(**base)
    assert message in str(e.value)


def test_detections_to_dict_is_json_safe_and_rounded() -> None:
    d = dets(stamp=FrameStamp(3, 12.5, 1700000000.25))
    out = d.to_dict()
    json.dumps(out)
    assert out["frame"] == 3 and out["t_wall"] == 1700000000.25
    assert out["detections"][0] == {"box": [10.0, 10.0, 50.0, 60.0], "score": 0.8765, "class_id": 0, "label": "person"}
    assert out["detections"][1]["box"][0] == 60.12
    assert "frame" not in dets().to_dict()


def test_embedding_validation() -> None:
    e = Embedding(np.array([0.6, 0.8]))
    assert len(e) == 2 and e.vector.dtype == np.float32
    json.dumps(e.to_dict())
    with pytest.raises(ValueError, match=r"got shape \(1, 2\), expected \(D,\)"):
        Embedding(np.zeros((1, 2)))


def test_draw_detections_copies_and_marks() -> None:
    img = np.zeros((100, 120, 3), np.uint8)
    out = draw_detections(img, dets())
    assert out.shape == img.shape and out is not img
    assert not img.any()  # the input is untouched
    assert (out[35, 10] == class_color(0)).all()  # the left edge of box 0
    assert out[5:10, 10:40].any()  # its tag, above the box
    assert class_color(2) == class_color(22) and class_color(0) != class_color(1)
    assert np.array_equal(draw_detections(img, Detections.empty()), img)
