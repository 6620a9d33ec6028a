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
from vlexport.runtime.tasks import segment as segment_module  # noqa: E402
from vlexport.runtime.tasks.segment import (  # noqa: E402
    SegmentTask,
    labels_from_logits,
    probabilities_from_logits,
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


def make_segmenter(path: Path, batch: int | str = "crops", crop: int = CROP, dynamic_crop: bool = False) -> Path:
    """crops [n,3,c,c] -> logits [n,Q,c,c]: query q's logit is input channel QUERY_CHANNELS[q] / 4.

    ``dynamic_crop``: the crop's height and width are named axes (any window size)."""
    hw: list[int | str] = ["crop_height", "crop_width"] if dynamic_crop else [crop, crop]
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
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, [batch, 3, *hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, q, *hw])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_seg_bundle(root: Path, *, batch: int | str = "crops", segment: dict[str, Any] | None = None,
                     short_side: int = SHORT, max_long_side: int | None = None, dynamic_crop: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    make_segmenter(root / "segmenter.onnx", batch=batch, dynamic_crop=dynamic_crop)
    hw: list[int | str] = ["crop_height", "crop_width"] if dynamic_crop else [CROP, CROP]
    q = len(QUERY_CHANNELS)
    seg = {"slide_crop": CROP, "slide_stride": STRIDE, "logit_scale": 40.0, "prob_threshold": 0.0,
           "background_index": None, "query_to_class": QUERY_TO_CLASS}
    seg.update(segment or {})
    pre: dict[str, Any] = {"resize": "short_side", "short_side": short_side, "color": "RGB", "scale": 1.0,
                           "mean": MEAN, "std": STD}
    if max_long_side is not None:
        pre["max_long_side"] = max_long_side
    manifest = {
        "schema": "vlexport.bundle/1",
        "family": "sclip",
        "task": "segment",
        "preset": "tiny",
        "preprocess": pre,
        "segment": seg,
        "vocabulary": {"classes": CLASSES, "templates": "none", "mode": "baked"},
        "parts": {
            "segmenter": {
                "inputs": [{"name": "crops", "dtype": "float32", "shape": [batch, 3, *hw]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": [batch, q, *hw]}],
                "files": {"fp32": "segmenter.onnx"},
                "engines": {},
            }
        },
        "files": {"segmenter.onnx": _sha(root / "segmenter.onnx")},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def reference_probs(bgr: np.ndarray, scale: float = 40.0, area: float = 0.0, bg: int = 0,
                    max_long: int | None = None) -> np.ndarray:
    """Class probabilities [C, h, w] of the whole pipeline written out directly (mmcv rescale size,
    full softmax, synonym max, SCLIP's area_thd with class ``bg`` as background), without the graph."""
    h, w = bgr.shape[:2]
    s = SHORT / min(h, w) if max_long is None else min(max_long / max(h, w), SHORT / min(h, w))
    img = cv2.resize(bgr, (int(w * s + 0.5), int(h * s + 0.5)), interpolation=cv2.INTER_LINEAR)
    x = (img[:, :, ::-1].astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    logits = x.transpose(2, 0, 1)[QUERY_CHANNELS] * np.float32(0.25)  # [Q, H, W], no windows needed
    up = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in logits]) * np.float32(scale)
    e = np.exp(up - up.max(0, keepdims=True))
    p = e / e.sum(0, keepdims=True)
    q2c = np.asarray(QUERY_TO_CLASS)
    cls_p = np.stack([p[q2c == c].max(0) for c in range(len(CLASSES))])
    if area > 0:
        counts = np.bincount(cls_p.argmax(0).ravel(), minlength=len(CLASSES)).astype(np.float32)
        fg = np.arange(len(CLASSES)) != bg
        cls_p[fg & (counts <= np.float32(area) * counts[fg].sum())] = 0
    return cls_p


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


def test_window_grid_shifts_last_window_and_spans_small_sides() -> None:
    wins = window_grid(336, 500, 224, 112)  # 500: windows at 0, 112, 224 and 276 (shifted back)
    assert sorted({(x1, x2) for _, _, x1, x2 in wins}) == [(0, 224), (112, 336), (224, 448), (276, 500)]
    # A side shorter than the crop gets one window spanning it (SCLIP's grid): 200 x 224 windows.
    assert window_grid(200, 448, 224, 112) == [(0, 200, 0, 224), (0, 200, 112, 336), (0, 200, 224, 448)]
    assert window_grid(50, 60, 224, 112) == [(0, 50, 0, 60)]


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


def test_resize_short_side_caps_the_long_side() -> None:
    # mmcv rescale_size: s = min(max_long / long, short / short_side), size int(x * s + 0.5).
    thin = np.zeros((100, 1000, 3), np.uint8)
    assert resize_short_side(thin, 336).shape == (336, 3360, 3)  # no cap (manifests without max_long_side)
    assert resize_short_side(thin, 336, 2048).shape == (205, 2048, 3)  # SCLIP's (2048, 336)
    assert resize_short_side(np.zeros((300, 2400, 3), np.uint8), 336, 2048).shape == (256, 2048, 3)
    assert resize_short_side(np.zeros((300, 500, 3), np.uint8), 336, 2048).shape == (336, 560, 3)  # not reached


def _direct_area(logits: np.ndarray, out_hw: tuple[int, int], q2c: np.ndarray, scale: float, area: float,
                 thd: float, bg: int) -> tuple[np.ndarray, np.ndarray]:
    """SCLIP's postprocess_result on the full [C, H, W] probabilities: labels and probabilities."""
    H, W = out_hw
    up = np.stack([cv2.resize(c, (W, H), interpolation=cv2.INTER_LINEAR) for c in logits]) * np.float32(scale)
    e = np.exp(up - up.max(0))
    p = e / e.sum(0)
    cls_p = np.stack([p[q2c == c].max(0) for c in range(int(q2c.max()) + 1)])
    if area > 0:
        counts = np.bincount(cls_p.argmax(0).ravel(), minlength=len(cls_p)).astype(np.float32)
        fg = np.arange(len(cls_p)) != bg
        cls_p[fg & (counts <= np.float32(area) * counts[fg].sum())] = 0
    lab = cls_p.argmax(0)
    if thd > 0:
        lab[cls_p.max(0) < thd] = bg
    return lab, cls_p


@pytest.mark.parametrize("chunk_bytes", [None, 10_000])  # one pass over all queries / 2 queries per chunk
def test_area_threshold_labels_and_probabilities_match_direct(monkeypatch, chunk_bytes) -> None:
    if chunk_bytes is not None:
        monkeypatch.setattr(segment_module, "_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 12, 16)).astype(np.float32)
    logits[4] -= 0.8  # class 3 (one query) wins a small area: the area threshold drops it
    q2c = np.array([0, 1, 1, 2, 3, 0])
    out_hw, scale, area = (30, 41), 3.0, 0.2
    for thd in (0.0, 0.45):
        got = labels_from_logits(logits, out_hw, q2c, scale, prob_threshold=thd, background_index=0,
                                 area_threshold=area)
        want, want_p = _direct_area(logits, out_hw, q2c, scale, area, thd, 0)
        np.testing.assert_array_equal(got, want)
        plain, _ = _direct_area(logits, out_hw, q2c, scale, 0.0, thd, 0)
        assert (plain == 3).any() and not (want == 3).any()  # the threshold really dropped class 3
        probs = probabilities_from_logits(logits, out_hw, q2c, scale, background_index=0, area_threshold=area,
                                          num_classes=4)
        assert probs.shape == (4, 30, 41) and probs.dtype == np.float32
        np.testing.assert_allclose(probs, want_p, atol=1e-5)  # float32 online softmax vs direct
        assert (probs[3] == 0).all()
    assert not (_direct_area(logits, out_hw, q2c, scale, 0.0, 0.45, 0)[0] == want).all()  # and so did prob_thd


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


def test_long_side_cap_and_windows_smaller_than_the_crop(tmp_path: Path) -> None:
    """max_long_side from the manifest; a capped side below the crop gets min(crop, side) windows."""
    root = write_seg_bundle(tmp_path / "cap", max_long_side=500, dynamic_crop=True)
    with SegmentTask(root, threads=1) as task:
        for (h, w), resized, window in (((100, 1000), (50, 500), (50, 224)), ((1000, 100), (500, 50), (224, 50))):
            img = smooth_noise(h, w, seed=4)
            crops, windows, hw = task.preprocess(img)
            assert hw == resized and crops.shape[1:] == (3, *window) and len(windows) == 4
            got = task.segment(img).label_map
            want = reference_probs(img, max_long=500).argmax(0)
            assert got.shape == (h, w) and (got != want).mean() < 1e-3
            assert len(np.unique(got)) >= 2


def test_fixed_crop_segmenter_refuses_thin_frames(tmp_path: Path) -> None:
    root = write_seg_bundle(tmp_path / "fixed", max_long_side=500)  # a [n, 3, 224, 224] graph, as old exports
    with SegmentTask(root, threads=1) as task:
        assert task.segment(smooth_noise(300, 400)).label_map.shape == (300, 400)  # 336x448: full crops
        with pytest.raises(BundleError, match="re-export"):
            task.segment(smooth_noise(100, 1000))  # 50x500: 50x224 windows


def test_area_threshold_and_probabilities_end_to_end(tmp_path: Path) -> None:
    img = smooth_noise(240, 320, seed=7)  # "green" wins 42 % of the non-background pixels, "blue" 58 %
    root = write_seg_bundle(tmp_path / "area", segment={"background_index": 0, "area_threshold": 0.45})
    plain = reference_probs(img).argmax(0)
    want_p = reference_probs(img, area=0.45)
    want = want_p.argmax(0)
    assert (plain != want).mean() > 0.01  # the threshold drops a class here
    with SegmentTask(root, threads=1) as task:
        assert task.settings["area_threshold"] == 0.45
        seg = task.segment(img)
        assert seg.probabilities is None
        assert (seg.label_map != want).mean() < 1e-3
        with_p = task.segment(img, return_probabilities=True)
        probs = task.probabilities(img)
    assert probs.shape == (len(CLASSES), 240, 320) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, want_p, atol=1e-5)
    np.testing.assert_array_equal(with_p.probabilities, probs)
    np.testing.assert_array_equal(with_p.label_map, probs.argmax(0))
    assert (with_p.label_map != seg.label_map).mean() < 1e-3
    # As a runtime override, with the probability threshold on top (best remaining probability).
    root2 = write_seg_bundle(tmp_path / "bg", segment={"background_index": 0})
    with SegmentTask(root2, threads=1, area_threshold=0.45, prob_threshold=0.7) as task:
        got = task.segment(img).label_map
        got_p = task.segment(img, return_probabilities=True)
    want2 = want.copy()
    want2[want_p.max(0) < 0.7] = 0
    assert (want2 != want).mean() > 0.01 and (got != want2).mean() < 1e-3
    np.testing.assert_array_equal(got_p.label_map, np.where(got_p.probabilities.max(0) < 0.7, 0,
                                                            got_p.probabilities.argmax(0)))


def test_area_threshold_options_are_checked(seg_bundle: Path) -> None:
    with pytest.raises(UsageError, match="area_threshold .* background"):
        SegmentTask(seg_bundle, area_threshold=0.1)  # no background class in this bundle
    with pytest.raises(UsageError, match="between 0 and 1"):
        SegmentTask(seg_bundle, area_threshold=1.5)
    with pytest.raises(ValueError, match="probabilities"):
        Segmentation(np.zeros((2, 3), np.int32), ["a", "b"], probabilities=np.zeros((2, 3, 2), np.float32))


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
