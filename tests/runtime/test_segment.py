"""SegmentTask (SCLIP-style sliding window) end to end on a tiny real ONNX segmenter, and its helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from conftest import _sha  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vlexport.errors import BundleError, UsageError  # noqa: E402
from vlexport.runtime.results import FrameStamp  # noqa: E402
from vlexport.runtime.segmentation import Segmentation, class_colors, draw_segmentation  # noqa: E402
from vlexport.runtime.tasks.segment import (  # noqa: E402
    SegmentTask,
    labels_from_logits,
    resize_short_side,
    stitch,
    window_grid,
)

CLASSES = ["red", "green", "blue"]
QUERY_CHANNELS = [0, 1, 2, 1]  # query q is the normalised RGB channel QUERY_CHANNELS[q]
QUERY_TO_CLASS = [0, 1, 2, 1]  # query 3 is a synonym of "green"
MEAN = [122.771, 116.746, 104.094]
STD = [68.501, 66.632, 70.323]
CROP, STRIDE, SHORT = 224, 112, 336


def make_segmenter(path: Path, batch: int | str = "crops", crop: int = CROP) -> Path:
    """crops [n,3,c,c] -> logits [n,Q,c,c]: query q's logit is input channel QUERY_CHANNELS[q] / 4."""
    idx = numpy_helper.from_array(np.asarray(QUERY_CHANNELS, np.int64), name="idx_v")
    quarter = numpy_helper.from_array(np.asarray(0.25, np.float32), name="q_v")
    nodes = [
        helper.make_node("Constant", [], ["idx"], value=idx),
        helper.make_node("Constant", [], ["quarter"], value=quarter),
        helper.make_node("Gather", ["crops", "idx"], ["g"], axis=1),
        helper.make_node("Mul", ["g", "quarter"], ["logits"]),
    ]
    q = len(QUERY_CHANNELS)
    graph = helper.make_graph(
        nodes,
        "tiny_segmenter",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, [batch, 3, crop, crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, q, crop, crop])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_seg_bundle(root: Path, *, batch: int | str = "crops", segment: dict[str, Any] | None = None,
                     short_side: int = SHORT) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    make_segmenter(root / "segmenter.onnx", batch=batch)
    q = len(QUERY_CHANNELS)
    seg = {"slide_crop": CROP, "slide_stride": STRIDE, "logit_scale": 40.0, "prob_threshold": 0.0,
           "background_index": None, "query_to_class": QUERY_TO_CLASS}
    seg.update(segment or {})
    manifest = {
        "schema": "vlexport.bundle/1",
        "family": "sclip",
        "task": "segment",
        "preset": "tiny",
        "preprocess": {"resize": "short_side", "short_side": short_side, "color": "RGB", "scale": 1.0,
                       "mean": MEAN, "std": STD},
        "segment": seg,
        "vocabulary": {"classes": CLASSES, "templates": "none", "mode": "baked"},
        "parts": {
            "segmenter": {
                "inputs": [{"name": "crops", "dtype": "float32", "shape": [batch, 3, CROP, CROP]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": [batch, q, CROP, CROP]}],
                "files": {"fp32": "segmenter.onnx"},
                "engines": {},
            }
        },
        "files": {"segmenter.onnx": _sha(root / "segmenter.onnx")},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def reference_labels(bgr: np.ndarray, scale: float = 40.0, thd: float = 0.0, bg: int | None = None) -> np.ndarray:
    """The whole pipeline written out directly (full softmax, synonym max), without the graph."""
    img = resize_short_side(bgr, SHORT)
    H, W = img.shape[:2]
    x = (img[:, :, ::-1].astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    logits = x.transpose(2, 0, 1)[QUERY_CHANNELS] * np.float32(0.25)  # [Q, H, W], no windows needed
    h, w = bgr.shape[:2]
    up = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in logits]) * np.float32(scale)
    e = np.exp(up - up.max(0, keepdims=True))
    p = e / e.sum(0, keepdims=True)
    q2c = np.asarray(QUERY_TO_CLASS)
    cls_p = np.stack([p[q2c == c].max(0) for c in range(len(CLASSES))])
    lab = cls_p.argmax(0)
    if bg is not None and thd > 0:
        lab[cls_p.max(0) < thd] = bg
    return lab


def halves(h: int = 300, w: int = 500) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (255, 0, 0)  # BGR blue
    img[:, w // 2 :] = (0, 0, 255)  # BGR red
    return img


def smooth_noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


# -- helpers ------------------------------------------------------------------------------------
def test_window_grid_336x448() -> None:
    wins = window_grid(336, 448, 224, 112)
    assert len(wins) == 6
    assert wins == [(0, 224, 0, 224), (0, 224, 112, 336), (0, 224, 224, 448),
                    (112, 336, 0, 224), (112, 336, 112, 336), (112, 336, 224, 448)]


def test_window_grid_shifts_last_window_and_refuses_small_images() -> None:
    wins = window_grid(336, 500, 224, 112)  # 500: windows at 0, 112, 224 and 276 (shifted back)
    assert sorted({(x1, x2) for _, _, x1, x2 in wins}) == [(0, 224), (112, 336), (224, 448), (276, 500)]
    with pytest.raises(ValueError, match="smaller than"):
        window_grid(200, 448, 224, 112)


def test_stitch_averages_overlaps() -> None:
    windows = [(0, 2, 0, 2), (0, 2, 1, 3)]  # 2x3 image, column 1 covered twice
    logits = np.stack([np.full((1, 2, 2), 1.0, np.float32), np.full((1, 2, 2), 3.0, np.float32)])
    out = stitch(logits, windows, 2, 3)
    assert out.shape == (1, 2, 3)
    np.testing.assert_allclose(out[0], [[1, 2, 3], [1, 2, 3]])


def test_resize_short_side_rounding() -> None:
    img = np.zeros((300, 500, 3), np.uint8)
    assert resize_short_side(img, 336).shape == (336, 560, 3)  # 500 * 1.12 = 560
    img = np.zeros((333, 201, 3), np.uint8)  # s = 336/201: w 336, h int(333*1.6716+0.5) = 557
    assert resize_short_side(img, 336).shape == (557, 336, 3)


def test_labels_from_logits_matches_direct_softmax() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 20, 30)).astype(np.float32)
    q2c = np.array([0, 1, 1, 2, 0])
    got = labels_from_logits(logits, (45, 61), q2c, 10.0, prob_threshold=0.6, background_index=2)
    up = np.stack([cv2.resize(c, (61, 45), interpolation=cv2.INTER_LINEAR) for c in logits]) * 10.0
    p = np.exp(up - up.max(0)) / np.exp(up - up.max(0)).sum(0)
    cls_p = np.stack([p[q2c == c].max(0) for c in range(3)])
    want = cls_p.argmax(0)
    want[cls_p.max(0) < 0.6] = 2
    np.testing.assert_array_equal(got, want)
    assert (cls_p.max(0) < 0.6).any()  # the threshold really did something


# -- the task -----------------------------------------------------------------------------------
@pytest.fixture
def seg_bundle(tmp_path: Path) -> Path:
    return write_seg_bundle(tmp_path / "seg")


def test_segment_halves_end_to_end(seg_bundle: Path) -> None:
    img = halves()
    with SegmentTask(seg_bundle, threads=1) as task:
        stamp = FrameStamp(3, 1.0, 2.0)
        seg = task.segment(img, stamp)
        assert task.last_windows == 2 * 4  # resized to 336x560: 2 rows x 4 columns
        assert set(task.timings) == {"preprocess", "infer", "postprocess"}
        assert task.describe()["queries"] == 4
    assert isinstance(seg, Segmentation) and seg.stamp is stamp
    assert seg.label_map.shape == (300, 500) and seg.label_map.dtype == np.int32
    assert (seg.label_map[:, :245] == CLASSES.index("blue")).all()
    assert (seg.label_map[:, 255:] == CLASSES.index("red")).all()
    fr = seg.fractions()
    assert set(fr) == {"red", "blue"} and abs(sum(fr.values()) - 1.0) < 1e-9
    assert abs(fr["blue"] - 0.5) < 0.01
    d = seg.to_dict()
    json.dumps(d)
    assert d["frame"] == 3 and d["size"] == [300, 500] and set(d["classes"]) == {"red", "blue"}
    over = draw_segmentation(img, seg)
    assert over.shape == img.shape and over.dtype == np.uint8 and not np.array_equal(over, img)


def test_segment_matches_reference_pipeline(seg_bundle: Path) -> None:
    img = smooth_noise(257, 391)
    with SegmentTask(seg_bundle, threads=1) as task:
        got = task.segment(img).label_map
    want = reference_labels(img)
    # Windows overlap with identical values (the graph is per-pixel), so stitching is exact up to
    # float rounding; allow a handful of near-tie pixels.
    assert (got != want).mean() < 1e-3
    assert len(np.unique(got)) >= 2


def test_prob_threshold_override_sets_background(tmp_path: Path) -> None:
    root = write_seg_bundle(tmp_path / "bg", segment={"background_index": 0})
    img = smooth_noise(240, 320, seed=2)
    with SegmentTask(root, threads=1, prob_threshold=0.9, logit_scale=2.0) as task:
        got = task.segment(img).label_map
    want = reference_labels(img, scale=2.0, thd=0.9, bg=0)
    assert (got != want).mean() < 1e-3
    assert (got == 0).mean() > 0.2


def test_fixed_batch_model_runs_in_chunks(tmp_path: Path, seg_bundle: Path) -> None:
    root = write_seg_bundle(tmp_path / "b4", batch=4)
    img = smooth_noise(300, 500, seed=3)  # 8 windows -> 2 runs of 4
    with SegmentTask(root, threads=1) as fixed, SegmentTask(seg_bundle, threads=1) as dyn:
        np.testing.assert_array_equal(fixed.segment(img).label_map, dyn.segment(img).label_map)
    root3 = write_seg_bundle(tmp_path / "b3", batch=3)  # 8 windows -> 3 + 3 + 2 (padded)
    with SegmentTask(root3, threads=1) as fixed3, SegmentTask(seg_bundle, threads=1) as dyn:
        np.testing.assert_array_equal(fixed3.segment(img).label_map, dyn.segment(img).label_map)


def test_segment_batch_and_bad_input(seg_bundle: Path) -> None:
    with SegmentTask(seg_bundle, threads=1) as task:
        out = task.segment_batch([halves(), halves(240, 260)])
        assert [s.label_map.shape for s in out] == [(300, 500), (240, 260)]
        assert task.segment_batch([]) == []
        with pytest.raises(UsageError, match="uint8"):
            task.segment(halves().astype(np.float32))
        with pytest.raises(UsageError, match="HxWx3"):
            task.segment(np.zeros((10, 10), np.uint8))
        with pytest.raises(UsageError, match="single array"):
            task.segment_batch(halves())


def test_bad_options_and_manifests(tmp_path: Path, seg_bundle: Path) -> None:
    with pytest.raises(UsageError, match="unknown segment option"):
        SegmentTask(seg_bundle, score_threshold=0.5)
    with pytest.raises(UsageError, match="prob_threshold"):
        SegmentTask(seg_bundle, prob_threshold=1.5)
    with pytest.raises(UsageError, match="background"):
        SegmentTask(seg_bundle, prob_threshold=0.5)  # no background class in this bundle
    with pytest.raises(BundleError, match="short_side"):
        SegmentTask(write_seg_bundle(tmp_path / "small", short_side=200))
    with pytest.raises(BundleError, match="query_to_class"):
        SegmentTask(write_seg_bundle(tmp_path / "q2c", segment={"query_to_class": [0, 1, 5, 1]}))
    with pytest.raises(BundleError, match="logits"):
        SegmentTask(write_seg_bundle(tmp_path / "q3", segment={"query_to_class": [0, 1, 2]}))


# -- results and drawing --------------------------------------------------------------------------
def test_segmentation_validation_and_colors() -> None:
    with pytest.raises(ValueError, match="integer"):
        Segmentation(np.zeros((2, 2), np.float32), ["a"])
    with pytest.raises(ValueError, match="values span"):
        Segmentation(np.array([[0, 3]]), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        Segmentation(np.zeros((2, 2, 1), np.int32), ["a"])
    seg = Segmentation(np.array([[0, 0, 1, 1]]), ["a", "b", "c"])
    assert seg.fractions() == {"a": 0.5, "b": 0.5}
    c = class_colors(40)
    assert c.shape == (40, 3) and c.dtype == np.uint8
    np.testing.assert_array_equal(c, class_colors(40))
    assert len({tuple(x) for x in c.tolist()}) == 40
    img = np.full((1, 4, 3), 100, np.uint8)
    np.testing.assert_array_equal(draw_segmentation(img, seg, alpha=0.0, legend=False), img)
    with pytest.raises(ValueError, match="label map"):
        draw_segmentation(np.zeros((2, 4, 3), np.uint8), seg)
