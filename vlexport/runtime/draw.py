"""Annotate frames with detections (boxes and "label 0.87" tags)."""

from __future__ import annotations

import cv2
import numpy as np

from vlexport.runtime.preprocess import check_image
from vlexport.runtime.results import Detections

__all__ = ["draw_detections", "class_color"]

# Ultralytics' palette (RGB hex): distinct, readable on both light and dark scenes.
_PALETTE_HEX = (
    "FF3838 FF9D97 FF701F FFB21D CFD231 48F90A 92CC17 3DDB86 1A9334 00D4BB "
    "2C99A8 00C2FF 344593 6473FF 0018EC 8438FF 520085 CB38FF FF95C8 FF37C7"
).split()
_PALETTE_BGR = tuple((int(h[4:6], 16), int(h[2:4], 16), int(h[0:2], 16)) for h in _PALETTE_HEX)


def class_color(class_id: int) -> tuple[int, int, int]:
    """A BGR colour that is the same for a class id in every frame and every run."""
    return _PALETTE_BGR[int(class_id) % len(_PALETTE_BGR)]


def draw_detections(bgr: np.ndarray, detections: Detections, line_width: int | None = None) -> np.ndarray:
    """A copy of ``bgr`` with each detection's box and a filled "label score" tag drawn on it."""
    check_image(bgr)
    img = bgr.copy()
    h, w = img.shape[:2]
    lw = line_width or max(round((h + w) / 2 * 0.003), 2)
    font_scale = lw / 3
    font_thick = max(lw - 1, 1)
    for box, score, cid, label in zip(detections.boxes, detections.scores, detections.class_ids, detections.labels):
        color = class_color(int(cid))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(img, (x1, y1), (x2, y2), color, lw, cv2.LINE_AA)
        text = f"{label} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, font_thick)
        # Tag above the box, or inside it when the box touches the top edge.
        outside = y1 - th - base >= 0
        ty1 = y1 - th - base if outside else y1
        tx2 = min(x1 + tw + 2, w - 1)
        cv2.rectangle(img, (x1, ty1), (tx2, ty1 + th + base), color, -1, cv2.LINE_AA)
        # Dark text on light colours, white on dark ones.
        lum = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
        txt_color = (0, 0, 0) if lum > 150 else (255, 255, 255)
        cv2.putText(
            img, text, (x1 + 1, ty1 + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, txt_color, font_thick, cv2.LINE_AA
        )
    return img
