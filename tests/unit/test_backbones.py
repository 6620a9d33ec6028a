"""LightweightVisualBackbone: feature maps, the YOLO box decoder against Ultralytics, checkpoint loading."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.common.backbones import LightweightVisualBackbone, load_checkpoint_file

pytest.importorskip("ultralytics")

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", "/work/shared/assets"))
PT = ASSETS / "weights" / "yolov8n_coco.pt"
STATE_DICT = ASSETS / "weights" / "yolov8n_coco_state_dict.pt"
BUS = ASSETS / "images" / "bus.jpg"


def _need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"shared assets missing (set VLEXPORT_ASSETS): {', '.join(missing)}")


def _ultralytics_xyxy(backbone: LightweightVisualBackbone, x: torch.Tensor) -> torch.Tensor:
    """Ultralytics' own Detect output boxes (xywh, input pixels) converted to xyxy, [B, N, 4]."""
    y, _ = backbone.net(x)
    xywh = y[:, :4].transpose(1, 2)
    return torch.cat((xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2), -1)


def _bus_tensor(size: int = 640) -> torch.Tensor:
    from vlexport.runtime.preprocess import letterbox

    img, _ = letterbox(cv2.imread(str(BUS)), (size, size))
    rgb = np.ascontiguousarray(img[..., ::-1])
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0


def test_simple_feature_shapes_and_strides():
    bb = LightweightVisualBackbone("simple").eval()
    feats = bb(torch.rand(2, 3, 128, 96))
    assert bb.strides == [8, 16, 32]
    assert [f.shape[1] for f in feats] == bb.out_channels
    assert [tuple(f.shape[2:]) for f in feats] == [(16, 12), (8, 6), (4, 3)]
    assert bb.has_box_head is False and bb.num_source_classes == 0 and bb.source_names is None
    with pytest.raises(UsageError, match="no YOLO Detect head"):
        bb.box_regression(feats)


@pytest.mark.parametrize("name", ["yolov8n", "yolov5s"])
def test_ultralytics_feature_shapes_match_detect_inputs(name):
    bb = LightweightVisualBackbone(name).eval()
    x = torch.rand(1, 3, 128, 160)
    feats = bb(x)
    assert bb.strides == [8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 128 // s, 160 // s) for c, s in zip(bb.out_channels, bb.strides)
    ]
    assert bb.has_box_head and bb.num_source_classes == 80 and bb.source_names is None
    # The maps are exactly what Ultralytics feeds its Detect head.
    _, preds = bb.net(x)
    for ours, theirs in zip(feats, preds["feats"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_box_regression_matches_ultralytics_random_weights():
    torch.manual_seed(0)
    bb = LightweightVisualBackbone("yolov8n").eval()
    x = torch.rand(2, 3, 256, 192)
    with torch.no_grad():
        boxes = bb.box_regression(bb(x))
        ref = _ultralytics_xyxy(bb, x)
    assert boxes.shape == (2, 32 * 24 + 16 * 12 + 8 * 6, 4)
    assert (boxes - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("fmt", ["ultralytics_pt", "state_dict"])
def test_box_regression_matches_ultralytics_on_bus_with_coco_weights(fmt):
    ckpt = PT if fmt == "ultralytics_pt" else STATE_DICT
    _need(ckpt, BUS)
    bb = LightweightVisualBackbone("yolov8n", checkpoint=ckpt, trust_checkpoint=fmt == "ultralytics_pt").eval()
    assert bb.is_fused()
    assert bb.num_source_classes == 80 and bb.source_names[0] == "person" and bb.source_names[5] == "bus"
    x = _bus_tensor()
    with torch.no_grad():
        boxes = bb.box_regression(bb(x))
        y, _ = bb.net(x)
        ref = _ultralytics_xyxy(bb, x)
    assert boxes.shape == (1, 8400, 4)
    assert (boxes - ref).abs().max().item() < 1e-3
    # The real weights localise the bus: its best-scoring box is large.
    best = y[0, 4 + 5].argmax()
    assert y[0, 4 + 5, best] > 0.5
    x1, y1, x2, y2 = boxes[0, best].tolist()
    assert (x2 - x1) > 300 and (y2 - y1) > 200


def test_ultralytics_checkpoint_needs_trust():
    _need(PT)
    with pytest.raises(CheckpointError, match="Ultralytics checkpoint.*--trust-checkpoint") as info:
        LightweightVisualBackbone("yolov8n", checkpoint=PT)
    assert str(PT) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_corrupt_checkpoints(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="not found") as info:
        LightweightVisualBackbone("yolov8n", checkpoint=missing)
    assert str(missing) in str(info.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch file") as info:
        LightweightVisualBackbone("yolov8n", checkpoint=garbage)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)

    if STATE_DICT.is_file():  # a truncated real checkpoint
        truncated = tmp_path / "truncated.pt"
        truncated.write_bytes(STATE_DICT.read_bytes()[:50_000])
        with pytest.raises(CheckpointError, match=str(truncated)):
            LightweightVisualBackbone("yolov8n", checkpoint=truncated)

    not_a_checkpoint = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_checkpoint)
    with pytest.raises(CheckpointError, match="neither an Ultralytics checkpoint"):
        LightweightVisualBackbone("yolov8n", checkpoint=not_a_checkpoint)


def test_wrong_architecture_reports_every_mismatch(tmp_path):
    _need(STATE_DICT)
    with pytest.raises(CheckpointError) as info:
        LightweightVisualBackbone("yolov5s", checkpoint=STATE_DICT)
    msg = str(info.value)
    assert str(STATE_DICT) in msg and "\n" not in msg
    assert "missing key" in msg and "unexpected key" in msg and "shape mismatch" in msg

    # One changed shape is named precisely.
    sd = torch.load(STATE_DICT, weights_only=True)
    sd["state_dict"]["model.0.conv.weight"] = torch.zeros(1, 3, 3, 3)
    del sd["state_dict"]["model.1.conv.bias"]
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(CheckpointError) as info:
        LightweightVisualBackbone("yolov8n", checkpoint=bad)
    msg = str(info.value)
    assert "model.0.conv.weight (checkpoint [1, 3, 3, 3] vs model [16, 3, 3, 3])" in msg
    assert "1 missing key(s): model.1.conv.bias" in msg


def test_unfused_state_dict_and_other_class_count(tmp_path):
    # A 2-class, unfused checkpoint (BatchNorm keys present).
    from ultralytics.nn.tasks import DetectionModel

    net = DetectionModel(LightweightVisualBackbone("yolov8n").net.yaml["yaml_file"], nc=2, verbose=False)
    path = tmp_path / "two.pt"
    torch.save({"state_dict": net.state_dict(), "names": {0: "cat", 1: "dog"}}, path)
    bb = LightweightVisualBackbone("yolov8n", checkpoint=path)
    assert not bb.is_fused()
    assert bb.num_source_classes == 2 and bb.source_names == ["cat", "dog"]


def test_unknown_name_and_fallback(caplog):
    with pytest.raises(UsageError, match=r"unknown backbone .resnet50.; choose one of: yolov8n, yolov5s, .*simple"):
        LightweightVisualBackbone("resnet50")
    with caplog.at_level(logging.WARNING):
        bb = LightweightVisualBackbone("yolov8n", fallback=True)
    assert bb.name == "simple" and not bb.has_box_head
    assert "simple" in caplog.text


def test_load_checkpoint_file_is_weights_only_by_default(tmp_path):
    from fractions import Fraction  # any class outside torch's allow-list needs unpickling code

    path = tmp_path / "obj.pt"
    torch.save({"x": Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match="pickle of Python objects"):
        load_checkpoint_file(path)
    shutil.copy(path, tmp_path / "copy.pt")
    assert load_checkpoint_file(tmp_path / "copy.pt", trust=True)["x"] == Fraction(1, 3)
