"""BinarySegmentTask: a real multiscale export run by the torch-free runtime, checked against PyTorch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import vlexport.runtime as vr  # noqa: E402
from vlexport.errors import UsageError  # noqa: E402
from vlexport.runtime.preprocess import LetterboxInfo, Preprocessor, letterbox_params  # noqa: E402
from vlexport.runtime.segmentation import Segmentation  # noqa: E402
from vlexport.runtime.tasks.binary_segment import BinarySegmentTask, logits_to_source, threshold_logit  # noqa: E402
from vlexport.runtime.run import run_on_source  # noqa: E402

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[3] / "shared" / "assets"))
SIZE = 128


def _asset(rel: str) -> Path:
    path = ASSETS / rel
    if not path.exists():
        pytest.skip(f"{path} not found (set VLEXPORT_ASSETS)")
    return path


def _images() -> list[np.ndarray]:
    folder = _asset("images")
    out = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in sorted(folder.iterdir())]
    return [img for img in out if img is not None]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ABSI segmenter with non-trivial BatchNorm statistics and a head bias that puts the
    median logit of bus.jpg at 0 (so both classes appear), saved, exported, and kept for reference."""
    from vlexport.export.multiscale import MultiScaleExportOptions, export_multiscale, multiscale_preprocess
    from vlexport.models.multiscale.model import build_multiscale

    torch.manual_seed(0)
    model = build_multiscale("tiny", "absi", image_size=SIZE)
    pre = Preprocessor(multiscale_preprocess(SIZE))
    batch = torch.from_numpy(pre.batch(_images())[0])
    with torch.no_grad():
        model.train()
        model(batch)  # BatchNorm running statistics from real pictures
        model.eval()
        bus = torch.from_numpy(pre(cv2.imread(str(_asset("images/bus.jpg"))))[0])
        model.head.bias -= model(bus).median()
    tmp = tmp_path_factory.mktemp("multiscale")
    ckpt = tmp / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp / "bundle"
    export_multiscale(MultiScaleExportOptions(out=out, preset="tiny", fusion="absi", imgsz=SIZE, checkpoint=ckpt,
                                              class_name="thing", threshold=0.5, parity_count=1))
    return out, model, pre


@pytest.fixture(scope="module")
def task(exported):
    with vr.load(exported[0], precision="fp32", threads=1) as t:
        yield t


def _reference_logits(model, pre: Preprocessor, bgr: np.ndarray) -> np.ndarray:
    """PyTorch's logits of the same pre-processed tensor, mapped back to the source by hand."""
    x, _ = pre(bgr)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))[0, 0].numpy()
    info, (top, _, left, _) = letterbox_params(bgr.shape[:2], (SIZE, SIZE))
    new_w, new_h = info.resized
    region = np.ascontiguousarray(logits[top:top + new_h, left:left + new_w])
    return cv2.resize(region, (bgr.shape[1], bgr.shape[0]), interpolation=cv2.INTER_LINEAR)


def test_the_task_is_chosen_by_family(task, exported):
    assert isinstance(task, BinarySegmentTask)
    d = task.describe()
    assert d["family"] == "multiscale" and d["threshold"] == 0.5 and d["classes"] == ["background", "thing"]


def test_mask_equals_pytorch_on_real_images(task, exported):
    _, model, pre = exported
    both_classes = 0
    for bgr in _images():
        seg = task.segment(bgr)
        assert isinstance(seg, Segmentation) and seg.shape == bgr.shape[:2]
        assert seg.classes == ["background", "thing"]
        ref = torch.sigmoid(torch.from_numpy(_reference_logits(model, pre, bgr))).numpy() > 0.5
        assert (seg.label_map == ref).mean() >= 0.999
        both_classes += int(0.02 < ref.mean() < 0.98)
    assert both_classes >= 3  # the comparison is not between two empty masks


def test_probability_logits_and_threshold_override(exported):
    root, model, pre = exported
    bgr = cv2.imread(str(_asset("images/zidane.jpg")))
    with vr.load(root, precision="fp32", threads=1, threshold=0.7) as t:
        assert t.threshold == 0.7
        prob = t.probability(bgr)
        assert prob.shape == bgr.shape[:2] and prob.dtype == np.float32
        assert np.all((prob >= 0) & (prob <= 1))
        np.testing.assert_allclose(t.logits(bgr), _reference_logits(model, pre, bgr), atol=1e-4)
        mask = t.segment(bgr).mask("thing")
        assert (mask == (prob > 0.7)).mean() >= 0.9999
        assert mask.sum() < (prob > 0.5).sum()  # a higher threshold keeps fewer pixels


def test_segment_batch_matches_single_frames_and_times_stages(task):
    from vlexport.runtime.results import FrameStamp

    frames = _images()[:3]
    stamps = [FrameStamp(index=i, t_monotonic=float(i), t_wall=float(i)) for i in range(3)]
    batch = task.segment_batch(frames, stamps)
    assert set(task.timings) == {"preprocess", "infer", "postprocess"}
    assert all(v >= 0 for v in task.timings.values())
    for frame, stamp, seg in zip(frames, stamps, batch):
        assert seg.stamp == stamp
        np.testing.assert_array_equal(seg.label_map, task.segment(frame).label_map)
    assert task.segment_batch([]) == []


def test_logits_to_source_by_hand():
    # A 2x4 (h x w) source in a 4x4 input: no resize, one row of padding above and below.
    info = LetterboxInfo(scale=1.0, pad_x=0, pad_y=1, src_shape=(2, 4), resized=(4, 2))
    logits = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(logits_to_source(logits, info), logits[1:3])
    # A 4x8 source at half size: the 2x4 region is resized back; a constant region stays constant.
    info = LetterboxInfo(scale=0.5, pad_x=0, pad_y=1, src_shape=(4, 8), resized=(4, 2))
    logits = np.full((4, 4), -3.0, np.float32)
    logits[1:3] = 2.5
    out = logits_to_source(logits, info)
    assert out.shape == (4, 8) and np.all(out == 2.5)
    with pytest.raises(ValueError, match="cannot hold"):
        logits_to_source(np.zeros((2, 2), np.float32), info)
    for t in (0.1, 0.5, 0.93):
        assert 1 / (1 + math.exp(-threshold_logit(t))) == pytest.approx(t, abs=1e-12)


def test_run_on_source_writes_an_overlay_video_and_jsonl(task, tmp_path):
    video = _asset("video/car-detection.mp4")
    out, js = tmp_path / "seg.mp4", tmp_path / "seg.jsonl"
    stats = run_on_source(task, str(video), save=out, jsonl=js, progress=False, max_frames=4)
    assert stats.frames == 4 and {"preprocess", "infer", "postprocess"} <= set(stats.latency_ms)
    cap = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    assert len(frames) == 4 and frames[0].shape == (432, 768, 3)
    records = [json.loads(line) for line in js.read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    for r in records:
        seg = r["segmentation"]
        assert seg["size"] == [432, 768] and set(seg["classes"]) <= {"background", "thing"}
        assert sum(seg["fractions"].values()) == pytest.approx(1.0, abs=1e-4)


def test_cli_run_on_an_image(exported, tmp_path):
    from click.testing import CliRunner

    from vlexport.cli import cli

    save, js = tmp_path / "bus_seg.jpg", tmp_path / "bus.jsonl"
    r = CliRunner().invoke(cli, ["run", str(exported[0]), "--source", str(_asset("images/bus.jpg")),
                                 "--save", str(save), "--jsonl", str(js), "--no-progress", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert cv2.imread(str(save)).shape == (1080, 810, 3)
    record = json.loads(js.read_text())
    assert record["segmentation"]["size"] == [1080, 810]


def test_bad_options_are_usage_errors(exported):
    root = exported[0]
    with pytest.raises(UsageError, match="unknown binary segment option"):
        vr.load(root, score_threshold=0.3)
    for bad in (0.0, 1.0, 1.5, "0.5", True):
        with pytest.raises(UsageError, match="threshold"):
            BinarySegmentTask(root, threshold=bad)
    with vr.load(root, threads=1) as t, pytest.raises(UsageError, match="HxWx3 uint8"):
        t.segment(np.zeros((10, 10), np.uint8))
