"""mIoU machinery and the segmentation dataset loaders (shared COCO128 masks, VOC targets)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from vlexport.data.segmentation import (
    VOC_CLASSES,
    SegmentationDataset,
    load_segmentation_dataset,
    read_mask,
    voc_palette,
)
from vlexport.evaluation.segmentation import ConfusionMatrix, evaluate_segmenter
from vlexport.errors import SourceError, UsageError
from vlexport.runtime.segmentation import Segmentation

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", "/work/shared/assets"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (set VLEXPORT_ASSETS to the shared assets folder)")
    return path


def test_perfect_prediction() -> None:
    gt = np.array([[0, 1, 2], [2, 1, 0]])
    cm = ConfusionMatrix(3)
    cm.update(gt.copy(), gt)
    assert cm.miou() == 1.0 and cm.pixel_accuracy() == 1.0


def test_known_two_class_confusion() -> None:
    gt = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    pr = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    cm = ConfusionMatrix(2)
    cm.update(pr, gt)
    # class 0: tp 2, fp 2, fn 1 -> 2/5; class 1: tp 3, fp 1, fn 2 -> 3/6
    np.testing.assert_allclose(cm.per_class_iou(), [0.4, 0.5])
    assert cm.miou() == pytest.approx(0.45)
    assert cm.pixel_accuracy() == pytest.approx(5 / 8)


def test_known_three_class_confusion_with_absent_class_and_ignore() -> None:
    gt = np.array([[0, 0, 1, 1], [1, 255, 255, 0]])
    pr = np.array([[0, 1, 1, 1], [0, 2, 0, 0]])  # the ignored pixels predict 2 and 0: not counted
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pr, gt)
    # scored: (0,0) (0,1) (1,1) (1,1) (1,0) (0,0)
    # class 0: tp 2, fp 1 (gt 1 -> 0), fn 1 (gt 0 -> 1): 2/4; class 1: tp 2, fp 1, fn 1: 2/4
    iou = cm.per_class_iou()
    np.testing.assert_allclose(iou[:2], [0.5, 0.5])
    assert math.isnan(iou[2]) and math.isnan(iou[3])  # absent from both (ignored pixels do not count)
    assert cm.miou() == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)
    assert cm.total == 6


def test_prediction_outside_classes_is_a_false_negative_only() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 7, 1]), np.array([0, 0, 1]))
    np.testing.assert_allclose(cm.per_class_iou(), [0.5, 1.0])


def test_confusion_matrix_rejects_bad_input() -> None:
    with pytest.raises(UsageError):
        ConfusionMatrix(0)
    cm = ConfusionMatrix(2)
    with pytest.raises(UsageError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(UsageError, match="integer"):
        cm.update(np.zeros(3, np.float32), np.zeros(3, int))
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())


def test_voc_palette_first_colours() -> None:
    pal = voc_palette(21)
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]


def test_load_coco128_id_masks() -> None:
    root = _need(ASSETS / "coco128" / "semantic.yaml").parent
    ds = load_segmentation_dataset(root)
    assert ds.kind == "ids" and len(ds) == 100
    assert ds.names[0] == "person" and "unlabeled" not in ds.names
    img, mask = ds.items[0]
    assert img.parent.name == "train2017" and img.stem == mask.stem and img.is_file()
    m = ds.read_mask(0)
    assert m.ndim == 2 and m.dtype == np.int64
    present = set(np.unique(m).tolist())
    assert ds.ignore_index in present  # COCO id 0 (unlabeled) -> ignore
    labels = {ds.names[i] for i in present if i != ds.ignore_index}
    assert labels and labels <= set(ds.names)
    # 000000000009: a bowl of oranges and broccoli on a table
    if mask.stem == "000000000009":
        assert {"bowl", "orange", "broccoli"} <= labels
    # the yaml file and the masks folder load the same dataset
    assert len(load_segmentation_dataset(root / "semantic.yaml")) == 100
    assert len(load_segmentation_dataset(root / "masks" / "train2017")) == 100


def test_load_voc_targets() -> None:
    root = _need(ASSETS / "voc")
    ds = load_segmentation_dataset(root)
    assert ds.kind == "voc" and ds.names == list(VOC_CLASSES) and len(ds) == 7
    seen_ignore = False
    for i in range(len(ds)):
        m = read_mask(ds.items[i][1], ds)
        assert m.shape == (513, 513)
        vals = set(np.unique(m).tolist())
        assert vals <= set(range(21)) | {255}
        assert vals - {0, 255}  # an object class is present
        seen_ignore |= 255 in vals
    assert seen_ignore


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        load_segmentation_dataset(tmp_path / "nope")
    with pytest.raises(SourceError, match="not a segmentation dataset"):
        load_segmentation_dataset(tmp_path)
    with pytest.raises(UsageError, match="collides"):
        SegmentationDataset([], ["a", "b"], ignore_index=1, kind="voc")


class _FakeTask:
    """Predicts the ground truth itself, in its own class order, plus one class the dataset lacks."""

    def __init__(self, ds: SegmentationDataset, wrong_box: bool = False):
        self.ds = ds
        self.classes = ["dragon"] + list(reversed(ds.names))
        self.wrong_box = wrong_box
        self.i = 0

    def segment(self, bgr: np.ndarray) -> Segmentation:
        gt = self.ds.read_mask(self.i)
        self.i += 1
        n = len(self.ds.names)
        pred = np.where(gt == self.ds.ignore_index, 0, n - gt)  # dataset index k -> our index n - k
        if self.wrong_box:
            pred[:10, :10] = 0  # "dragon": not a dataset class
        return Segmentation(pred, self.classes)


def test_evaluate_segmenter_maps_by_name() -> None:
    ds = load_segmentation_dataset(_need(ASSETS / "voc"))
    m = evaluate_segmenter(_FakeTask(ds), ds, progress=False, max_images=3)
    assert m.images == 3 and m.miou == pytest.approx(1.0) and m.pixel_accuracy == pytest.approx(1.0)
    assert set(m.per_class_iou) == set(VOC_CLASSES)
    m2 = evaluate_segmenter(_FakeTask(ds, wrong_box=True), ds, progress=False, max_images=3)
    assert m2.miou < 1.0 and m2.pixel_accuracy < 1.0
    d = m2.to_dict()
    assert 0 < d["miou"] < 1 and d["images"] == 3
