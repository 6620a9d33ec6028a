"""Image pre-processing from a bundle's ``preprocess`` config: letterbox, colour, scale, layout.

``letterbox`` matches Ultralytics' ``LetterBox(auto=False, center=True)`` pixel for pixel, so a
bundle exported from an Ultralytics model sees the same tensors at run time as at validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from vlexport.errors import BundleError, UsageError

__all__ = ["LetterboxInfo", "letterbox", "letterbox_params", "Preprocessor", "scale_boxes_to_source", "check_image",
           "PIL_FILTERS", "pil_resize"]

#: Pillow's resampling filters, by the names torchvision's ``InterpolationMode`` gives them.
PIL_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")


@dataclass(frozen=True)
class LetterboxInfo:
    """How a source image was placed in the model input, to map boxes back.

    ``scale`` is the resize ratio ``r``; ``pad_x``/``pad_y`` the left/top padding in input pixels;
    ``src_shape`` the source ``(height, width)``; ``resized`` the ``(width, height)`` after the
    resize (each side rounded, so the exact per-axis gain is ``resized / src``).
    """

    scale: float
    pad_x: int
    pad_y: int
    src_shape: tuple[int, int]
    resized: tuple[int, int]

    @property
    def gain_xy(self) -> tuple[float, float]:
        """Exact per-axis resize gain (width, height); differs from ``scale`` by the rounding only."""
        h, w = self.src_shape
        return self.resized[0] / w, self.resized[1] / h


def check_image(image: Any, what: str = "image") -> np.ndarray:
    """Return ``image`` if it is an HxWx3 uint8 array, else raise a UsageError saying what it got."""
    if not isinstance(image, np.ndarray):
        raise UsageError(f"{what}: expected an HxWx3 uint8 BGR numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or image.shape[0] < 1 or image.shape[1] < 1:
        raise UsageError(
            f"{what}: expected an HxWx3 uint8 BGR array, got shape {tuple(image.shape)} dtype {image.dtype}"
        )
    return image


def pil_resize(image: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize an HxWx3 uint8 image to ``size`` ``(width, height)`` with Pillow's filter ``interpolation``.

    This is what ``torchvision.transforms.functional.resize`` does to a PIL image, the resize of
    DETR's and open_clip's reference pre-processing: ``Image.resize(size, filter)`` with no
    ``reducing_gap``, whose filter support grows with the scale when shrinking (antialiased).
    OpenCV's filters give other pixels (``INTER_LINEAR``/``INTER_CUBIC`` do not antialias,
    ``INTER_AREA`` is a box filter). Pillow filters every channel alike, so the channel order does
    not matter. The image comes back unchanged when it already has ``size``, else as a new
    (read-only) array.
    """
    from PIL import Image

    check_image(image)
    if interpolation not in PIL_FILTERS:
        raise UsageError(f"unknown interpolation {interpolation!r}; choose from {list(PIL_FILTERS)}")
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise UsageError(f"resize size must be positive, got {w}x{h}")
    if (w, h) == (image.shape[1], image.shape[0]):
        return image
    resample = getattr(Image.Resampling, interpolation.upper())
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), resample))


def letterbox_params(
    src_shape: tuple[int, int], size: tuple[int, int]
) -> tuple[LetterboxInfo, tuple[int, int, int, int]]:
    """Letterbox geometry for a source ``(h, w)`` into ``size`` ``(H, W)``: info and (top, bottom, left, right)."""
    h, w = int(src_shape[0]), int(src_shape[1])
    H, W = int(size[0]), int(size[1])
    r = min(H / h, W / w)
    # Same rounding as Ultralytics: each side rounded, at least 1 px; padding split with a -0.1/+0.1
    # bias so that an odd padding puts the extra pixel at the bottom/right.
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (W - new_w) / 2, (H - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    info = LetterboxInfo(scale=r, pad_x=left, pad_y=top, src_shape=(h, w), resized=(new_w, new_h))
    return info, (top, bottom, left, right)


def letterbox(
    bgr: np.ndarray, size: tuple[int, int] = (640, 640), pad_value: int = 114
) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize keeping the aspect ratio and pad to ``size`` ``(H, W)``; returns the image and its geometry."""
    info, (top, bottom, left, right) = letterbox_params(bgr.shape[:2], size)
    img = bgr
    if (bgr.shape[1], bgr.shape[0]) != info.resized:
        img = cv2.resize(bgr, info.resized, interpolation=cv2.INTER_LINEAR)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return img, info


def scale_boxes_to_source(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map xyxy boxes from model-input pixels to source pixels (undo padding and scale, clip).

    Returns a new float32 array; the input is not modified.
    """
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    gx, gy = info.gain_xy
    out[:, [0, 2]] = (out[:, [0, 2]] - info.pad_x) / gx
    out[:, [1, 3]] = (out[:, [1, 3]] - info.pad_y) / gy
    h, w = info.src_shape
    np.clip(out[:, 0::2], 0, w, out=out[:, 0::2])  # basic slices are views, so this clips in place
    np.clip(out[:, 1::2], 0, h, out=out[:, 1::2])
    return out


class Preprocessor:
    """Turns BGR uint8 frames into the model's input tensor, following a manifest ``preprocess`` dict.

    ``tensor = ((letterbox(image) in RGB) * scale - mean) / std``, laid out NCHW float32; or,
    after :meth:`emit_pixels`, the letterboxed pixels themselves as uint8 (for a graph whose input
    is the pixels' integer codes: the cpu target's INT8 graph).
    """

    def __init__(self, cfg: dict[str, Any]):
        try:
            size = cfg["size"]
            self.size: tuple[int, int] = (int(size[0]), int(size[1]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise BundleError(f"preprocess config needs 'size': [H, W], got {cfg.get('size')!r}") from e
        resize = cfg.get("resize", "letterbox")
        if resize != "letterbox":
            raise BundleError(f"preprocess resize {resize!r} is not supported by this runtime (only 'letterbox')")
        color = str(cfg.get("color", "RGB")).upper()
        if color not in ("RGB", "BGR"):
            raise BundleError(f"preprocess color {color!r} is not supported (expected 'RGB' or 'BGR')")
        self.color = color
        self.pad_value = int(cfg.get("pad_value", 114))
        scale = float(cfg.get("scale", 1 / 255))
        mean = np.asarray(cfg.get("mean", [0.0, 0.0, 0.0]), dtype=np.float64).reshape(-1)
        std = np.asarray(cfg.get("std", [1.0, 1.0, 1.0]), dtype=np.float64).reshape(-1)
        if mean.size not in (1, 3) or std.size not in (1, 3) or np.any(std == 0):
            raise BundleError(
                f"preprocess mean/std must have 1 or 3 values and std must be non-zero, got {mean}, {std}"
            )
        mean, std = np.broadcast_to(mean, 3), np.broadcast_to(std, 3)
        # Fold (x*scale - mean)/std into one multiply-add per channel: x*a + b. Channel order is the
        # model's (mean/std are given in the model's colour order).
        self._a = (scale / std).astype(np.float32).reshape(3, 1, 1)
        self._b = (-mean / std).astype(np.float32).reshape(3, 1, 1)
        self._uniform_a = bool(np.all(self._a == self._a[0]))
        self._has_b = bool(np.any(self._b != 0))
        self._pad = (self.pad_value * self._a + self._b).astype(np.float32)  # value of a padded pixel
        self.dtype: type = np.float32

    @property
    def pixel_step(self) -> float | None:
        """The tensor's value per pixel step when the normalisation is that one factor (no mean,
        one std for all channels), else None: only then can a graph take the pixels instead."""
        return float(self._a[0, 0, 0]) if self._uniform_a and not self._has_b else None

    def emit_pixels(self) -> None:
        """Produce uint8 pixels (letterboxed, in the model's colour order, NCHW) from now on."""
        if self.pixel_step is None:
            raise UsageError("this pre-processing subtracts a mean or scales channels apart: it has no pixel form")
        self.dtype = np.uint8

    def __call__(self, bgr: np.ndarray) -> tuple[np.ndarray, LetterboxInfo]:
        """One frame → (tensor ``[1, 3, H, W]`` float32 (or uint8 pixels) C-contiguous, letterbox info)."""
        out = np.empty((1, 3, *self.size), dtype=self.dtype)
        info = self._into(bgr, out[0])
        return out, info

    def batch(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxInfo]]:
        """Several frames → (tensor ``[N, 3, H, W]``, one info per frame)."""
        if len(images) == 0:
            raise UsageError("batch: got an empty list of images")
        out = np.empty((len(images), 3, *self.size), dtype=self.dtype)
        infos = [self._into(img, out[i]) for i, img in enumerate(images)]
        return out, infos

    def _into(self, bgr: np.ndarray, dst: np.ndarray) -> LetterboxInfo:
        """Letterbox ``bgr`` and write the normalised CHW result into ``dst`` ``[3, H, W]``."""
        check_image(bgr)
        info, (top, bottom, left, right) = letterbox_params(bgr.shape[:2], self.size)
        img = bgr
        if (bgr.shape[1], bgr.shape[0]) != info.resized:
            img = cv2.resize(bgr, info.resized, interpolation=cv2.INTER_LINEAR)
        # Only the image area is converted; the padding is a constant fill (cheaper than padding
        # the uint8 image first and converting every pixel).
        pixels = dst.dtype == np.uint8
        if top or bottom or left or right:
            dst[...] = self.pad_value if pixels else self._pad
        nh, nw = info.resized[1], info.resized[0]
        region = dst[:, top : top + nh, left : left + nw]
        chw = img.transpose(2, 0, 1)  # a view: HWC -> CHW
        if self.color == "RGB":
            chw = chw[::-1]  # a view: BGR -> RGB
        if pixels:  # the graph normalises: one strided copy, no float conversion
            np.copyto(region, chw)
            return info
        # One pass: uint8 -> float32, scaled, written straight into the output tensor.
        if self._uniform_a:
            np.multiply(chw, self._a[0, 0, 0], out=region, dtype=np.float32, casting="unsafe")
        else:
            np.multiply(chw, self._a, out=region, dtype=np.float32, casting="unsafe")
        if self._has_b:
            region += self._b
        return info
