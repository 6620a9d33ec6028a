"""`vlexport multiscale`: both fusions exported with parity, a trained checkpoint end to end, INT8, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vlexport.cli import cli
from vlexport.errors import CheckpointError, UsageError
from vlexport.export.multiscale import (
    MultiScaleExportOptions,
    export_multiscale,
    fp32_rounding_error,
    multiscale_preprocess,
)
from vlexport.export.bundle_export import PrecisionOptions
from vlexport.models.multiscale.loss import binary_segmentation_loss
from vlexport.models.multiscale.model import build_multiscale
from vlexport.runtime import load
from vlexport.runtime.preprocess import Preprocessor, letterbox_params

SIZE = 128
PERSON = 1  # COCO panoptic category id
PERSON_IMAGES = ("000000000036", "000000000389")  # COCO128 images whose masks hold people


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("fusion", ["absi", "hierarchical"])
def test_both_fusions_export_fp32_and_fp16_with_parity(fusion, tmp_path, assets):
    out = tmp_path / fusion
    report = export_multiscale(MultiScaleExportOptions(
        out=out, preset="tiny", fusion=fusion, imgsz=SIZE, parity_source=str(assets / "images"), parity_count=3,
        precision=PrecisionOptions(fp16=True)))
    fp32, fp16 = report.parity["segmenter/fp32"]["logits"], report.parity["segmenter/fp16"]["logits"]
    assert fp32["max_abs"] < 1e-4 and fp32["finite"]
    assert fp16["finite"] and fp16["cosine"] >= 0.999  # no NaN/Inf in FP16 on real pictures
    assert sorted(report.files) == ["manifest.json", "segmenter.fp16.onnx", "segmenter.onnx"]

    m = json.loads((out / "manifest.json").read_text())
    assert (m["family"], m["task"], m["preset"]) == ("multiscale", "segment", "tiny")
    assert m["segment"]["threshold"] == 0.5 and m["segment"]["classes"] == ["background", "object"]
    assert m["segment"]["fusion"] == fusion and m["segment"]["scales"] == [0.5, 1.0, 1.5]
    assert m["preprocess"]["resize"] == "letterbox" and m["preprocess"]["size"] == [SIZE, SIZE]
    assert m["parts"]["segmenter"]["inputs"][0]["shape"] == [1, 3, SIZE, SIZE]
    assert m["parts"]["segmenter"]["outputs"][0]["shape"] == [1, 1, SIZE, SIZE]
    assert m["validation"]["parity_images"]["count"] == 3
    assert any("UNTRAINED" in w for w in m["warnings"])
    # A tiny ResNet-18 is far below the float32 noise floor: the tolerance stays 1e-4.
    assert m["model"]["fp32_parity"]["max_abs_tolerance"] == 1e-4
    assert m["model"]["fp32_parity"]["torch_fp32_vs_fp64_max_abs"] < 1e-5

    import onnx

    graph = onnx.load(str(out / "segmenter.onnx")).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    # One graph with every scale: the 0.5x and 1.5x input resizes are in it.
    assert sum(n.op_type == "Resize" for n in graph.node) >= 2 + 2 * 4
    # The three scales share one copy of the backbone's weights (BatchNorm folded before export).
    weights = sum(onnx.numpy_helper.to_array(t).size for t in graph.initializer)
    assert weights <= 1.01 * m["model"]["parameters"], (weights, m["model"]["parameters"])
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)


def test_fp32_rounding_error_by_hand():
    class Cancel(torch.nn.Module):  # (x + 1e8) - 1e8: 0 in float32 for |x| < 4, x in float64
        def __init__(self):
            super().__init__()
            self.register_buffer("big", torch.tensor(1e8))

        def forward(self, x):
            return (x + self.big) - self.big

    images = torch.zeros(2, 3, 4, 4)
    images[1, 0, 0, 0] = 0.25
    images[0, 2, 1, 1] = -1.5
    assert fp32_rounding_error(Cancel(), images) == 1.5


def _person_data(assets: Path, pre: Preprocessor):
    """Images pre-processed as the runtime does, and person masks letterboxed the same way."""
    frames, truths, tensors, targets = [], [], [], []
    for image_id in PERSON_IMAGES:
        bgr = cv2.imread(str(assets / f"coco128/images/train2017/{image_id}.jpg"), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(assets / f"coco128/masks/train2017/{image_id}.png"), cv2.IMREAD_UNCHANGED)
        truth = mask == PERSON
        x, info = pre(bgr)
        target = np.zeros(pre.size, np.float32)
        w, h = info.resized
        target[info.pad_y:info.pad_y + h, info.pad_x:info.pad_x + w] = cv2.resize(
            truth.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        frames.append(bgr), truths.append(truth), tensors.append(torch.from_numpy(x)), targets.append(target)
    return frames, truths, torch.cat(tensors), torch.from_numpy(np.stack(targets))[:, None]


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred & truth).sum() / (pred | truth).sum())


def _torch_mask(model, pre: Preprocessor, bgr: np.ndarray) -> np.ndarray:
    x, _ = pre(bgr)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))[0, 0].numpy()
    info, (top, _, left, _) = letterbox_params(bgr.shape[:2], pre.size)
    w, h = info.resized
    back = cv2.resize(np.ascontiguousarray(logits[top:top + h, left:left + w]), (bgr.shape[1], bgr.shape[0]),
                      interpolation=cv2.INTER_LINEAR)
    return torch.sigmoid(torch.from_numpy(back)).numpy() > 0.5


def test_trained_checkpoint_exports_and_segments_like_pytorch(tmp_path, assets):
    pre = Preprocessor(multiscale_preprocess(SIZE))
    frames, truths, images, targets = _person_data(assets, pre)
    torch.manual_seed(0)
    model = build_multiscale("tiny", "absi", image_size=SIZE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(12):
        loss = binary_segmentation_loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ckpt = tmp_path / "person.pt"
    torch.save(model.state_dict(), ckpt)

    out = tmp_path / "bundle"
    r = invoke("multiscale", "--preset", "tiny", "--imgsz", SIZE, "--checkpoint", ckpt, "--class-name", "person",
               "--out", out, "--val", assets / "images")
    assert r.exit_code == 0, r.output
    assert "parity segmenter/fp32" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["warnings"] == [] and m["provenance"]["weights_source"] == f"file:{ckpt.resolve()}"
    assert m["provenance"]["checkpoint_sha256"]
    assert m["vocabulary"]["classes"] == ["background", "person"]

    with load(out, precision="fp32", threads=1) as task:
        for bgr, truth in zip(frames, truths):
            ours = task.segment(bgr).mask("person")
            ref = _torch_mask(model, pre, bgr)
            iou_ours, iou_torch = _iou(ours, truth), _iou(ref, truth)
            assert abs(iou_ours - iou_torch) <= 0.01, (iou_ours, iou_torch)
            assert iou_torch > 0.3, iou_torch  # the few steps did learn the people


def test_int8_calibrates_and_runs(tmp_path, assets):
    out = tmp_path / "int8"
    report = export_multiscale(MultiScaleExportOptions(
        out=out, preset="tiny", fusion="hierarchical", imgsz=64, parity_count=1,
        precision=PrecisionOptions(int8=True, calib=str(assets / "images"), calib_size=2, calib_method="minmax")))
    assert "segmenter.int8.onnx" in report.files and report.parity["segmenter/int8"]["logits"]["finite"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"]["count"] == 2
    bgr = cv2.imread(str(assets / "images" / "bus.jpg"))
    with load(out, precision="int8", threads=1) as task:
        assert task.precision == "int8" and task.segment(bgr).shape == bgr.shape[:2]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    torch.manual_seed(0)
    wrong = build_multiscale("tiny", "hierarchical", image_size=SIZE)  # other fusion: other keys
    state = build_multiscale("tiny", "absi", image_size=SIZE).state_dict()
    state["head.weight"] = torch.zeros(1, 7, 1, 1)
    for i, sd in enumerate((wrong.state_dict(), state)):
        ckpt = tmp_path / f"wrong{i}.pt"
        torch.save(sd, ckpt)
        out = tmp_path / f"out{i}"
        r = CliRunner().invoke(cli, ["multiscale", "--preset", "tiny", "--imgsz", str(SIZE), "--checkpoint", str(ckpt),
                                     "--out", str(out)])
        assert r.exit_code == 1, r.output
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "does not match the model" in errors[0] and "Traceback" not in r.output
        assert not out.exists() and not any(p.name.startswith(f"out{i}") for p in tmp_path.iterdir())
    assert "shape mismatch" in errors[0] and "head.weight" in errors[0]

    r = CliRunner().invoke(cli, ["multiscale", "--preset", "tiny", "--imgsz", "100", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "multiple of 32" in r.output and not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="multiple of 32"):
        export_multiscale(MultiScaleExportOptions(out=tmp_path / "y", preset="tiny", imgsz=100))
    with pytest.raises(UsageError, match="threshold"):
        export_multiscale(MultiScaleExportOptions(out=tmp_path / "y", preset="tiny", threshold=1.0))
    with pytest.raises(UsageError, match="unknown multiscale preset"):
        export_multiscale(MultiScaleExportOptions(out=tmp_path / "y", preset="huge"))
    with pytest.raises(UsageError, match="one of them"):
        export_multiscale(MultiScaleExportOptions(out=tmp_path / "y", preset="tiny", checkpoint=ckpt,
                                                  backbone_weights=ckpt))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        export_multiscale(MultiScaleExportOptions(out=tmp_path / "y", preset="tiny", imgsz=SIZE,
                                                  checkpoint=tmp_path / "junk.pt"))
    assert not (tmp_path / "y").exists()
