"""Semantic segmentation results and their drawing: a label map in source pixels, an overlay, a legend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vlexport.runtime.results import FrameStamp

__all__ = ["Segmentation", "class_colors", "draw_segmentation"]

_FRACTION_DECIMALS = 5


@dataclass
class Segmentation:
    """One frame's semantic segmentation.

    ``label_map`` is ``[H, W]`` int32 in the source frame's pixels; ``label_map[y, x]`` indexes
    ``classes`` (so every value lies in ``0 .. len(classes) - 1``). ``probabilities``, when the
    task was asked for them (``SegmentTask.segment(..., return_probabilities=True)``), is
    ``float32 [len(classes), H, W]``: per-class probabilities at the same pixels; otherwise None.
    """

    label_map: np.ndarray
    classes: list[str]
    stamp: FrameStamp | None = None
    probabilities: np.ndarray | None = None

    def __post_init__(self) -> None:
        arr = np.asarray(self.label_map)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"label_map: got dtype {arr.dtype}, expected an integer array [H, W]")
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"label_map: got shape {tuple(arr.shape)}, expected (H, W) with H, W > 0")
        self.classes = [str(c) for c in self.classes]
        if not self.classes:
            raise ValueError("classes: got an empty list, expected at least one class name")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= len(self.classes):
            raise ValueError(
                f"label_map: values span {lo}..{hi}, expected 0..{len(self.classes) - 1} (one per class)"
            )
        self.label_map = np.ascontiguousarray(arr, dtype=np.int32)
        if self.stamp is not None and not isinstance(self.stamp, FrameStamp):
            raise ValueError(f"stamp: got {type(self.stamp).__name__}, expected FrameStamp or None")
        if self.probabilities is not None:
            probs = np.asarray(self.probabilities)
            want = (len(self.classes), *arr.shape)
            if probs.shape != want or probs.dtype.kind != "f":
                raise ValueError(f"probabilities: got {probs.dtype} {tuple(probs.shape)}, expected float {want} "
                                 "(classes, H, W)")
            self.probabilities = np.ascontiguousarray(probs, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the label map (the source frame's size)."""
        return int(self.label_map.shape[0]), int(self.label_map.shape[1])

    def counts(self) -> np.ndarray:
        """Pixels per class index, ``[len(classes)]`` int64."""
        return np.bincount(self.label_map.ravel(), minlength=len(self.classes))[: len(self.classes)]

    def present(self) -> list[int]:
        """Indices of the classes that cover at least one pixel, in class order."""
        return [int(i) for i in np.flatnonzero(self.counts())]

    def fractions(self) -> dict[str, float]:
        """``{class name: fraction of the frame's pixels}`` for the classes present (sums to 1).

        Duplicate class names (which a vocabulary should not have) add up under one key.
        """
        counts = self.counts()
        total = float(self.label_map.size)
        out: dict[str, float] = {}
        for i in np.flatnonzero(counts):
            name = self.classes[int(i)]
            out[name] = out.get(name, 0.0) + float(counts[i]) / total
        return out

    def mask(self, class_name_or_index: str | int) -> np.ndarray:
        """Boolean ``[H, W]`` mask of one class (by name or index)."""
        if isinstance(class_name_or_index, str):
            if class_name_or_index not in self.classes:
                raise KeyError(f"no class {class_name_or_index!r}; classes are {self.classes}")
            idx = self.classes.index(class_name_or_index)
        else:
            idx = int(class_name_or_index)
        return self.label_map == idx

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the stamp's fields (when there is one), ``size`` ``[H, W]``, ``classes``
        (the present ones, in class order) and ``fractions`` (rounded). No full label map."""
        out: dict[str, Any] = self.stamp.to_dict() if self.stamp is not None else {}
        fr = self.fractions()
        out["size"] = list(self.shape)
        out["classes"] = list(fr)
        out["fractions"] = {k: round(v, _FRACTION_DECIMALS) for k, v in fr.items()}
        return out

    def __repr__(self) -> str:
        top = sorted(self.fractions().items(), key=lambda kv: -kv[1])[:3]
        desc = ", ".join(f"{k} {v:.0%}" for k, v in top)
        return f"Segmentation({self.shape[1]}x{self.shape[0]}, {len(self.classes)} classes: {desc})"


def class_colors(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 BGR colours, the same for a class index in every frame and run.

    The first 20 are the detection palette (so a class looks alike in both overlays); later ones
    come from a fixed golden-ratio walk round the hue circle.
    """
    from vlexport.runtime.draw import _PALETTE_BGR

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"class_colors: n must be a non-negative integer, got {n!r}")
    out = np.zeros((int(n), 3), np.uint8)
    base = np.asarray(_PALETTE_BGR, np.uint8)
    k = min(int(n), len(base))
    out[:k] = base[:k]
    if n > len(base):
        import cv2

        idx = np.arange(len(base), int(n))
        hue = ((idx * 0.618033988749895) % 1.0 * 180).astype(np.uint8)  # OpenCV hue is 0..179
        sat = np.where(idx % 2 == 0, 200, 150).astype(np.uint8)
        val = np.where(idx % 3 == 0, 255, 210).astype(np.uint8)
        hsv = np.stack([hue, sat, val], axis=-1)[None]
        out[len(base):] = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0]
    return out


def draw_segmentation(
    bgr: np.ndarray, seg: Segmentation, alpha: float = 0.5, legend: bool = True, max_legend: int = 12
) -> np.ndarray:
    """A copy of ``bgr`` with each pixel tinted by its class colour and a legend of the classes present.

    ``alpha`` is the weight of the colour (0: the frame unchanged, 1: colours only). The legend
    (top-left) lists up to ``max_legend`` present classes, largest first, as "name 42.1%".
    """
    import cv2

    from vlexport.runtime.preprocess import check_image

    check_image(bgr)
    if not isinstance(seg, Segmentation):
        raise TypeError(f"draw_segmentation: expected a Segmentation, got {type(seg).__name__}")
    if seg.shape != bgr.shape[:2]:
        raise ValueError(f"draw_segmentation: label map is {seg.shape}, the image is {bgr.shape[:2]}")
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"draw_segmentation: alpha must lie in [0, 1], got {alpha!r}")
    colors = class_colors(len(seg.classes))
    color_img = colors[seg.label_map]  # [H, W, 3] uint8
    img = cv2.addWeighted(bgr, 1.0 - a, color_img, a, 0.0)
    if legend:
        _draw_legend(img, seg, colors, max_legend)
    return img


def _draw_legend(img: np.ndarray, seg: Segmentation, colors: np.ndarray, max_items: int) -> None:
    import cv2

    counts = seg.counts()
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0][: max(int(max_items), 0)]
    if not present:
        return
    h, w = img.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(min(h, w) / 900.0, 0.35)
    thick = max(int(round(scale * 1.5)), 1)
    total = float(seg.label_map.size)
    lines = [f"{seg.classes[i]} {100.0 * counts[i] / total:.1f}%" for i in present]
    sizes = [cv2.getTextSize(t, font, scale, thick) for t in lines]
    line_h = max(th + base for (_, th), base in sizes) + 4
    swatch = line_h - 4
    pad = 4
    box_w = min(pad * 3 + swatch + max(tw for (tw, _), _ in sizes), w)
    box_h = min(pad * 2 + line_h * len(lines), h)
    # Darken the legend area so that the text reads on any scene.
    region = img[:box_h, :box_w]
    region[...] = (region.astype(np.uint16) * 2 // 5).astype(np.uint8)
    for k, (i, text) in enumerate(zip(present, lines)):
        y = pad + k * line_h
        if y + line_h > h:
            break
        color = tuple(int(c) for c in colors[i])
        cv2.rectangle(img, (pad, y + 2), (pad + swatch, y + 2 + swatch), color, -1)
        (_, th), _ = sizes[k]
        cv2.putText(img, text, (pad * 2 + swatch, y + 2 + (swatch + th) // 2), font, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
