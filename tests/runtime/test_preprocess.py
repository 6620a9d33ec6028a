"""Letterbox geometry, tensor layout and the inverse box mapping."""

from __future__ import annotations

import numpy as np
import pytest

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.preprocess import LetterboxInfo, Preprocessor, letterbox, scale_boxes_to_source


def test_letterbox_hand_computed_portrait() -> None:
    # 810x1080 (w x h) into 640x640: r = 640/1080, resized to 480x640, 80 px of padding each side.
    img = np.zeros((1080, 810, 3), np.uint8)
    out, info = letterbox(img, (640, 640))
    assert out.shape == (640, 640, 3)
    assert info == LetterboxInfo(scale=640 / 1080, pad_x=80, pad_y=0, src_shape=(1080, 810), resized=(480, 640))
    assert (out[:, :80] == 114).all() and (out[:, 560:] == 114).all()
    assert (out[:, 80:560] == 0).all()


def test_letterbox_odd_padding_goes_bottom_right() -> None:
    # 200x97 into 64x64: r = 0.32, resized 64x31, 33 rows of padding: 16 on top, 17 below.
    img = np.zeros((97, 200, 3), np.uint8)
    out, info = letterbox(img, (64, 64), pad_value=7)
    assert info.resized == (64, 31) and (info.pad_x, info.pad_y) == (0, 16)
    assert (out[:16] == 7).all() and (out[16:47] == 0).all() and (out[47:] == 7).all()


def test_letterbox_non_square_target_and_thin_image() -> None:
    out, info = letterbox(np.zeros((1, 3000, 3), np.uint8), (384, 640))
    assert out.shape == (384, 640, 3)
    assert info.resized == (640, 1)  # at least one pixel high
    assert info.pad_y == round((384 - 1) / 2 - 0.1)


def test_letterbox_matches_ultralytics() -> None:
    augment = pytest.importorskip("ultralytics.data.augment")
    rng = np.random.default_rng(0)
    for h, w in [(1080, 810), (432, 768), (97, 200), (333, 517), (640, 640), (1, 3000), (100, 101)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for size in [(640, 640), (384, 640), (320, 480)]:
            ours, _ = letterbox(img, size)
            ref = augment.LetterBox(size, auto=False, center=True)(image=img.copy())
            assert ours.shape == ref.shape and np.array_equal(ours, ref), (h, w, size)


def test_preprocessor_tensor_layout_and_values() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    pre = Preprocessor({"size": [320, 320], "scale": 1 / 255})
    tensor, info = pre(img)
    assert tensor.shape == (1, 3, 320, 320) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    lb, info2 = letterbox(img, (320, 320))
    assert info == info2
    expected = lb[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 255
    np.testing.assert_allclose(tensor[0], expected, atol=1e-6)


def test_preprocessor_mean_std_and_bgr() -> None:
    img = np.full((10, 10, 3), (10, 20, 30), np.uint8)  # B, G, R
    cfg = {"size": [10, 10], "scale": 1.0, "mean": [1, 2, 3], "std": [2, 4, 8], "color": "RGB"}
    tensor, _ = Preprocessor(cfg)(img)
    np.testing.assert_allclose(tensor[0, :, 0, 0], [(30 - 1) / 2, (20 - 2) / 4, (10 - 3) / 8])
    tensor, _ = Preprocessor({**cfg, "color": "BGR"})(img)
    np.testing.assert_allclose(tensor[0, :, 0, 0], [(10 - 1) / 2, (20 - 2) / 4, (30 - 3) / 8])


def test_preprocessor_padding_value_is_normalised() -> None:
    pre = Preprocessor({"size": [8, 8], "scale": 0.5, "mean": [1, 1, 1], "std": [2, 2, 2], "pad_value": 114})
    tensor, info = pre(np.zeros((4, 8, 3), np.uint8))
    assert info.pad_y == 2
    np.testing.assert_allclose(tensor[0, :, 0, :], (114 * 0.5 - 1) / 2)
    np.testing.assert_allclose(tensor[0, :, 2:6, :], -0.5)


def test_preprocessor_batch() -> None:
    pre = Preprocessor({"size": [16, 16]})
    a, b = np.zeros((16, 16, 3), np.uint8), np.full((8, 16, 3), 255, np.uint8)
    tensor, infos = pre.batch([a, b])
    assert tensor.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(tensor[0], pre(a)[0][0])
    np.testing.assert_array_equal(tensor[1], pre(b)[0][0])
    assert [i.pad_y for i in infos] == [0, 4]
    with pytest.raises(UsageError, match="empty"):
        pre.batch([])


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (np.zeros((10, 10), np.uint8), "got shape (10, 10) dtype uint8"),
        (np.zeros((10, 10, 3), np.float32), "got shape (10, 10, 3) dtype float32"),
        (np.zeros((10, 10, 4), np.uint8), "got shape (10, 10, 4)"),
        ([[1, 2, 3]], "got list"),
    ],
)
def test_preprocessor_rejects_non_images(bad, fragment: str) -> None:
    with pytest.raises(UsageError) as e:
        Preprocessor({"size": [8, 8]})(bad)
    assert fragment in str(e.value)


def test_preprocessor_rejects_unknown_config() -> None:
    with pytest.raises(BundleError, match="resize"):
        Preprocessor({"size": [8, 8], "resize": "stretch"})
    with pytest.raises(BundleError, match="color"):
        Preprocessor({"size": [8, 8], "color": "HSV"})
    with pytest.raises(BundleError, match="size"):
        Preprocessor({})


def test_scale_boxes_round_trip() -> None:
    src = np.array([[10.5, 20.25, 300.0, 400.0], [0.0, 0.0, 810.0, 1080.0]], np.float32)
    _, info = letterbox(np.zeros((1080, 810, 3), np.uint8), (640, 640))
    gx, gy = info.gain_xy
    forward = src.copy()
    forward[:, [0, 2]] = forward[:, [0, 2]] * gx + info.pad_x
    forward[:, [1, 3]] = forward[:, [1, 3]] * gy + info.pad_y
    back = scale_boxes_to_source(forward, info)
    np.testing.assert_allclose(back, src, atol=1e-3)
    assert back is not forward and back.dtype == np.float32


def test_scale_boxes_clips_to_source() -> None:
    _, info = letterbox(np.zeros((1080, 810, 3), np.uint8), (640, 640))
    boxes = np.array([[0, -5, 100, 700]], np.float32)  # starts in the left pad, ends below the image
    out = scale_boxes_to_source(boxes, info)
    assert out[0, 0] == 0 and out[0, 1] == 0 and out[0, 3] == 1080
    np.testing.assert_allclose(out[0, 2], (100 - 80) * 1.6875)
