"""Parity of every KDEOV part against PyTorch, tiny and real size, on the shared photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("torch")

from vlexport.errors import ExportError  # noqa: E402
from vlexport.export.kdeov import KDEOVExportOptions, build_plan, export_kdeov  # noqa: E402
from vlexport.export.part import OutputTolerance  # noqa: E402
from vlexport.export.bundle_export import write_bundle  # noqa: E402
from vlexport.runtime import load  # noqa: E402


def _parity(bundle):
    return json.loads((bundle / "manifest.json").read_text())["validation"]["parity"]


def _check_all_parts(parity, parts):
    assert {k.split("/")[0] for k in parity} == set(parts)
    det = parity["detector/fp32"]
    assert det["scores"]["max_abs"] < 1e-4
    assert det["boxes"]["max_abs"] < 1e-2
    assert det["class_ids"]["agreement"] >= 0.99
    assert parity["image_encoder/fp32"]["embeddings"]["max_abs"] < 1e-4
    assert parity["image_encoder/fp16"]["embeddings"]["cosine"] >= 0.999
    if "text_encoder" in parts:
        assert parity["text_encoder/fp32"]["embeddings"]["max_abs"] < 1e-4
        assert parity["text_encoder/fp16"]["embeddings"]["cosine"] >= 0.999


def test_tiny_all_parts_dynamic_batch_on_shared_photos(tmp_path, assets):
    out = tmp_path / "b"
    export_kdeov(KDEOVExportOptions(out=out, preset="tiny", classes=["person", "bus", "tie"], templates="single",
                                    fp16=True, with_text_encoder=True, dynamic_batch=True,
                                    parity_source=str(assets / "images"), parity_count=6))
    _check_all_parts(_parity(out), ["detector", "image_encoder", "text_encoder"])
    # The runtime gives the same embeddings as the graph run through its own backend.
    emb = load(out, task="embed", precision="fp32").embed(np.full((240, 320, 3), 90, np.uint8))
    assert emb.vector.shape == (64,) and abs(np.linalg.norm(emb.vector) - 1) < 1e-4


def test_vocab_mode_input_swaps_vocabulary_without_reexport(tmp_path, assets):
    import cv2

    out = tmp_path / "b"
    export_kdeov(KDEOVExportOptions(out=out, preset="tiny", classes=["person", "bus"], templates="single",
                                    vocab_mode="input"))
    task = load(out, score_threshold=0.0)
    img = cv2.imread(str(assets / "images" / "bus.jpg"))
    before = task.detect(img)
    assert set(before.labels) <= {"person", "bus"}
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    task.set_vocabulary(["a", "b", "c"], emb)
    after = task.detect(img)
    assert set(after.labels) <= {"a", "b", "c"} and len(after) > 0


def test_parity_failure_leaves_no_bundle(tmp_path):
    opts = KDEOVExportOptions(out=tmp_path / "b", preset="tiny", classes=["a", "b"], templates="single")
    plan = build_plan(opts)
    # A stricter-than-float tolerance no real export can meet: the check must fail loudly.
    plan.parts[0].tolerances["fp32"]["boxes"] = OutputTolerance(max_abs=0.0)
    # Eager PyTorch drifts from what was traced: the export cannot match it.
    plan.parts[0].module.model.backbone.register_forward_hook(
        lambda m, i, o: o if torch.jit.is_tracing() else [t + 1e-3 for t in o])
    with pytest.raises(ExportError, match="does not match PyTorch"):
        write_bundle(plan, opts.out)
    assert list(tmp_path.iterdir()) == []


def test_text_embedding_cache_makes_the_second_export_encode_nothing(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="vlexport")
    for i in range(2):
        export_kdeov(KDEOVExportOptions(out=tmp_path / f"b{i}", preset="tiny", classes=["zebra", "kite"],
                                        templates="imagenet80"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("text embeddings:")]
    assert lines[-1] == "text embeddings: 2 from cache, 0 encoded"


@pytest.mark.slow
def test_real_size_yolov8n_vitb32_all_parts(tmp_path, assets):
    """YOLOv8n (real COCO weights, its own box head) + ViT-B-32 text tower, at 640, FP32 and FP16."""
    out = tmp_path / "real"
    report = export_kdeov(KDEOVExportOptions(
        out=out, preset="yolov8n-vitb32", backbone_weights=assets / "weights" / "yolov8n_coco.pt",
        trust_checkpoint=True, classes=["person", "bus", "car", "tie", "dog"], templates="single",
        fp16=True, with_text_encoder=True, parity_source=str(assets / "images"), parity_count=6))
    _check_all_parts(report.parity, ["detector", "image_encoder", "text_encoder"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["parts"]["detector"]["inputs"][0]["shape"] == [1, 3, 640, 640]
    assert m["parts"]["detector"]["outputs"][0]["shape"] == [1, "anchors", 4]
    assert m["provenance"]["backbone_weights_sha256"]
    # Boxes come from the real COCO box head: on bus.jpg the top boxes overlap real objects.
    import cv2

    det = load(out, precision="fp32", score_threshold=0.0).detect(cv2.imread(str(assets / "images" / "bus.jpg")))
    area = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
    assert len(det) > 0 and (area >= 0).all() and (area > 0).mean() > 0.5


def test_kdeov_int8_with_unlabelled_val_calibrates_but_skips_the_gate(tmp_path, assets, caplog):
    import logging

    from vlexport.export.bundle_export import PrecisionOptions

    caplog.set_level(logging.WARNING, logger="vlexport")
    out = tmp_path / "b"
    images = str(assets / "images")
    export_kdeov(KDEOVExportOptions(out=out, preset="tiny", classes=["person", "bus"], templates="single",
                                    parity_source=images,
                                    precision=PrecisionOptions(int8=True, calib=images, calib_size=3, val=images)))
    m = json.loads((out / "manifest.json").read_text())
    assert m["parts"]["detector"]["files"]["int8"] == "detector.int8.onnx"
    assert "int8" not in m["parts"]["image_encoder"]["files"]  # only the detector is an INT8 candidate
    assert m["calibration"]["count"] == 3 and "metrics" not in m["validation"]
    assert any("accuracy gate is skipped" in r.getMessage() for r in caplog.records)
    det = load(out, precision="int8", score_threshold=0.0).detect(np.full((200, 300, 3), 80, np.uint8))
    assert len(det) > 0
