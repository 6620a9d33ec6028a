"""Annotate frames with detections (boxes and "label 0.87" tags) and captions (text band at the bottom)."""

from __future__ import annotations

import unicodedata

import cv2
import numpy as np

from vlexport.errors import UsageError
from vlexport.runtime.preprocess import check_image
from vlexport.runtime.results import Caption, Detections

__all__ = ["draw_detections", "draw_caption", "wrap_text", "class_color"]

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
    """A copy of ``bgr`` with each detection's box and a filled "label score" tag drawn on it
    ("#id label score" when the detections carry track ids), and its mask tinted in the class
    colour when the detections have masks."""
    check_image(bgr)
    img = bgr.copy()
    h, w = img.shape[:2]
    if detections.masks is not None and len(detections):
        _tint_masks(img, detections.masks, detections.class_ids)
    lw = line_width or max(round((h + w) / 2 * 0.003), 2)
    font_scale = lw / 3
    font_thick = max(lw - 1, 1)
    ids = detections.track_ids if detections.track_ids is not None else np.full(len(detections), -1, np.int64)
    for box, score, cid, label, tid in zip(
        detections.boxes, detections.scores, detections.class_ids, detections.labels, ids
    ):
        color = class_color(int(cid))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(img, (x1, y1), (x2, y2), color, lw, cv2.LINE_AA)
        # "#7 car 0.91" for a tracked detection; untracked ones (-1) keep the plain tag.
        text = f"#{int(tid)} {label} {float(score):.2f}" if tid >= 0 else f"{label} {float(score):.2f}"
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


_MASK_ALPHA = 0.45


def _tint_masks(img: np.ndarray, masks: np.ndarray, class_ids: np.ndarray) -> None:
    """Blend each mask's pixels with its class colour, in place (later masks on top)."""
    if masks.shape[1:] != img.shape[:2]:
        raise UsageError(f"masks are {masks.shape[2]}x{masks.shape[1]} but the image is {img.shape[1]}x{img.shape[0]}: "
                         "draw detections on the frame they were computed on")
    for mask, cid in zip(masks, class_ids):
        color = np.asarray(class_color(int(cid)), np.float32)
        region = img[mask].astype(np.float32)
        img[mask] = (region * (1 - _MASK_ALPHA) + color * _MASK_ALPHA).astype(np.uint8)


_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only: drop accents ("café" -> "cafe"), "?" for the rest."""
    plain = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in plain if not unicodedata.combining(c))
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in plain)


def wrap_text(text: str, max_width: int, font_scale: float, thickness: int) -> list[str]:
    """Split ``text`` into lines no wider than ``max_width`` pixels (words kept whole unless one
    alone is too wide, which is then cut between characters)."""

    def width(s: str) -> int:
        return cv2.getTextSize(s, _FONT, font_scale, thickness)[0][0]

    lines: list[str] = []
    line = ""
    for word in text.split():
        cand = f"{line} {word}" if line else word
        if width(cand) <= max_width:
            line = cand
            continue
        if line:
            lines.append(line)
        # A word wider than the band on its own is cut into pieces that fit.
        while width(word) > max_width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and width(word[:cut]) > max_width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines


def draw_caption(bgr: np.ndarray, caption: Caption, regions: bool = True) -> np.ndarray:
    """A copy of ``bgr`` with the caption in white on a dark band along the bottom (long captions
    wrap onto several lines) and, when ``regions`` and the caption has them, its region boxes."""
    check_image(bgr)
    img = bgr.copy()
    h, w = img.shape[:2]
    if regions and caption.boxes is not None and len(caption.boxes):
        ids = caption.class_ids if caption.class_ids is not None else np.zeros(len(caption.boxes), np.int64)
        labels = caption.labels or [""] * len(caption.boxes)
        lw = max(round((h + w) / 2 * 0.002), 1)
        for box, cid, label in zip(caption.boxes, ids, labels):
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            cv2.rectangle(img, (x1, y1), (x2, y2), class_color(int(cid)), lw, cv2.LINE_AA)
            if label:
                cv2.putText(img, _ascii(label), (x1 + 2, max(y1 - 4, 10)), _FONT, lw / 3 + 0.3,
                            class_color(int(cid)), lw, cv2.LINE_AA)
    text = _ascii(caption.text.strip())
    if not text:
        return img
    font_scale = max(min(w, h) / 650, 0.4)
    thick = max(round(font_scale * 1.6), 1)
    margin = max(round(8 * font_scale), 4)
    (_, th), base = cv2.getTextSize("Ag", _FONT, font_scale, thick)
    line_h = th + base + margin // 2
    lines = wrap_text(text, max(w - 2 * margin, 1), font_scale, thick)
    fit = max((h - margin) // line_h, 1)
    if len(lines) > fit:  # a caption taller than the frame: keep what fits and say it was cut
        lines = lines[: fit - 1] + [lines[fit - 1] + "..."]
    band_h = min(len(lines) * line_h + margin, h)
    y0 = h - band_h
    # Darken rather than paint: the scene stays faintly visible behind the text.
    img[y0:] = (img[y0:].astype(np.float32) * 0.25).astype(np.uint8)
    for i, line in enumerate(lines):
        y = y0 + margin // 2 + i * line_h + th  # the baseline
        cv2.putText(img, line, (margin, y), _FONT, font_scale, (255, 255, 255), thick, cv2.LINE_AA)
    return img
