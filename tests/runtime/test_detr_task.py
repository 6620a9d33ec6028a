"""DetrTask: DETR bundles run without torch, on images, batches and video; masks in source pixels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from vlexport.errors import BundleError, UsageError
from vlexport.runtime import Detections, load
from vlexport.runtime.draw import class_color, draw_detections
from vlexport.runtime.tasks.detr import _masks_to_source

SIZE, MAX_SIZE = 128, 200


@pytest.fixture(scope="module")
def segm_bundle(tmp_path_factory) -> Path:
    """A tiny DETR with the mask head (random weights), FP32, exported once for this module."""
    pytest.importorskip("torch")
    from vlexport.export.detr import DETRExportOptions, export_detr

    out = tmp_path_factory.mktemp("detr") / "segm"
    return export_detr(DETRExportOptions(out=out, preset="tiny-segm", size=SIZE, max_size=MAX_SIZE,
                                         score_threshold=0.0)).path


def test_masks_to_source_hand_solved():
    # A 2x2 checkerboard of probabilities; bilinear (half-pixel) on the logits to 8x8 changes sign exactly
    # between pixels 3 and 4, then nearest-neighbour to 4x4 keeps 2x2 blocks.
    probs = np.array([[[0.9, 0.1], [0.1, 0.9]]], np.float32)
    got = _masks_to_source(probs, resized=(8, 8), source=(4, 4), threshold=0.5)
    assert got.dtype == bool and got.shape == (1, 4, 4)
    np.testing.assert_array_equal(got[0], np.kron(np.eye(2), np.ones((2, 2))).astype(bool))
    # Probabilities rounded to exactly 0 or 1 in float32 stay usable; no detections, no masks.
    assert _masks_to_source(np.array([[[1.0, 0.0]]], np.float32), (2, 1), (2, 1), 0.5).tolist() == [[[True, False]]]
    assert _masks_to_source(np.zeros((0, 3, 3), np.float32), (12, 12), (20, 10), 0.5).shape == (0, 10, 20)


def test_detect_gives_masks_in_each_frame_size(segm_bundle):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (240, 320, 3), np.uint8), rng.integers(0, 255, (300, 100, 3), np.uint8)]
    with load(segm_bundle, precision="fp32") as task:
        assert type(task).__name__ == "DetrTask" and task.has_masks and task.score_threshold == 0.0
        dets = task.detect_batch(frames)
        assert set(task.timings) == {"preprocess", "infer", "postprocess"}
        single = task.detect(frames[1])
    for frame, det in zip(frames, dets):
        assert len(det) == 10 and det.masks.shape == (10, *frame.shape[:2])
        assert (np.diff(det.scores) <= 0).all()  # best first
        assert all(r["mask_area"] == int(m.sum()) for r, m in zip(det.records(), det.masks))
    np.testing.assert_array_equal(single.boxes, dets[1].boxes)


def test_score_threshold_and_max_detections(segm_bundle):
    frame = np.full((120, 160, 3), 90, np.uint8)
    with load(segm_bundle, precision="fp32") as task:
        scores = task.detect(frame).scores
    thr = float((scores[2] + scores[3]) / 2)
    with load(segm_bundle, precision="fp32", score_threshold=thr) as task:
        assert len(task.detect(frame)) == 3
    with load(segm_bundle, precision="fp32", max_detections=2) as task:
        np.testing.assert_array_equal(task.detect(frame).scores, scores[:2])


@pytest.mark.parametrize("overrides, needle", [
    ({"iou_threshold": 0.5}, "no NMS"),
    ({"class_agnostic": True}, "class_agnostic"),
    ({"score_threshold": 1.5}, "score_threshold"),
    ({"mask_threshold": -0.1}, "mask_threshold"),
    ({"max_detections": 0}, "max_detections"),
])
def test_bad_options(segm_bundle, overrides, needle):
    with pytest.raises(UsageError, match=needle):
        load(segm_bundle, **overrides)


def test_refuses_a_manifest_with_other_normalisation(segm_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(segm_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["preprocess"]["mean"] = [0.5, 0.5, 0.5]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="mean"):
        load(copy)


def test_run_on_source_video_and_folder(segm_bundle, assets, tmp_path):
    from vlexport.runtime.run import run_on_source

    with load(segm_bundle, precision="fp32", score_threshold=0.0, max_detections=3) as task:
        stats = run_on_source(task, assets / "video" / "car-detection.mp4", save=tmp_path / "o.mp4",
                              jsonl=tmp_path / "o.jsonl", max_frames=5, progress=False)
        assert stats.frames == 5
        folder = tmp_path / "imgs"
        folder.mkdir()
        for name in ("bus.jpg", "zidane.jpg"):
            shutil.copy(assets / "images" / name, folder)
        run_on_source(task, folder, jsonl=tmp_path / "f.jsonl", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in recs] == list(range(5))
    assert all(len(r["detections"]) == 3 and "mask_area" in r["detections"][0] for r in recs)
    cap = cv2.VideoCapture(str(tmp_path / "o.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    cap.release()
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 2


def test_runs_without_torch(segm_bundle, assets):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import cv2
        import vlexport.runtime as vr
        from vlexport.runtime.draw import draw_detections
        frame = cv2.imread({str(assets / "images" / "bus.jpg")!r})
        task = vr.load({str(segm_bundle)!r}, precision="fp32")
        det = task.detect(frame)
        assert det.masks.shape == (len(det), *frame.shape[:2]), det.masks.shape
        draw_detections(frame, det)
        assert not [m for m in sys.modules if m.startswith("torch.")]
        print("ok", len(det))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok 10")


def test_detections_validate_masks():
    boxes, scores, ids = np.zeros((2, 4)), np.ones(2), np.array([1, 2])
    with pytest.raises(ValueError, match="expected bool"):
        Detections(boxes, scores, ids, ["a", "b"], masks=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"expected \(2, H, W\)"):
        Detections(boxes, scores, ids, ["a", "b"], masks=np.zeros((3, 4, 4), bool))
    masks = np.zeros((2, 4, 4), bool)
    masks[1, :2, :3] = True
    assert [r["mask_area"] for r in Detections(boxes, scores, ids, ["a", "b"], masks=masks).records()] == [0, 6]
    assert "mask_area" not in Detections(boxes, scores, ids, ["a", "b"]).records()[0]


def test_draw_tints_masked_pixels_only():
    img = np.full((60, 60, 3), 100, np.uint8)
    masks = np.zeros((1, 60, 60), bool)
    masks[0, 40:50, 40:50] = True
    det = Detections(np.array([[2, 2, 8, 8]]), np.array([0.9]), np.array([3]), ["cat"], masks=masks)
    out = draw_detections(img, det)
    expected = (100 * 0.55 + np.asarray(class_color(3), np.float64) * 0.45).astype(np.uint8)
    assert (out[40:50, 40:50] == expected).all()
    assert (out[52:, 52:] == 100).all()
    with pytest.raises(UsageError, match="masks are 60x60"):
        draw_detections(np.zeros((30, 60, 3), np.uint8), det)
