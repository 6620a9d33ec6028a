"""The `yolo` family on the real COCO-trained YOLOv8n: parity with Ultralytics, same detections."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("ultralytics")

from vlexport.cli import cli  # noqa: E402
from vlexport.runtime import load  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def yolo_bundle(tmp_path_factory, assets):
    out = tmp_path_factory.mktemp("yolo") / "b"
    r = invoke("yolo", "--checkpoint", assets / "weights" / "yolov8n_coco.pt", "--trust-checkpoint", "--fp16",
               "--out", out, "--val", assets / "images")
    assert r.exit_code == 0, r.output
    return out


def _iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_manifest_names_and_parity_against_ultralytics(yolo_bundle):
    m = json.loads((yolo_bundle / "manifest.json").read_text())
    assert m["family"] == "yolo" and m["preset"] == "yolov8n"
    assert m["vocabulary"]["classes"][:3] == ["person", "bicycle", "car"] and len(m["vocabulary"]["classes"]) == 80
    p = m["validation"]["parity"]
    assert p["detector/fp32"]["scores"]["max_abs"] < 1e-4
    assert p["detector/fp32"]["boxes"]["max_abs"] < 1e-2
    assert p["detector/fp16"]["scores"]["cosine"] > 0.999


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_runtime_detections_match_ultralytics(yolo_bundle, assets, precision):
    """Same tensor in: the runtime's numpy NMS and box scaling give Ultralytics' own detections."""
    import torch
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    img = cv2.imread(str(assets / "images" / "bus.jpg"))
    task = load(yolo_bundle, precision=precision, score_threshold=0.25, iou_threshold=0.7)
    ours = task.detect(img)
    x, _ = task.preprocessor(img)
    model = YOLO(str(assets / "weights" / "yolov8n_coco.pt")).model.float().eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x))
    det = non_max_suppression(pred[0] if isinstance(pred, (list, tuple)) else pred, conf_thres=0.25, iou_thres=0.7)[0]
    ref_boxes = scale_boxes(x.shape[2:], det[:, :4].clone(), img.shape[:2]).numpy()
    ref_cls = det[:, 5].numpy().astype(int)
    assert len(ours) == len(ref_boxes) >= 4  # bus.jpg: a bus and several people
    iou = _iou(ours.boxes, ref_boxes)
    assert (iou.max(1) > 0.95).all()
    assert (ours.class_ids == ref_cls[iou.argmax(1)]).all()
    assert "bus" in ours.labels and "person" in ours.labels


def test_untrusted_checkpoint_is_refused_with_the_flag_to_pass(tmp_path, assets):
    r = invoke("yolo", "--checkpoint", assets / "weights" / "yolov8n_coco.pt", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "--trust-checkpoint" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_state_dict_checkpoint_needs_no_trust(tmp_path, assets):
    out = tmp_path / "b"
    r = invoke("yolo", "--checkpoint", assets / "weights" / "yolov8n_coco_state_dict.pt", "--out", out, "--imgsz", "320")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["parts"]["detector"]["inputs"][0]["shape"] == [1, 3, 320, 320]


@pytest.mark.parametrize("args, needle", [
    (["--int8"], "--calib"),
    (["--int8", "--calib", "{images}", "--max-drop", "-1"], "--max-drop"),
    (["--imgsz", "100"], "multiple of 32"),
])
def test_bad_precision_arguments(tmp_path, assets, args, needle):
    args = [a.format(images=assets / "images") for a in args]
    r = invoke("yolo", "--checkpoint", assets / "weights" / "yolov8n_coco.pt", "--trust-checkpoint",
               "--out", tmp_path / "b", *args)
    assert r.exit_code == 1, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_validate_refuses_a_bundle_without_fp32(tmp_path, yolo_bundle, assets):
    copy = tmp_path / "copy"
    shutil.copytree(yolo_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    del m["parts"]["detector"]["files"]["fp32"]
    del m["files"]["detector.onnx"]
    (copy / "detector.onnx").unlink()
    (copy / "manifest.json").write_text(json.dumps(m))
    r = invoke("validate", copy, "--data", assets / "coco128" / "data.yaml")
    assert r.exit_code == 1 and "no FP32" in r.output and "Traceback" not in r.output


def test_validate_measures_every_precision_on_coco128(yolo_bundle, assets, tmp_path):
    out = tmp_path / "metrics.json"
    r = invoke("validate", yolo_bundle, "--data", assets / "coco128" / "data.yaml", "--json", out)
    assert r.exit_code == 0, r.output
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"fp32", "fp16"}
    # The real COCO-trained YOLOv8n: Ultralytics' own validator gives ~0.42 mAP50-95 on COCO128.
    assert 0.35 < metrics["fp32"]["map50_95"] < 0.55
    assert abs(metrics["fp16"]["map50_95"] - metrics["fp32"]["map50_95"]) < 0.005
