"""`vlexport kdeov`, `inspect` and `run` end to end, and the bad inputs a user will make."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from vlexport.cli import cli

pytest.importorskip("torch")

TINY = ["kdeov", "--preset", "tiny", "--classes", "person,bus,car", "--templates", "single"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result, *needles: str, code: int = 1):
    assert result.exit_code == code, result.output
    out = result.output.strip()
    assert "Traceback" not in out
    assert out.count("\n") == 0 or out.splitlines()[-1].startswith("error:"), out
    for n in needles:
        assert n in out, out


def test_export_inspect_run_image_and_video(tmp_path, assets):
    out = tmp_path / "b"
    r = invoke(*TINY, "--fp16", "--out", str(out), "--val", str(assets / "images"))
    assert r.exit_code == 0, r.output
    assert "bundle written" in r.output and "parity detector/fp32" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocabulary"]["classes"] == ["person", "bus", "car"]
    assert manifest["validation"]["parity_images"]["source"] == str(assets / "images")
    assert manifest["provenance"]["text_encoder"]["weights_source"] == "random(seed=0)"
    assert manifest["provenance"]["weights_source"] == "random"  # no --checkpoint: an untrained student

    r = invoke("inspect", str(out))
    assert r.exit_code == 0, r.output
    assert "detector: images float32[1, 3, 128, 128]" in r.output
    assert "all sha256 verified" in r.output and "UNTRAINED" in r.output

    saved = tmp_path / "bus.jpg"
    jsonl = tmp_path / "bus.jsonl"
    r = invoke("run", str(out), "--source", str(assets / "images" / "bus.jpg"), "--save", str(saved),
               "--jsonl", str(jsonl), "--score-threshold", "0.0", "--no-progress")
    assert r.exit_code == 0, r.output
    img = cv2.imread(str(saved))
    assert img is not None and img.shape == cv2.imread(str(assets / "images" / "bus.jpg")).shape
    rec = json.loads(jsonl.read_text().splitlines()[0])
    assert rec["frame"] == 0 and len(rec["detections"]) > 0

    video = tmp_path / "cars.mp4"
    r = invoke("run", str(out), "--source", str(assets / "video" / "car-detection.mp4"), "--save", str(video),
               "--jsonl", str(tmp_path / "cars.jsonl"), "--no-progress")
    assert r.exit_code == 0, r.output
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 377
    cap.release()
    assert len((tmp_path / "cars.jsonl").read_text().splitlines()) == 377


def test_console_script_reports_user_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("vlexport")
    p = subprocess.run([str(exe), "inspect", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: {tmp_path} is not a bundle: it has no manifest.json (an interrupted export leaves none; export again)"
    assert "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- bad input
def test_missing_checkpoint(tmp_path):
    r = invoke(*TINY, "--out", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "nope.pt"))
    assert_one_line_error(r, "nope.pt", "no such file")
    assert not (tmp_path / "b").exists()


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    r = invoke(*TINY, "--out", str(tmp_path / "b"), "--checkpoint", str(bad))
    assert_one_line_error(r, "bad.pt")
    assert list(tmp_path.iterdir()) == [bad]


def test_untrusted_ultralytics_checkpoint(tmp_path, assets):
    r = invoke(*TINY, "--backbone", "yolov8n", "--out", str(tmp_path / "b"),
               "--backbone-weights", str(assets / "weights" / "yolov8n_coco.pt"))
    assert_one_line_error(r, "--trust-checkpoint")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("classes", [",", " , ,"])
def test_empty_vocabulary(tmp_path, classes):
    r = invoke("kdeov", "--preset", "tiny", "--classes", classes, "--out", str(tmp_path / "b"))
    assert_one_line_error(r, "vocabulary is empty")
    assert not (tmp_path / "b").exists()


def test_empty_vocab_file(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("\n# nothing\n\n")
    r = invoke("kdeov", "--preset", "tiny", "--vocab", str(f), "--out", str(tmp_path / "b"))
    assert_one_line_error(r, "vocabulary is empty")


def test_unknown_backbone(tmp_path):
    r = invoke(*TINY, "--backbone", "resnet9000", "--out", str(tmp_path / "b"))
    assert r.exit_code == 2 and "resnet9000" in r.output and "Traceback" not in r.output


def test_unknown_clip_model(tmp_path):
    r = invoke(*TINY, "--clip-model", "ViT-Q-99", "--out", str(tmp_path / "b"))
    assert_one_line_error(r, "ViT-Q-99")
    assert not (tmp_path / "b").exists()


def test_bad_imgsz(tmp_path):
    r = invoke(*TINY, "--imgsz", "100", "--out", str(tmp_path / "b"))
    assert_one_line_error(r, "multiple of 32")


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = invoke(*TINY, "--out", str(blocker / "b"))
    assert_one_line_error(r, "cannot write")


def test_existing_output_is_not_clobbered(tmp_path, tiny_bundle):
    before = (tiny_bundle / "manifest.json").read_text()
    r = invoke(*TINY, "--out", str(tiny_bundle))
    assert_one_line_error(r, "--overwrite")
    assert (tiny_bundle / "manifest.json").read_text() == before


def test_not_a_bundle(tmp_path):
    r = invoke("run", str(tmp_path), "--source", "x.jpg")
    assert_one_line_error(r, "not a bundle")


def test_tampered_bundle(tmp_path, tiny_bundle):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "detector.onnx", "ab") as f:
        f.write(b"\0")
    r = invoke("inspect", str(copy))
    assert_one_line_error(r, "detector.onnx", "sha256")
    r = invoke("run", str(copy), "--source", "x.jpg", "--precision", "fp32")
    assert_one_line_error(r, "sha256")


def test_unknown_schema(tmp_path, tiny_bundle):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema"] = "vlexport.bundle/99"
    (copy / "manifest.json").write_text(json.dumps(m))
    r = invoke("inspect", str(copy))
    assert_one_line_error(r, "vlexport.bundle/99")


def test_unreadable_image_and_video(tmp_path, tiny_bundle):
    bad_img = tmp_path / "broken.jpg"
    bad_img.write_bytes(b"not a jpeg")
    r = invoke("run", str(tiny_bundle), "--source", str(bad_img), "--no-progress")
    assert_one_line_error(r, "broken.jpg")
    bad_vid = tmp_path / "broken.mp4"
    bad_vid.write_bytes(np.random.default_rng(0).bytes(2048))
    out = tmp_path / "out.mp4"
    r = invoke("run", str(tiny_bundle), "--source", str(bad_vid), "--save", str(out), "--no-progress")
    assert_one_line_error(r, "broken.mp4")
    assert not out.exists()
    r = invoke("run", str(tiny_bundle), "--source", str(tmp_path / "missing.mp4"), "--no-progress")
    assert_one_line_error(r, "missing.mp4")


def test_build_without_tensorrt_says_why(tiny_bundle):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the real build path is tested in tests/runtime")
    except ImportError:
        pass
    r = invoke("build", str(tiny_bundle))
    assert_one_line_error(r, "TensorRT is not installed", "vlexport[trt]")
    r = invoke("run", str(tiny_bundle), "--source", "x.jpg", "--backend", "tensorrt")
    assert_one_line_error(r, "TensorRT")


def test_train_then_export_the_trained_student(tmp_path, assets):
    ckpt = tmp_path / "student.pt"
    images = tmp_path / "imgs"
    images.mkdir()
    for p in sorted((assets / "coco128" / "images" / "train2017").glob("*.jpg"))[:6]:
        (images / p.name).write_bytes(p.read_bytes())
    r = invoke("train-kdeov", "--images", str(images), "--out", str(ckpt), "--preset", "tiny", "--steps", "6",
               "--batch-size", "3", "--lr", "3e-3")
    assert r.exit_code == 0, r.output
    assert "checkpoint written" in r.output and ckpt.is_file()
    out = tmp_path / "b"
    r = invoke("kdeov", "--checkpoint", str(ckpt), "--classes", "person,dog", "--templates", "single", "--out", str(out))
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["provenance"]["weights_source"] == f"file:{ckpt.resolve()}" and m["provenance"]["checkpoint_sha256"]
    assert m["preset"] == "checkpoint" and m["model"]["config"]["backbone"] == "simple"  # its own config (tiny)
