"""DETR's evaluation pre-processing without torch: size rule, resize, ImageNet normalisation, padding.

The official evaluation transform is ``RandomResize([800], max_size=1333)`` (deterministic),
``ToTensor`` and ``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` on an RGB image; batches are
zero-padded at the bottom/right with a mask that is True on padding. The resize there is
``torchvision.transforms.functional.resize`` on a PIL RGB image, i.e. Pillow's bilinear filter
(antialiased when shrinking), and :func:`detr_preprocess` calls exactly that filter
(:func:`~vlexport.runtime.preprocess.pil_resize`): OpenCV's filters move pixels by several grey
levels and the top boxes by up to hundreds of pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlexport.errors import UsageError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "detr_resize_size", "detr_preprocess", "detr_pad_batch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def detr_resize_size(w: int, h: int, size: int = 800, max_size: int | None = 1333) -> tuple[int, int]:
    """DETR's resize target ``(new_w, new_h)`` for an image of ``w`` x ``h``.

    The short side becomes ``size`` unless the long side would then exceed ``max_size``, in which
    case ``size`` shrinks to ``round(max_size * short / long)``; the long side is truncated
    (``int``), e.g. 810x1080 -> 800x1066, 1280x720 -> 1333x750, 640x480 -> 1066x800.
    """
    if w < 1 or h < 1:
        raise UsageError(f"image size must be positive, got {w}x{h}")
    if size < 1 or (max_size is not None and max_size < 1):
        raise UsageError(f"resize size/max_size must be positive, got {size}/{max_size}")
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


def detr_preprocess(
    image_bgr: np.ndarray, size: int = 800, max_size: int | None = 1333
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize and normalise one BGR uint8 frame: ``([3, H, W] float32 RGB normalised, (new_w, new_h))``.

    The resize is Pillow's bilinear filter on the RGB image, as DETR's evaluation transform.
    """
    from vlexport.runtime.preprocess import check_image, pil_resize

    image = check_image(image_bgr)
    h, w = image.shape[:2]
    new_w, new_h = detr_resize_size(w, h, size, max_size)
    # Pillow filters each channel alike: resizing the BGR frame and flipping the (smaller) result
    # gives the pixels of the RGB image's resize without copying the full frame first.
    rgb = pil_resize(image, (new_w, new_h), "bilinear")[:, :, ::-1].astype(np.float32) / 255.0
    rgb = (rgb - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)), (new_w, new_h)


def detr_pad_batch(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad ``[3, H_i, W_i]`` images at the bottom/right: ``(batch [B,3,H,W], mask [B,H,W] True on padding)``."""
    if not images:
        raise UsageError("detr_pad_batch: no images")
    height = max(int(im.shape[1]) for im in images)
    width = max(int(im.shape[2]) for im in images)
    batch = np.zeros((len(images), 3, height, width), np.float32)
    mask = np.ones((len(images), height, width), bool)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return batch, mask
