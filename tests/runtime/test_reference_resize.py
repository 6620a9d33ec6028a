"""The runtime resizes as the reference pre-processing does: Pillow's filters, not OpenCV's.

DETR's evaluation transform resizes a PIL RGB image with ``torchvision.transforms.functional.resize``
(Pillow's bilinear filter, antialiased when shrinking); open_clip's (the captioner's CLIP tower)
is ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL image. Each photo is decoded once
with OpenCV and the same array goes to both sides (OpenCV's and Pillow's JPEG decoders differ).
Pixels are compared in grey levels after undoing the normalisation: the only difference left is
float32 rounding (about 1e-4 grey levels), so ``GREY_TOL`` is far below one level (1/255).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from vlexport.errors import UsageError
from vlexport.runtime.detr_preprocess import IMAGENET_MEAN, IMAGENET_STD, detr_preprocess, detr_resize_size
from vlexport.runtime.preprocess import PIL_FILTERS, pil_resize
from vlexport.runtime.tasks.caption import clip_preprocess

PHOTOS = ["apple.jpg", "bus.jpg", "messi5.jpg", "road.jpg", "smarties.png", "zidane.jpg"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
#: Largest difference in grey levels (0..255) between the runtime's pixels and the reference's.
GREY_TOL = 1e-3


def _read(assets, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(BGR as OpenCV decodes it, the same pixels as a contiguous RGB array)."""
    bgr = cv2.imread(str(assets / "images" / name), cv2.IMREAD_COLOR)
    assert bgr is not None, name
    return bgr, np.ascontiguousarray(bgr[:, :, ::-1])


def _grey_levels(chw: np.ndarray, mean, std, scale: float = 255.0) -> np.ndarray:
    """Undo ``(x / 255 - mean) / std``: HxWx3 float64 grey levels."""
    x = chw.astype(np.float64).transpose(1, 2, 0)
    return (x * np.asarray(std) + np.asarray(mean)) * scale


def _clip_reference(rgb: np.ndarray, size: int) -> np.ndarray:
    """Pillow bicubic of the short side to ``size``, torchvision's centre-crop offsets, as uint8 RGB."""
    h, w = rgb.shape[:2]
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return img[top : top + size, left : left + size]


# -- DETR ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PHOTOS)
def test_detr_preprocess_is_pillows_bilinear_resize(assets, name) -> None:
    bgr, rgb = _read(assets, name)
    w, h = detr_resize_size(bgr.shape[1], bgr.shape[0])
    want = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR)).astype(np.float64)
    x, resized = detr_preprocess(bgr)
    assert resized == (w, h) and x.shape == (3, h, w) and x.dtype == np.float32
    diff = np.abs(_grey_levels(x, IMAGENET_MEAN, IMAGENET_STD) - want)
    assert diff.max() <= GREY_TOL, f"{name}: {diff.max():.4f} grey levels from Pillow's bilinear resize"


def test_detr_preprocess_is_torchvisions_eval_transform(assets) -> None:
    """DETR's own transform (functional.resize on the PIL image, ToTensor, Normalize) on two photos."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    for name in ("bus.jpg", "zidane.jpg"):  # one shrunk, one enlarged
        bgr, rgb = _read(assets, name)
        x, (w, h) = detr_preprocess(bgr)
        ref = tvf.normalize(tvf.to_tensor(tvf.resize(Image.fromarray(rgb), [h, w])), IMAGENET_MEAN, IMAGENET_STD)
        np.testing.assert_allclose(x, ref.numpy(), rtol=0, atol=1e-5, err_msg=name)


# -- captioner (open_clip's transform) ----------------------------------------------------------
@pytest.mark.parametrize("name", PHOTOS)
def test_clip_preprocess_is_pillows_bicubic_resize_and_centre_crop(assets, name) -> None:
    bgr, rgb = _read(assets, name)
    x, info = clip_preprocess(bgr, CLIP_SIZE, CLIP_MEAN, CLIP_STD)
    want = _clip_reference(rgb, CLIP_SIZE).astype(np.float64)
    diff = np.abs(_grey_levels(x[0], CLIP_MEAN, CLIP_STD) - want)
    assert diff.max() <= GREY_TOL, f"{name}: {diff.max():.4f} grey levels from Pillow's bicubic resize + crop"


def test_clip_preprocess_is_open_clips_eval_transform(assets) -> None:
    open_clip = pytest.importorskip("open_clip")
    transform = open_clip.image_transform(CLIP_SIZE, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    for name in PHOTOS:
        bgr, rgb = _read(assets, name)
        x, _ = clip_preprocess(bgr, CLIP_SIZE, CLIP_MEAN, CLIP_STD)
        ref = transform(Image.fromarray(rgb)).numpy()
        np.testing.assert_allclose(x[0], ref, rtol=0, atol=1e-5, err_msg=name)


# -- why: OpenCV's filters are not the reference -------------------------------------------------
def test_opencv_filters_fail_these_checks(assets) -> None:
    """The former runtime resizes (INTER_AREA/INTER_LINEAR for DETR, INTER_CUBIC for the captioner)
    are off by at least one grey level on every photo, and DETR's by more when it shrinks."""
    for name in PHOTOS:
        bgr, rgb = _read(assets, name)
        w, h = detr_resize_size(bgr.shape[1], bgr.shape[0])
        shrinking = w * h < bgr.shape[0] * bgr.shape[1]
        old = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)[:, :, ::-1]
        ref = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        detr_max = np.abs(old.astype(int) - ref).max()
        assert detr_max > (1 if shrinking else 0), (name, detr_max)
        nw, nh = (CLIP_SIZE, int(CLIP_SIZE * h / w)) if w <= h else (int(CLIP_SIZE * w / h), CLIP_SIZE)
        old_clip = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_CUBIC)[:, :, ::-1]
        ref_clip = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BICUBIC))
        assert np.abs(old_clip.astype(int) - ref_clip).max() > 1, name


# -- pil_resize ----------------------------------------------------------------------------------
def test_pil_resize_ignores_channel_order_and_keeps_a_right_sized_image() -> None:
    img = np.random.default_rng(0).integers(0, 256, size=(31, 47, 3), dtype=np.uint8)
    for interpolation in PIL_FILTERS:
        out = pil_resize(img, (20, 13), interpolation)
        assert out.shape == (13, 20, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(pil_resize(img[:, :, ::-1], (20, 13), interpolation), out[:, :, ::-1])
    assert pil_resize(img, (47, 31), "bilinear") is img
    with pytest.raises(UsageError, match="unknown interpolation 'cubic'"):
        pil_resize(img, (20, 13), "cubic")
    with pytest.raises(UsageError, match="must be positive"):
        pil_resize(img, (0, 13), "bilinear")
