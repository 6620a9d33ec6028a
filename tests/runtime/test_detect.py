"""DetectTask and EmbedTask end to end on real images with tiny real bundles."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest
from conftest import ENC_B, ENC_W, write_bundle

import vlexport.runtime as vr
from vlexport.errors import BundleError, UsageError
from vlexport.runtime.preprocess import letterbox
from vlexport.runtime.results import Detections, Embedding, FrameStamp
from vlexport.runtime.tasks.detect import DetectTask
from vlexport.runtime.tasks.embed import EmbedTask


def _by_score(d: Detections) -> list[tuple[str, float, list[float]]]:
    return [
        (lab, round(float(s), 4), [round(float(v), 2) for v in b]) for lab, s, b in zip(d.labels, d.scores, d.boxes)
    ]


def _mean_input(bgr: np.ndarray, size=(640, 640)) -> float:
    lb, _ = letterbox(bgr, size)
    return float(lb.astype(np.float64).mean() / 255)


def test_detect_bus_maps_boxes_to_source_pixels(bundle_dir: Path, bus: np.ndarray) -> None:
    task = vr.load(bundle_dir, threads=1)
    assert isinstance(task, DetectTask) and task.precision == "fp32"
    stamp = FrameStamp(7, 1.0, 2.0)
    d = task.detect(bus, stamp)
    bright = round(_mean_input(bus), 4)
    expected = [
        ("person", 0.9, [81.0, 108.0, 405.0, 540.0]),  # anchor 1: (x - 80) * 1.6875, y * 1.6875
        ("bus", 0.7, [84.38, 111.38, 408.38, 543.38]),  # anchor 3 survives: other class than 1
        ("car", 0.6, [0.0, 16.88, 33.75, 84.38]),  # anchor 5: clipped at the left edge
        ("person", bright, [708.75, 1012.5, 742.5, 1046.25]),  # anchor 0: mean of the input
        ("car", 0.3, [371.25, 675.0, 708.75, 1012.5]),  # anchor 4
    ]
    got = _by_score(d)
    expected.sort(key=lambda r: -r[1])
    assert [(lab, box) for lab, _, box in got] == [(lab, box) for lab, _, box in expected]
    # float32 accumulation in the graph's ReduceMean differs from numpy's float64 mean in the 4th digit.
    np.testing.assert_allclose([s for _, s, _ in got], [s for _, s, _ in expected], atol=1e-3)
    assert d.stamp == stamp
    assert set(task.timings) == {"preprocess", "infer", "postprocess"} and all(v >= 0 for v in task.timings.values())
    task.close()


def test_overrides(bundle_dir: Path, bus: np.ndarray) -> None:
    d = vr.load(bundle_dir, score_threshold=0.5).detect(bus)
    assert [lab for lab, *_ in _by_score(d)] == ["person", "bus", "car"]
    d = vr.load(bundle_dir, score_threshold=0.5, class_agnostic=True).detect(bus)
    assert [lab for lab, *_ in _by_score(d)] == ["person", "car"]
    d = vr.load(bundle_dir, max_detections=2).detect(bus)
    assert len(d) == 2
    d = vr.load(bundle_dir, iou_threshold=0.99, score_threshold=None).detect(bus)
    assert len(d) == 6  # nothing suppressed; None keeps the manifest's score threshold


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"score_thresh": 0.3}, "unknown detect option(s) ['score_thresh']"),
        ({"score_threshold": 1.5}, "score_threshold must be a number between 0 and 1"),
        ({"max_detections": 0}, "max_detections must be a positive integer"),
        ({"class_agnostic": "yes"}, "class_agnostic must be true or false"),
    ],
)
def test_bad_overrides(bundle_dir: Path, overrides: dict, fragment: str) -> None:
    with pytest.raises(UsageError) as e:
        vr.load(bundle_dir, **overrides)
    assert fragment in str(e.value)


def test_detect_rejects_non_images(bundle_dir: Path) -> None:
    task = vr.load(bundle_dir)
    with pytest.raises(UsageError, match=r"got shape \(480, 640\) dtype uint8"):
        task.detect(np.zeros((480, 640), np.uint8))
    with pytest.raises(UsageError, match=r"got shape \(480, 640, 3\) dtype float32"):
        task.detect(np.zeros((480, 640, 3), np.float32))
    with pytest.raises(UsageError, match="single array"):
        task.detect_batch(np.zeros((2, 480, 640, 3), np.uint8))


@pytest.mark.parametrize("batch", ["batch", 1])
def test_detect_batch_keeps_order(tmp_path: Path, batch) -> None:
    # Frames of the model size: no resize, no padding, so the brightness anchor (box
    # [500, 600, 520, 620]) scores the frame's mean pixel value / 255.
    task = vr.load(write_bundle(tmp_path / "b", batch=batch), score_threshold=0.05)
    frames = [np.full((640, 640, 3), v, np.uint8) for v in (255, 0, 128)]
    results = task.detect_batch(frames, [FrameStamp(i, 0.0, 0.0) for i in range(3)])
    assert [r.stamp.index for r in results] == [0, 1, 2]
    brightness = []
    for r in results:
        hit = np.all(r.boxes == np.float32([500, 600, 520, 620]), axis=1)
        brightness.append(float(r.scores[hit][0]) if hit.any() else None)
    assert (
        brightness[0] == pytest.approx(1.0)
        and brightness[1] is None
        and brightness[2] == pytest.approx(128 / 255, abs=2e-3)
    )  # float32 ReduceMean
    assert task.detect_batch([]) == []


def test_precision_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlexport.runtime.tasks.base as base

    both = write_bundle(tmp_path / "a", precisions=("fp32", "fp16"))
    all3 = write_bundle(tmp_path / "b", precisions=("fp32", "fp16", "int8"))
    monkeypatch.setattr(base, "has_accelerator", lambda backend=None: False)
    assert vr.load(both).precision == "fp32"  # fp16 is slow on CPU
    # A TensorRT-style (signed) INT8 graph is slower than FP32 on x86 onnxruntime: FP32 first.
    assert vr.load(all3).precision == "fp32"
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["calibration"] = {"target": "cpu"}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    assert vr.load(all3).precision == "int8"  # quantised for the CPU: the fastest there
    t = vr.load(both, precision="fp16")
    assert t.precision == "fp16" and t.model_path.name == "detector.fp16.onnx"
    monkeypatch.setattr(base, "has_accelerator", lambda backend=None: True)
    assert vr.load(both).precision == "fp16"
    assert vr.load(all3).precision == "int8"


def test_precision_errors(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "a", precisions=("fp32", "fp16"))
    with pytest.raises(BundleError, match=r"has no int8 file; it has \['fp32', 'fp16'\]"):
        vr.load(root, precision="int8")
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        vr.load(root, precision="fp8")


def test_set_vocabulary_needs_input_mode(bundle_dir: Path) -> None:
    with pytest.raises(UsageError, match="--vocab-mode input"):
        vr.load(bundle_dir).set_vocabulary(["cat"], np.eye(1, 4, dtype=np.float32))


def test_vocabulary_input_mode(tmp_path: Path, bus: np.ndarray) -> None:
    task = vr.load(write_bundle(tmp_path / "b", vocab_mode="input"), score_threshold=0.5)
    assert task.vocab_mode == "input"
    assert [lab for lab, *_ in _by_score(task.detect(bus))] == ["person", "bus", "car"]
    # Two classes, the second one now matching the "person" features: anchors 1 and 3 merge.
    task.set_vocabulary(["dog", "cat"], np.array([[0, 1, 0, 0], [1, 0, 0, 0]], np.float32))
    d = task.detect(bus)
    assert _by_score(d)[:2] == [
        ("cat", 0.9, [81.0, 108.0, 405.0, 540.0]),
        ("dog", 0.7, [84.38, 111.38, 408.38, 543.38]),
    ]
    with pytest.raises(UsageError, match="2 rows for 3 classes"):
        task.set_vocabulary(["a", "b", "c"], np.zeros((2, 4), np.float32))
    with pytest.raises(UsageError, match=r"text_embeddings: got shape \(2, 5\)"):
        task.set_vocabulary(["a", "b"], np.zeros((2, 5), np.float32))
    with pytest.raises(UsageError, match="empty"):
        task.set_vocabulary([], np.zeros((0, 4), np.float32))
    assert task.classes == ["dog", "cat"]  # unchanged by the failed calls


def test_load_task_choice(tmp_path: Path, bus: np.ndarray) -> None:
    root = write_bundle(tmp_path / "b", encoder=True)
    task = vr.load(root, task="embed")
    assert isinstance(task, EmbedTask)
    e = task.embed(bus, FrameStamp(1, 0.0, 0.0))
    assert isinstance(e, Embedding) and e.stamp.index == 1
    lb, _ = letterbox(bus, (640, 640))
    rgb_mean = lb[..., ::-1].reshape(-1, 3).astype(np.float64).mean(0) / 255
    want = rgb_mean @ ENC_W + ENC_B
    np.testing.assert_allclose(e.vector, want / np.linalg.norm(want), atol=1e-5)
    assert len(task.embed_batch([bus, bus])) == 2
    with pytest.raises(UsageError, match="takes no options"):
        vr.load(root, task="embed", score_threshold=0.3)
    with pytest.raises(BundleError, match="no 'caption' settings"):
        vr.load(root, task="caption")  # a detection bundle is not a captioning one
    with pytest.raises(BundleError, match="no .segment. settings"):
        vr.load(root, task="segment")  # a detection bundle is not a segmentation one
    only_embed = write_bundle(tmp_path / "e", task="embed")
    assert isinstance(vr.load(only_embed), EmbedTask)
    with pytest.raises(BundleError, match="no part 'detector'"):
        vr.load(only_embed, task="detect")


def test_describe(bundle_dir: Path) -> None:
    with vr.load(bundle_dir) as task:
        d = task.describe()
    assert d["precision"] == "fp32" and d["backend"] == "onnxruntime" and d["score_threshold"] == 0.25
    assert d["providers"][-1] == "CPUExecutionProvider"
