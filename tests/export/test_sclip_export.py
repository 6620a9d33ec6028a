"""`vlexport sclip`: export parity, runtime segmentation on images/video, mIoU validation."""

from __future__ import annotations

import json

import cv2
import pytest
import torch
from click.testing import CliRunner

from vlexport.cli import cli
from vlexport.runtime import load

VOC = ("background,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,horse,motorbike,"
       "person,pottedplant,sheep,sofa,train,tvmonitor")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def voc_bundle(tmp_path_factory, assets):
    out = tmp_path_factory.mktemp("sclip") / "b"
    r = invoke("sclip", "--preset", "tiny", "--classes", VOC, "--templates", "single", "--fp16",
               "--background-index", "0", "--prob-threshold", "0.1", "--out", out, "--val", assets / "images")
    assert r.exit_code == 0, r.output
    return out


def test_manifest_and_parity(voc_bundle):
    m = json.loads((voc_bundle / "manifest.json").read_text())
    assert (m["family"], m["task"]) == ("sclip", "segment")
    assert m["segment"]["background_index"] == 0 and m["segment"]["prob_threshold"] == 0.1
    assert len(m["vocabulary"]["classes"]) == 21
    p = m["validation"]["parity"]["segmenter/fp32"]["logits"]
    assert p["max_abs"] < 1e-3 and p["agreement"] >= 0.999
    assert m["validation"]["parity"]["segmenter/fp16"]["logits"]["cosine"] > 0.999


def test_runtime_matches_the_pytorch_segmenter(voc_bundle, assets):
    """The runtime's numpy windows/stitching/post-processing give PyTorch's label map."""
    from vlexport.models.sclip import SCLIPSegmenter

    img = cv2.imread(str(assets / "images" / "bus.jpg"))
    ours = load(voc_bundle, precision="fp32").segment(img)
    seg = SCLIPSegmenter.from_preset("tiny", VOC.split(","), templates=("a photo of a {}.",),
                                     prob_threshold=0.1)
    with torch.no_grad():
        ref = seg.segment(img)
    assert ours.label_map.shape == img.shape[:2] == ref.shape
    assert (ours.label_map == ref).mean() > 0.99
    assert abs(sum(ours.fractions().values()) - 1) < 1e-6


def _clip(src, dst, frames: int) -> None:
    cap = cv2.VideoCapture(str(src))
    writer = None
    for _ in range(frames):
        ok, frame = cap.read()
        assert ok
        if writer is None:
            writer = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), 30, frame.shape[1::-1])
        writer.write(frame)
    writer.release()
    cap.release()


def test_run_on_video_and_validate(voc_bundle, assets, tmp_path):
    _clip(assets / "video" / "bottle-detection.mp4", tmp_path / "in.mp4", 24)
    r = invoke("run", voc_bundle, "--source", tmp_path / "in.mp4", "--save", tmp_path / "o.mp4",
               "--jsonl", tmp_path / "o.jsonl", "--no-progress")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])
    assert rec["frame"] == 0 and set(rec["segmentation"]["fractions"]) <= set(VOC.split(","))
    cap = cv2.VideoCapture(str(tmp_path / "o.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 24
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 24
    cap.release()
    out = tmp_path / "m.json"
    r = invoke("validate", voc_bundle, "--data", assets / "voc", "--json", out)
    assert r.exit_code == 0, r.output
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"fp32", "fp16"} and metrics["fp32"]["images"] == 7
    assert 0.0 <= metrics["fp32"]["pixel_accuracy"] <= 1.0


def test_bad_sclip_arguments(tmp_path):
    r = invoke("sclip", "--preset", "nope", "--classes", "a,b", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "unknown sclip preset" in r.output
    r = invoke("sclip", "--preset", "tiny", "--classes", "a,b", "--background-index", "5", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "--background-index must be a class index" in r.output
    r = invoke("sclip", "--preset", "tiny", "--classes", "a,b", "--slide-crop", "64", "--slide-stride", "80",
               "--out", tmp_path / "b")
    assert r.exit_code == 1 and "slide_stride <= slide_crop" in r.output
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_vit_b16_parity(tmp_path, assets):
    """Real size (ViT-B/16, random weights): the exported segmenter matches PyTorch."""
    from vlexport.export.sclip import SCLIPExportOptions, export_sclip

    report = export_sclip(SCLIPExportOptions(out=tmp_path / "b", preset="vit-b16", classes=["sky", "tree", "person"],
                                             templates="single", parity_source=str(assets / "images" / "bus.jpg"),
                                             parity_count=1))
    p = report.parity["segmenter/fp32"]["logits"]
    assert p["max_abs"] < 1e-3 and p["agreement"] >= 0.999


def test_int8_calibrates_on_the_sliding_window_crops(tmp_path, assets):
    out = tmp_path / "b"
    r = invoke("sclip", "--preset", "tiny", "--classes", "sky,tree,person", "--templates", "single", "--int8",
               "--calib", assets / "images", "--calib-size", "3", "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"]["count"] == 3 and m["parts"]["segmenter"]["files"]["int8"] == "segmenter.int8.onnx"
    seg = load(out, precision="int8").segment(cv2.imread(str(assets / "images" / "bus.jpg")))
    ref = load(out, precision="fp32").segment(cv2.imread(str(assets / "images" / "bus.jpg")))
    assert (seg.label_map == ref.label_map).mean() > 0.5


def test_pamr_in_runtime_and_in_graph_agree_with_pytorch(tmp_path, assets):
    from vlexport.models.sclip import SCLIPSegmenter

    img = cv2.imread(str(assets / "images" / "zidane.jpg"))
    labels = {}
    for where in ("runtime", "graph"):
        out = tmp_path / where
        r = invoke("sclip", "--preset", "tiny", "--classes", "sky,tree,person", "--templates", "single",
                   "--pamr-steps", "3", "--pamr-in", where, "--out", out)
        assert r.exit_code == 0, r.output
        files = json.loads((out / "manifest.json").read_text())["parts"]
        assert ("refiner" in files) == (where == "graph")
        labels[where] = load(out, precision="fp32").segment(img).label_map
    seg = SCLIPSegmenter.from_preset("tiny", ["sky", "tree", "person"], templates=("a photo of a {}.",), pamr_steps=3)
    with torch.no_grad():
        ref = seg.segment(img)
    assert (labels["runtime"] == labels["graph"]).mean() > 0.999
    assert (labels["runtime"] == ref).mean() > 0.99
