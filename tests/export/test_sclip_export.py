"""`vlexport sclip`: export parity, runtime segmentation on images/video, mIoU validation."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
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
    from vlexport.models.sclip.model import SCLIPSegmenter

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


@pytest.fixture(scope="module")
def openai_vit_b16_file(tmp_path_factory):
    """Seeded random ViT-B/16 weights in OpenAI's layout, fp16 as OpenAI ships them (what an offline device has)."""
    import open_clip

    torch.manual_seed(16)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    path = tmp_path_factory.mktemp("clip") / "ViT-B-16.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.slow
def test_vit_b16_openai_file_parity_and_runtime_labels(tmp_path, assets, openai_vit_b16_file):
    """Real size, OpenAI-layout weights file: QuickGELU on both towers, the exported segmenter matches
    PyTorch, and the runtime's labels equal PyTorch's segment() (FP32 >= 99.99 %, FP16 >= 99.5 %)."""
    from vlexport.export.bundle_export import PrecisionOptions
    from vlexport.export.sclip import SCLIPExportOptions, export_sclip
    from vlexport.models.sclip.model import SCLIPSegmenter

    classes = ["sky", "tree", "person", "bus", "road", "building", "car", "window"]
    report = export_sclip(SCLIPExportOptions(out=tmp_path / "b", preset="vit-b16", classes=classes,
                                             clip_pretrained=str(openai_vit_b16_file), templates="single",
                                             parity_source=str(assets / "images" / "bus.jpg"), parity_count=1,
                                             precision=PrecisionOptions(fp16=True)))
    p = report.parity["segmenter/fp32"]["logits"]
    assert p["max_abs"] < 1e-3 and p["agreement"] >= 0.999
    m = json.loads((report.path / "manifest.json").read_text())
    assert m["provenance"]["text_encoder"]["activation"] == "quickgelu"

    seg = SCLIPSegmenter.from_preset("vit-b16", classes, pretrained=str(openai_vit_b16_file),
                                     templates=("a photo of a {}.",))
    assert seg.loaded.activation == "quickgelu"
    for name in ("bus.jpg", "zidane.jpg"):
        img = cv2.imread(str(assets / "images" / name))
        with torch.no_grad():
            ref = seg.segment(img)
        fp32 = load(report.path, precision="fp32").segment(img).label_map
        fp16 = load(report.path, precision="fp16").segment(img).label_map
        assert fp32.shape == ref.shape == img.shape[:2]
        assert (fp32 == ref).mean() >= 0.9999, name
        assert (fp16 == ref).mean() >= 0.995, name


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
    from vlexport.models.sclip.model import SCLIPSegmenter

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


def _thin(img, h: int, w: int):
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def test_long_side_cap_and_small_windows_match_pytorch(tmp_path, assets):
    """SCLIP's Resize(scale=(max_long, short)): a thin frame's capped short side falls below the crop
    (tiny: 100x1000 -> 48x480 < 64, 300x2400 -> 60x480); the runtime cuts min(crop, side) windows and
    the exported graph (dynamic crop size) gives PyTorch's labels."""
    from vlexport.models.sclip.model import SCLIPSegmenter

    out = tmp_path / "b"
    r = invoke("sclip", "--preset", "tiny", "--classes", "sky,tree,person,bus", "--templates", "single",
               "--max-long-side", "480", "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["preprocess"]["max_long_side"] == 480
    assert m["parts"]["segmenter"]["inputs"][0]["shape"] == ["crops", 3, "crop_height", "crop_width"]
    task = load(out, precision="fp32")
    seg = SCLIPSegmenter.from_preset("tiny", ["sky", "tree", "person", "bus"], templates=("a photo of a {}.",),
                                     max_long_side=480)
    bus = cv2.imread(str(assets / "images" / "bus.jpg"))
    for (h, w), resized in (((100, 1000), (48, 480)), ((300, 2400), (60, 480))):
        img = _thin(bus, h, w)
        assert task.preprocess(img)[2] == resized
        ours = task.segment(img).label_map
        with torch.no_grad():
            ref = seg.segment(img)
        assert ours.shape == ref.shape == (h, w)
        assert (ours == ref).mean() > 0.999


def test_area_threshold_synonyms_and_probabilities_match_pytorch(tmp_path, assets):
    """--classes with "|" synonyms lands like a --vocab file; --area-threshold reaches the manifest and
    the runtime (with prob_threshold and background 0), whose labels and probabilities are PyTorch's."""
    from vlexport.models.sclip.model import SCLIPSegmenter
    from vlexport.models.clip.text import parse_vocabulary

    lines = ["background, sky, wall, road", "person", "bus", "car", "dog", "tree", "bicycle"]
    common = ["--preset", "tiny", "--templates", "single", "--logit-scale", "65", "--background-index", "0",
              "--prob-threshold", "0.1", "--area-threshold", "0.1"]
    r = invoke("sclip", *common, "--classes", "background|sky|wall|road,person,bus,car,dog,tree,bicycle",
               "--out", tmp_path / "cli")
    assert r.exit_code == 0, r.output
    (tmp_path / "voc.txt").write_text("\n".join(lines) + "\n")
    assert parse_vocabulary(None, tmp_path / "voc.txt") == lines  # what --vocab hands the export
    m = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert m["vocabulary"]["classes"] == lines
    assert m["vocabulary"]["queries"] == ["background", "sky", "wall", "road", *lines[1:]]
    assert m["segment"]["query_to_class"] == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert m["segment"]["area_threshold"] == 0.1 and m["segment"]["logit_scale"] == 65

    task = load(tmp_path / "cli", precision="fp32")
    seg = SCLIPSegmenter.from_preset("tiny", lines, templates=("a photo of a {}.",), logit_scale=65,
                                     prob_threshold=0.1, area_threshold=0.1)
    no_area = SCLIPSegmenter(seg.loaded, dataclasses.replace(seg.config, area_threshold=0.0), lines,
                             templates=("a photo of a {}.",))
    changed = 0.0
    for name in ("bus.jpg", "zidane.jpg"):
        img = cv2.imread(str(assets / "images" / name))
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
        with torch.no_grad():
            ref, ref_p = seg.segment(img), seg.probabilities(img).numpy()
            changed = max(changed, float((no_area.segment(img) != ref).mean()))
        ours = task.segment(img, return_probabilities=True)
        assert (ours.label_map == ref).mean() > 0.99
        assert (task.segment(img).label_map == ours.label_map).mean() > 0.999
        assert ours.probabilities.shape == ref_p.shape == (len(lines), *img.shape[:2])
        assert np.abs(ours.probabilities - ref_p).max() < 1e-4
        best = ours.probabilities.max(0)
        np.testing.assert_array_equal(ours.label_map, np.where(best < 0.1, 0, ours.probabilities.argmax(0)))
    assert changed > 0.001  # the area threshold really changed PyTorch's labels on these images


def test_area_threshold_needs_a_background(tmp_path):
    r = invoke("sclip", "--preset", "tiny", "--classes", "a,b", "--area-threshold", "0.1", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "--area-threshold needs a background class" in r.output
    assert not (tmp_path / "b").exists()
