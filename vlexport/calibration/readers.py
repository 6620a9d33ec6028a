"""Representative images for parity checks and calibration.

Every reader returns BGR uint8 frames, exactly what the runtime receives from a camera; the
caller pre-processes them with the runtime's own :class:`Preprocessor`, so the graph sees the
same tensors at export time as on the device.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np

from vlexport.errors import SourceError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, YOLO/COCO dataset layouts included), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _sample(items: list, count: int, seed: int) -> list:
    # Deterministic: the same source, count and seed always give the same images.
    if count >= len(items):
        return list(items)
    rng = random.Random(seed)
    return sorted(rng.sample(items, count), key=items.index)


def read_image(path: Path) -> np.ndarray:
    """Read one image as BGR uint8 or raise SourceError naming it."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SourceError(f"cannot read image {path} (missing, unreadable or not an image)")
    return img


def read_video_frames(path: Path, count: int) -> list[np.ndarray]:
    """``count`` frames evenly spaced over the whole video."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise SourceError(f"cannot open video {path}")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:
            raise SourceError(f"video {path} reports no frames")
        wanted = sorted(set(np.linspace(0, total - 1, num=min(count, total)).round().astype(int).tolist()))
        frames, idx, want = [], 0, set(wanted)
        while len(frames) < len(wanted):
            ok, frame = cap.read()
            if not ok:
                break
            if idx in want:
                frames.append(frame)
            idx += 1
    finally:
        cap.release()
    if not frames:
        raise SourceError(f"no frame could be decoded from {path}")
    return frames


def read_images(source: str | Path, count: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Up to ``count`` BGR images from an image file, an image folder/dataset or a video file.

    Returns the frames and a name for each (file path, or ``video#index``).
    """
    if count <= 0:
        raise UsageError(f"the image count must be positive, got {count}")
    src = Path(source)
    if not src.exists():
        raise SourceError(f"image source not found: {src}")
    if src.is_dir():
        files = list_images(src)
        if not files:
            raise SourceError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {src}")
        chosen = _sample(files, count, seed)
        return [read_image(p) for p in chosen], [str(p) for p in chosen]
    suffix = src.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return [read_image(src)], [str(src)]
    if suffix in VIDEO_EXTENSIONS:
        frames = read_video_frames(src, count)
        return frames, [f"{src}#{i}" for i in range(len(frames))]
    raise SourceError(f"{src} is not an image folder, an image or a video file ({', '.join(VIDEO_EXTENSIONS)})")


def synthetic_images(count: int, size: tuple[int, int] = (480, 640), seed: int = 0) -> list[np.ndarray]:
    """Deterministic picture-like images (gradients, shapes, texture, noise) for parity checks
    when the user gives no images. Not a substitute for real calibration data."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(count):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * rng.uniform(80, 200, 3)
        img = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        for _ in range(int(rng.integers(4, 10))):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
            if rng.random() < 0.5:
                cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
            else:
                cv2.circle(img, ((x0 + x1) // 2, (y0 + y1) // 2), max(5, (x1 - x0) // 3), color, -1)
        out.append(img)
    return out
