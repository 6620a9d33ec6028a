"""Representative images for parity checks and calibration.

Every reader returns BGR uint8 frames, exactly what the runtime receives from a camera; the
caller pre-processes them with the runtime's own :class:`Preprocessor`, so the graph sees the
same tensors at export time as on the device.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vlexport.errors import SourceError, UsageError
from vlexport.runtime.sources import IMAGE_EXTS

log = logging.getLogger("vlexport")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, YOLO/COCO dataset layouts included), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def read_image(path: Path) -> np.ndarray:
    """Read one image as BGR uint8 or raise SourceError naming it."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SourceError(f"cannot read image {path} (missing, unreadable or not an image)")
    return img


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


# -- calibration sets -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSet:
    """The frames an INT8 model is calibrated on, and what the manifest records about them.

    ``sha256`` is taken over the sampled items' bytes in order (file bytes for images, decoded
    frame bytes for a video), so a manifest says exactly which data calibrated a model.
    """

    frames: list[np.ndarray]
    names: list[str]
    sha256: str
    kind: str  # "images", "image", "video", "yolo" or "coco"
    source: str

    def __len__(self) -> int:
        return len(self.frames)

    def describe(self) -> dict[str, Any]:
        """The manifest's record of this set: source, kind, count and hash."""
        return {"source": self.source, "kind": self.kind, "count": len(self.frames), "sha256": self.sha256}


_SOURCE_HINT = ("pass an image folder, a video file ({videos}), a YOLO data.yaml or dataset folder, "
                "or a COCO annotation .json")


def _hint() -> str:
    return _SOURCE_HINT.format(videos=", ".join(VIDEO_EXTENSIONS))


def _sample_indices(n: int, count: int, seed: int) -> list[int]:
    # Deterministic: the same n, count and seed always give the same indices (kept in order).
    if count >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), count))


def _decode_file(path: Path) -> tuple[bytes, np.ndarray]:
    """The file's bytes and its BGR decode (one read, so the hash is of what was decoded)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read image {path}: {e.strerror or e}") from e
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise SourceError(f"cannot decode image {path} (corrupt or not an image)")
    return data, img


def _image_set(paths: list[Path], count: int, seed: int, exclude: set[str], kind: str,
               source: Path, purpose: str = "calibration") -> CalibrationSet:
    if exclude:
        paths = [p for p in paths if str(p.resolve()) not in exclude]
        if not paths:
            raise SourceError(f"every image of {source} is excluded (kept for evaluation); "
                              "pass a calibration source that is disjoint from the evaluation images")
    chosen = [paths[i] for i in _sample_indices(len(paths), count, seed)]
    digest = hashlib.sha256()
    frames = []
    for p in chosen:
        data, img = _decode_file(p)
        digest.update(data)
        frames.append(img)
    if len(chosen) < count:
        log.warning("%s: %s has %d usable image(s), fewer than the %d asked for", purpose, source, len(chosen), count)
    return CalibrationSet(frames, [str(p) for p in chosen], digest.hexdigest(), kind, str(source))


def _video_set(path: Path, count: int, seed: int, purpose: str = "calibration") -> CalibrationSet:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise SourceError(f"cannot open video {path} (corrupt, or a codec OpenCV lacks)")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:
            raise SourceError(f"video {path} reports no frames")
        if count >= total:
            wanted = list(range(total))
        else:
            # Evenly spaced over the whole video; the seed shifts the phase within one step.
            step = total / count
            phase = random.Random(seed).random()
            wanted = sorted({min(total - 1, int((k + phase) * step)) for k in range(count)})
        want = set(wanted)
        frames, names, idx = [], [], 0
        digest = hashlib.sha256()
        while idx <= wanted[-1]:
            if not cap.grab():  # grab() without retrieve() skips frames without converting them
                break
            if idx in want:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise SourceError(f"cannot decode frame {idx} of {path}")
                frames.append(frame)
                names.append(f"{path}#{idx}")
                digest.update(np.ascontiguousarray(frame).tobytes())
            idx += 1
    finally:
        cap.release()
    if not frames:
        raise SourceError(f"no frame could be decoded from {path}")
    if len(frames) < min(count, total):
        log.warning("%s: %s ended after %d frames; got %d of %d", purpose, path, idx, len(frames), count)
    return CalibrationSet(frames, names, digest.hexdigest(), "video", str(path))


def calibration_frames(
    source: str | Path,
    count: int,
    seed: int = 0,
    *,
    exclude: Iterable[str | Path] | None = None,
    split: str | None = None,
    purpose: str = "calibration",
) -> CalibrationSet:
    """Up to ``count`` BGR frames to calibrate an INT8 model on, sampled deterministically.

    ``source``: an image folder (searched recursively), one image, a video file (frames evenly
    spaced, the seed shifting their phase), a YOLO dataset (data.yaml — its ``split``, by default
    ``train`` — or a folder with images/ and labels/), a COCO annotation JSON (its images) or a
    segmentation dataset (a semantic.yaml naming its masks, or a folder of VOC pairs: its images).
    ``exclude``: image paths to leave out (compared resolved), e.g. the evaluation images, so a
    model is never scored on the images that calibrated it. ``purpose`` names what the frames are
    for in messages (see :func:`parity_frames`).
    """
    from vlexport.data.detection import dataset_images, dataset_kind

    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
        raise UsageError(f"the {purpose} image count must be a positive integer, got {count!r}")
    src = Path(source)
    if not src.exists():
        raise SourceError(f"{purpose} source not found: {src}; {_hint()}")
    excluded = {str(Path(p).resolve()) for p in exclude} if exclude else set()
    segmentation = _segmentation_images(src)
    if segmentation is not None:
        return _image_set(segmentation, int(count), seed, excluded, "segmentation", src, purpose)
    kind = dataset_kind(src)
    if kind is not None:
        kind, paths = dataset_images(src, split=split)
        if not paths:
            raise SourceError(f"no images found in the {kind} dataset {src}")
        return _image_set(paths, int(count), seed, excluded, kind, src, purpose)
    if src.is_dir():
        paths = list_images(src)
        if not paths:
            raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {src}; {_hint()}")
        return _image_set(paths, int(count), seed, excluded, "images", src, purpose)
    suffix = src.suffix.lower()
    if suffix in IMAGE_EXTS:
        return _image_set([src], int(count), seed, excluded, "image", src, purpose)
    if suffix in VIDEO_EXTENSIONS:
        return _video_set(src, int(count), seed, purpose)
    raise UsageError(f"{src} is not a {purpose} source: {_hint()}")


def _segmentation_images(src: Path) -> list[Path] | None:
    """The images of a segmentation dataset (without its masks), or None when ``src`` is none."""
    from vlexport.data.yolo_files import YAML_SUFFIXES, parse_yaml_text

    if src.is_file() and src.suffix.lower() in YAML_SUFFIXES:
        data = parse_yaml_text(src.read_text(encoding="utf-8", errors="replace"), src)
        if not (isinstance(data, dict) and ("masks" in data or "classes" in data)):
            return None  # a detection data.yaml (its classes are "names")
    elif not (src.is_dir() and any(src.glob("*_target.png"))):
        return None
    from vlexport.data.segmentation import load_segmentation_dataset

    return [image for image, _ in load_segmentation_dataset(src).items]


def parity_frames(source: str | Path, count: int, seed: int = 0) -> CalibrationSet:
    """Up to ``count`` BGR frames for the parity check (``--val``), read as :func:`calibration_frames`
    reads calibration sources; its messages say parity, not calibration."""
    return calibration_frames(source, count, seed, purpose="parity")
