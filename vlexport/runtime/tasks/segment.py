"""Open-vocabulary semantic segmentation from a bundle's ``segmenter`` part (SCLIP-style sliding window).

The graph maps a batch of crops to per-query cosine similarities at crop size:
``crops [n, 3, h, w] -> logits [n, Q, h, w]``. Everything else runs here in numpy/OpenCV, as the
reference implementation does it:

1. resize the frame (aspect kept; OpenCV bilinear on uint8) by mmcv's ``rescale_size`` factor
   ``s = min(max_long_side / long side, short_side / short side)`` (``preprocess.short_side`` and
   ``preprocess.max_long_side``: the short side becomes ``short_side`` unless the long side would
   pass ``max_long_side``), new size ``(int(w*s + 0.5), int(h*s + 0.5))``; BGR -> RGB, normalise.
   A manifest without ``max_long_side`` (hand-written bundles; every export writes it) gets no
   cap, as before the key was read;
2. cut sliding windows of ``slide_crop`` pixels every ``slide_stride`` (mmseg's grid; the last
   window of a row/column is shifted back to end at the border; every window is
   ``min(slide_crop, H) x min(slide_crop, W)``), run all crops through the graph (in chunks of
   the model's maximum batch);
3. stitch: sum the crops' logits and divide by how many windows cover each pixel;
4. resize the stitched logits bilinearly to the frame size, multiply by ``logit_scale``, softmax
   over the queries, take the max over each class's queries (synonyms); with ``area_threshold``
   (SCLIP's ``area_thd``) the classes other than ``background_index`` whose argmax area is at most
   that fraction of the non-background pixels get probability 0; argmax; pixels whose best
   (remaining) probability is below ``prob_threshold`` become ``background_index``.

Step 4 runs in channel chunks with an online softmax, so a full-HD frame with hundreds of
queries never holds all ``Q x H x W`` probabilities at once. It gives the same labels as the
direct computation: softmax is monotone with one denominator per pixel, so the class whose best
synonym has the highest probability is the class of the highest logit, and that probability is
``exp(scale * (logit - max_logit)) / sum(exp(scale * (logits - max_logit)))``. The area threshold
needs the first argmax map for its counts, then, only where a dropped class had won, a second pass
over the chunks for the best logit among the kept classes (same denominator: zeroing
probabilities does not renormalise). :meth:`SegmentTask.probabilities` returns the ``[C, H, W]``
class probabilities themselves (memory ``C x H x W`` float32).

When the resized frame is smaller than the crop in a dimension (a long, thin frame capped by
``max_long_side``), the windows are smaller than ``slide_crop`` there, as in SCLIP; the exported
segmenter takes any crop size (dynamic ``crop_height``/``crop_width`` axes, positional embedding
interpolated in-graph). A bundle whose segmenter has a fixed ``c x c`` input (exported before)
refuses such frames with a message to re-export, and refuses ``short_side < slide_crop`` on load.

(About 600 lines of one pipeline: steps 1-4 share the window grid and the chunked softmax's state;
the PAMR refinement is in ``runtime/pamr.py`` and the mIoU evaluation outside the runtime.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.preprocess import check_image
from vlexport.runtime.results import FrameStamp
from vlexport.runtime.segmentation import Segmentation
from vlexport.runtime.tasks.base import PartTask, now_ms

__all__ = ["SegmentTask", "window_grid", "stitch", "resize_short_side", "short_side_size", "labels_from_logits",
           "probabilities_from_logits", "labels_from_probabilities"]

CROPS_INPUT = "crops"
LOGITS_OUTPUT = "logits"
_OVERRIDES = ("prob_threshold", "logit_scale", "area_threshold")
_CHUNK_BYTES = 64 << 20  # at most this much float32 per channel chunk of the full-size logits


# -- pure helpers ---------------------------------------------------------------------------
def short_side_size(h: int, w: int, short: int, max_long: int | None = None) -> tuple[int, int]:
    """The ``(new_h, new_w)`` of mmcv's ``rescale_size`` with ``scale=(max_long, short)``, keep ratio.

    ``s = min(max_long / max(h, w), short / min(h, w))`` (``max_long=None``: no cap), each side
    ``int(side * s + 0.5)`` and at least 1. The PyTorch reference and the runtime both size by this.
    """
    if short < 1:
        raise ValueError(f"resize_short_side: short must be a positive integer, got {short!r}")
    if max_long is not None and max_long < 1:
        raise ValueError(f"resize_short_side: max_long must be a positive integer or None, got {max_long!r}")
    s = float(short) / min(h, w)
    if max_long is not None:
        s = min(float(max_long) / max(h, w), s)
    return max(int(h * s + 0.5), 1), max(int(w * s + 0.5), 1)


def resize_short_side(bgr: np.ndarray, short: int, max_long: int | None = None) -> np.ndarray:
    """Resize ``bgr`` (aspect ratio kept, OpenCV bilinear) to :func:`short_side_size` (SCLIP's
    ``Resize(scale=(2048, 336), keep_ratio=True)``); an image already of that size is returned as is."""
    h, w = int(bgr.shape[0]), int(bgr.shape[1])
    new_h, new_w = short_side_size(h, w, short, max_long)
    if (new_w, new_h) == (w, h):
        return bgr
    return cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def window_grid(H: int, W: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding windows ``(y1, y2, x1, x2)`` over an ``H x W`` image, rows first (mmseg's grid).

    ``n = max(H - crop + stride - 1, 0) // stride + 1`` windows per column (same for rows); each
    starts at ``i * stride`` and the last is shifted back to end at the border. Every window is
    ``min(crop, H) x min(crop, W)``: an image smaller than the crop in a dimension gets one
    window spanning that dimension (as SCLIP's ``forward_slide``).
    """
    if crop < 1 or stride < 1:
        raise ValueError(f"window_grid: crop and stride must be positive, got crop={crop}, stride={stride}")
    if H < 1 or W < 1:
        raise ValueError(f"window_grid: the image must have a positive size, got {H}x{W}")
    h_grids = max(H - crop + stride - 1, 0) // stride + 1
    w_grids = max(W - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(h_grids):
        y2 = min(i * stride + crop, H)
        y1 = max(y2 - crop, 0)
        for j in range(w_grids):
            x2 = min(j * stride + crop, W)
            x1 = max(x2 - crop, 0)
            out.append((y1, y2, x1, x2))
    return out


def stitch(crop_logits: np.ndarray, windows: Sequence[tuple[int, int, int, int]], H: int, W: int) -> np.ndarray:
    """Average overlapping crop outputs ``[n, Q, c, c]`` into one ``[Q, H, W]`` float32 map.

    Each window's logits are added at its place; the sum is divided by how many windows cover
    each pixel. Every pixel must be covered (``window_grid`` guarantees it).
    """
    crop_logits = np.asarray(crop_logits)
    if crop_logits.ndim != 4 or crop_logits.shape[0] != len(windows):
        raise ValueError(
            f"stitch: got logits of shape {tuple(crop_logits.shape)} for {len(windows)} windows, "
            "expected [n_windows, Q, crop, crop]"
        )
    q = crop_logits.shape[1]
    acc = np.zeros((q, H, W), np.float32)
    count = np.zeros((H, W), np.float32)
    for k, (y1, y2, x1, x2) in enumerate(windows):
        if crop_logits.shape[2:] != (y2 - y1, x2 - x1):
            raise ValueError(f"stitch: window {k} is {y2 - y1}x{x2 - x1}, its logits {crop_logits.shape[2:]}")
        acc[:, y1:y2, x1:x2] += crop_logits[k]
        count[y1:y2, x1:x2] += 1.0
    if np.any(count == 0):
        raise ValueError("stitch: the windows leave some pixels uncovered")
    acc /= count
    return acc


def _scaled_chunks(hwc: np.ndarray, out_hw: tuple[int, int], chunk: int, scale: np.float32):
    """Yield ``(c0, part)``: queries ``c0 .. c0 + k`` resized to ``out_hw`` and scaled, ``[H, W, k]`` float32."""
    h, w, q = hwc.shape
    H, W = out_hw
    for c0 in range(0, q, chunk):
        part = np.ascontiguousarray(hwc[:, :, c0 : c0 + chunk])
        k = part.shape[2]
        if (h, w) != (H, W):
            part = cv2.resize(part, (W, H), interpolation=cv2.INTER_LINEAR)
        yield c0, part.reshape(H, W, k) * scale


def _small_classes(labels: np.ndarray, num_classes: int, background_index: int, area_threshold: float) -> np.ndarray:
    """SCLIP's ``area_thd``: bool ``[num_classes]``, True for the classes to drop.

    Pixels per class of the argmax map; a class other than the background whose count is at most
    ``area_threshold`` x (the pixels of all non-background classes) is dropped (float32 as the
    reference; a class with no pixel is always "dropped", which changes nothing).
    """
    counts = np.bincount(labels.ravel(), minlength=num_classes)[:num_classes].astype(np.float32)
    keep = np.zeros(num_classes, bool)
    keep[int(background_index)] = True
    total = counts[~keep].sum(dtype=np.float32)
    return ~keep & (counts <= np.float32(area_threshold) * total)


def _labels_setup(logits: np.ndarray, out_hw: tuple[int, int], query_to_class: Any, what: str):
    q = logits.shape[0]
    q2c = np.asarray(query_to_class, np.int64)
    if logits.ndim != 3 or q2c.shape != (q,):
        raise ValueError(f"{what}: logits of shape {tuple(logits.shape)} (expected [Q, h, w]) and query_to_class "
                         f"of shape {q2c.shape} do not match")
    H, W = int(out_hw[0]), int(out_hw[1])
    hwc = np.ascontiguousarray(logits.transpose(1, 2, 0), dtype=np.float32)  # [h, w, Q]
    chunk = int(min(max(_CHUNK_BYTES // max(H * W * 4, 1), 1), 512, q))
    return q2c, (H, W), hwc, chunk


def labels_from_logits(
    logits: np.ndarray,
    out_hw: tuple[int, int],
    query_to_class: np.ndarray,
    logit_scale: float,
    prob_threshold: float = 0.0,
    background_index: int | None = None,
    area_threshold: float = 0.0,
) -> np.ndarray:
    """Stitched logits ``[Q, h, w]`` -> ``[H, W]`` int32 class labels at ``out_hw``.

    Bilinear resize (OpenCV, half-pixel centres like ``F.interpolate(align_corners=False)``),
    ``x logit_scale``, softmax over queries, max over each class's queries; with
    ``area_threshold > 0`` the classes other than ``background_index`` whose argmax area is at
    most that fraction of the non-background pixels get probability 0 (SCLIP's ``area_thd``);
    argmax; where the best remaining probability is below ``prob_threshold`` the label is
    ``background_index``. Both thresholds need ``background_index``. Computed in channel chunks
    with an online softmax (see the module docstring); the labels equal the argmax of
    :func:`probabilities_from_logits` (up to float ties).
    """
    q2c, (H, W), hwc, chunk = _labels_setup(logits, out_hw, query_to_class, "labels_from_logits")
    q = hwc.shape[2]
    thresholded = prob_threshold > 0.0 and background_index is not None
    area = area_threshold > 0.0 and background_index is not None
    num_classes = int(max(q2c.max(), -1 if background_index is None else background_index)) + 1
    if not thresholded and chunk == q:
        # The softmax is monotonic and the temperature positive: without a probability threshold
        # the label is the argmax of the resized logits, no exponentials needed.
        full = hwc if hwc.shape[:2] == (H, W) else cv2.resize(hwc, (W, H), interpolation=cv2.INTER_LINEAR)
        full = full.reshape(H, W, q)
        labels = q2c[full.argmax(axis=2)]
        if area:
            small = _small_classes(labels, num_classes, background_index, area_threshold)
            hit = small[labels]  # pixels won by a dropped class: the best kept class instead
            if hit.any():
                sub = full[hit]  # [n, Q] (a copy)
                sub[:, small[q2c]] = -np.inf
                labels[hit] = q2c[sub.argmax(axis=1)]
        return labels.astype(np.int32)
    scale = np.float32(logit_scale)
    best = np.full((H, W), -np.inf, np.float32)
    arg = np.zeros((H, W), np.int64)
    denom = np.zeros((H, W), np.float32)
    for c0, part in _scaled_chunks(hwc, (H, W), chunk, scale):
        cmax = part.max(axis=2)
        carg = part.argmax(axis=2) + c0
        new_best = np.maximum(best, cmax)
        denom *= np.exp(best - new_best)
        denom += np.exp(part - new_best[:, :, None]).sum(axis=2)
        better = cmax > best  # strict: the first query wins ties, as argmax does
        arg[better] = carg[better]
        best = new_best
    labels = q2c[arg]
    top = best  # the scaled logit of each pixel's winning query
    if area:
        small = _small_classes(labels, num_classes, background_index, area_threshold)
        hit = small[labels]
        if hit.any():
            # Second pass, only where a dropped class won: the best query of a kept class. Its
            # probability has the same denominator (zeroing does not renormalise).
            drop = small[q2c]
            best2 = np.full(int(hit.sum()), -np.inf, np.float32)
            arg2 = np.zeros(best2.shape, np.int64)
            for c0, part in _scaled_chunks(hwc, (H, W), chunk, scale):
                sub = part[hit]  # [n, k]
                sub[:, drop[c0 : c0 + sub.shape[1]]] = -np.inf
                cmax = sub.max(axis=1)
                better = cmax > best2
                arg2[better] = sub.argmax(axis=1)[better] + c0
                best2 = np.maximum(best2, cmax)
            labels[hit] = q2c[arg2]
            top = best.copy()
            top[hit] = best2
    labels = labels.astype(np.int32)
    if thresholded:
        labels[np.exp(top - best) / denom < prob_threshold] = int(background_index)
    return labels


def probabilities_from_logits(
    logits: np.ndarray,
    out_hw: tuple[int, int],
    query_to_class: np.ndarray,
    logit_scale: float,
    background_index: int | None = None,
    area_threshold: float = 0.0,
    num_classes: int | None = None,
) -> np.ndarray:
    """Stitched logits ``[Q, h, w]`` -> class probabilities ``[C, H, W]`` float32 at ``out_hw``.

    What :func:`labels_from_logits` takes the argmax of: resize, ``x logit_scale``, softmax over
    the queries, max over each class's queries, and the area threshold's zeroed classes (with
    ``background_index``). ``C`` is ``num_classes`` (default: the largest class index + 1); a class
    without queries has probability 0. Memory: the ``C x H x W`` result plus one channel chunk.
    """
    q2c, (H, W), hwc, chunk = _labels_setup(logits, out_hw, query_to_class, "probabilities_from_logits")
    n = int(q2c.max()) + 1 if num_classes is None else int(num_classes)
    if n <= int(q2c.max()) or (background_index is not None and not 0 <= background_index < n):
        raise ValueError(f"probabilities_from_logits: {n} classes do not cover query_to_class / background_index")
    scale = np.float32(logit_scale)
    cls = np.full((n, H, W), -np.inf, np.float32)  # per class: its best query's scaled logit
    best = np.full((H, W), -np.inf, np.float32)
    denom = np.zeros((H, W), np.float32)
    for c0, part in _scaled_chunks(hwc, (H, W), chunk, scale):
        new_best = np.maximum(best, part.max(axis=2))
        denom *= np.exp(best - new_best)
        denom += np.exp(part - new_best[:, :, None]).sum(axis=2)
        best = new_best
        for j in range(part.shape[2]):
            c = q2c[c0 + j]
            np.maximum(cls[c], part[:, :, j], out=cls[c])
    cls -= best[None]
    np.exp(cls, out=cls)  # max over synonyms of the probabilities = probability of the best synonym
    cls /= denom[None]
    if area_threshold > 0.0 and background_index is not None and n > 1:
        small = _small_classes(cls.argmax(axis=0), n, background_index, area_threshold)
        cls[small] = 0.0
    return cls


def labels_from_probabilities(
    probs: np.ndarray, prob_threshold: float = 0.0, background_index: int | None = None
) -> np.ndarray:
    """``[C, H, W]`` probabilities -> ``[H, W]`` int32 labels: argmax, then ``prob_threshold`` -> background."""
    labels = probs.argmax(axis=0).astype(np.int32)
    if prob_threshold > 0.0 and background_index is not None:
        labels[probs.max(axis=0) < prob_threshold] = int(background_index)
    return labels


# -- settings -------------------------------------------------------------------------------
def _settings(bundle: Bundle, overrides: dict[str, Any]) -> dict[str, Any]:
    where = str(bundle.root)
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise UsageError(f"unknown segment option(s) {unknown}; choose from {sorted(_OVERRIDES)}")
    seg = bundle.section("segment")
    if not seg.present:
        raise BundleError(f"{where}: the manifest has no 'segment' settings (slide_crop, slide_stride, ...)")
    pre = bundle.section("preprocess")
    if pre.get("resize") != "short_side":
        raise BundleError(f"{where}: preprocess resize {pre.get('resize')!r} is not supported for segment "
                          "(expected 'short_side')")
    classes = bundle.classes
    if not classes:
        raise BundleError(f"{where}: the vocabulary lists no classes")
    crop = seg.number("slide_crop", integer=True, min=1)
    stride = seg.number("slide_stride", integer=True, min=1, max=crop)
    short = pre.number("short_side", integer=True, min=1)
    max_long = pre.number("max_long_side", None, integer=True, min=1)  # absent (hand-written): no long-side cap
    patch = seg.number("patch_size", 1, integer=True, min=1)
    q2c = seg.get("query_to_class", list(range(len(classes))))
    if (not isinstance(q2c, list) or not q2c
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(classes) for i in q2c)):
        raise BundleError(f"{where}: segment query_to_class must list class indices 0..{len(classes) - 1}")
    bg = seg.number("background_index", None, integer=True, min=0, max=len(classes) - 1)
    # Both thresholds send pixels or classes to the background class, so both need one.
    settings = {"slide_crop": crop, "slide_stride": stride, "short_side": short, "max_long_side": max_long,
                "patch_size": patch,
                "logit_scale": seg.number("logit_scale", 40.0, min=0, exclusive=True,
                                          override=overrides.get("logit_scale")),
                "prob_threshold": seg.number("prob_threshold", 0.0, min=0, max=1,
                                             override=overrides.get("prob_threshold")),
                "area_threshold": seg.number("area_threshold", 0.0, min=0, max=1,
                                             override=overrides.get("area_threshold")),
                "background_index": bg, "query_to_class": list(q2c)}
    for key in ("prob_threshold", "area_threshold"):
        if settings[key] > 0 and bg is None:
            raise UsageError(
                f"{key} {settings[key]} needs a background class, but this bundle has none "
                f"(segment.background_index is null); leave {key} at 0"
            )
    return settings


# -- the task -------------------------------------------------------------------------------
class SegmentTask(PartTask):
    """Frames in (BGR uint8), :class:`Segmentation` label maps in source pixels out.

    ``overrides`` replace the manifest's ``segment`` settings ``prob_threshold``,
    ``area_threshold`` and ``logit_scale`` (None keeps the manifest's). After each call
    :attr:`timings` holds the milliseconds spent per stage (preprocess, infer, postprocess) and
    :attr:`last_windows` the number of crops of the last frame.

    :meth:`probabilities` returns the stitched per-class probabilities at the frame's size
    (``float32 [C, H, W]``: after the temperature, softmax, synonym max and area threshold; what
    the labels are the argmax of, before ``prob_threshold``); ``segment(...,
    return_probabilities=True)`` puts them on :attr:`Segmentation.probabilities` with labels
    computed from them.
    """

    part_name = "segmenter"
    input_name = CROPS_INPUT

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        precision: str | None = None,
        backend: str | None = None,
        threads: int | None = None,
        **overrides: Any,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.settings: dict[str, Any] = _settings(self.bundle, overrides)  # cheap checks first
        self.classes: list[str] = self.bundle.classes
        self._q2c = np.asarray(self.settings["query_to_class"], np.int64)
        super().__init__(self.bundle, precision=precision, backend=backend, threads=threads)
        self.timings: dict[str, float] = {}
        self.last_windows = 0
        self._threads = threads
        try:
            self._setup_pamr()
        except BaseException:
            self.backend.close()
            raise

    def _setup_preprocessing(self, where: str) -> None:
        # Short-side resize and normalisation on 0-255 values (see _preprocess), not a letterbox.
        pre = self.bundle.preprocess
        color = str(pre.get("color", "RGB")).upper()
        if color not in ("RGB", "BGR"):
            raise BundleError(f"{where}: preprocess color {color!r} is not supported (expected 'RGB' or 'BGR')")
        self._rgb = color == "RGB"
        scale = float(pre.get("scale", 1.0))
        mean = np.broadcast_to(np.asarray(pre.get("mean", [0, 0, 0]), np.float64).reshape(-1), 3)
        std = np.broadcast_to(np.asarray(pre.get("std", [1, 1, 1]), np.float64).reshape(-1), 3)
        if np.any(std == 0):
            raise BundleError(f"{where}: preprocess std must be non-zero, got {list(std)}")
        self._a = (scale / std).astype(np.float32).reshape(1, 1, 3)
        self._b = (-mean / std).astype(np.float32).reshape(1, 1, 3)

    def _check_io(self, where: str) -> None:
        declared = {s.name for s in self.part.io.inputs}
        actual = {s.name for s in self.backend.inputs}
        if declared and declared != actual:
            raise BundleError(f"{where}: the manifest declares inputs {sorted(declared)} but the model has {sorted(actual)}")
        if actual != {CROPS_INPUT}:
            raise BundleError(f"{where}: the segmenter must take only {CROPS_INPUT!r}, it takes {sorted(actual)}")
        c = self.settings["slide_crop"]
        shape = self._input_spec(CROPS_INPUT).shape
        if len(shape) != 4 or shape[1] not in (3, "channels") or any(isinstance(d, int) and d != c for d in shape[2:]):
            raise BundleError(f"{where}: input {CROPS_INPUT!r} has shape {list(shape)}, expected [n, 3, {c}, {c}]")
        # A fixed c x c graph (bundles exported before the crop size became dynamic) cannot take
        # the smaller windows of frames whose resized side is below the crop.
        self._fixed_crop = any(isinstance(d, int) for d in shape[2:])
        short = self.settings["short_side"]
        if self._fixed_crop and short < c:
            raise BundleError(
                f"{where}: preprocess short_side {short} is smaller than slide_crop {c} and the segmenter takes only "
                f"{c}x{c} crops; re-export the bundle (vlexport sclip) for a segmenter that takes smaller windows"
            )
        outs = {s.name: s for s in self.backend.outputs}
        if LOGITS_OUTPUT not in outs:
            raise BundleError(f"{where}: the segmenter has no {LOGITS_OUTPUT!r} output (it has {sorted(outs)})")
        oshape = outs[LOGITS_OUTPUT].shape
        q = len(self._q2c)
        if len(oshape) != 4 or (isinstance(oshape[1], int) and oshape[1] != q):
            raise BundleError(
                f"{where}: output {LOGITS_OUTPUT!r} has shape {list(oshape)}, expected [n, {q}, {c}, {c}] "
                f"({q} queries in segment.query_to_class)"
            )

    # -- running -----------------------------------------------------------------------
    def segment(
        self, bgr: np.ndarray, stamp: FrameStamp | None = None, *, return_probabilities: bool = False
    ) -> Segmentation:
        """Segment one BGR uint8 frame; the label map has the frame's size.

        ``return_probabilities=True`` also puts the class probabilities (see :meth:`probabilities`)
        on :attr:`Segmentation.probabilities`; the labels are then computed from them (argmax,
        then ``prob_threshold``), so they are exactly their argmax where no threshold applies.
        """
        return self.segment_batch([bgr], None if stamp is None else [stamp],
                                  return_probabilities=return_probabilities)[0]

    def segment_batch(
        self, images: Sequence[np.ndarray], stamps: Sequence[FrameStamp | None] | None = None, *,
        return_probabilities: bool = False,
    ) -> list[Segmentation]:
        """Segment several frames, one after the other (each frame's crops form the graph batches)."""
        def one(bgr: np.ndarray, stamp: FrameStamp | None, times: dict[str, float]) -> Segmentation:
            return self._segment_one(bgr, stamp, times, return_probabilities=return_probabilities)

        return self._one_by_one(images, stamps, "segment_batch", one)

    def probabilities(self, bgr: np.ndarray) -> np.ndarray:
        """Per-class probabilities of one BGR uint8 frame: ``float32 [C, H, W]`` at the frame's size.

        The stitched logits resized to the frame, ``x logit_scale``, softmax over all queries, max
        over each class's queries (synonyms), and the classes dropped by ``area_threshold`` set to 0
        (no renormalisation, as SCLIP): the same as PyTorch's ``SCLIPSegmenter.probabilities``.
        ``prob_threshold`` does not change them (it only relabels pixels). Holds ``C x H x W``
        float32 (about 174 MB for 21 classes at 1920x1080).
        """
        seg = self.segment(bgr, return_probabilities=True)
        assert seg.probabilities is not None  # always set with return_probabilities=True
        return seg.probabilities

    def preprocess(self, bgr: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int, int]], tuple[int, int]]:
        """One frame -> (crops ``[n, 3, h, w]`` float32, their windows, the resized ``(H, W)``).

        ``h, w`` are ``min(slide_crop, H)`` and ``min(slide_crop, W)``."""
        crops, windows, hw, _ = self._preprocess(bgr)
        return crops, windows, hw

    def _preprocess(self, bgr: np.ndarray):
        check_image(bgr)
        s = self.settings
        img = resize_short_side(bgr, s["short_side"], s["max_long_side"])
        H, W = img.shape[:2]
        if self._rgb:
            img = img[:, :, ::-1]
        norm = img.astype(np.float32) * self._a + self._b  # [H, W, 3]
        crops, windows = self._crops(norm)
        return crops, windows, (H, W), norm

    def _crops(self, norm: np.ndarray):
        s = self.settings
        H, W = norm.shape[:2]
        c = s["slide_crop"]
        ch, cw = min(c, H), min(c, W)  # every window's size (smaller than the crop on a thin frame)
        if min(ch, cw) < s["patch_size"]:
            raise UsageError(f"the frame resized to {H}x{W} is thinner than the model's {s['patch_size']}-pixel patch; "
                             "it cannot be segmented")
        if self._fixed_crop and (ch, cw) != (c, c):
            raise BundleError(
                f"{self.bundle.root}: this frame, resized to {H}x{W}, needs {ch}x{cw} windows but the segmenter takes "
                f"only {c}x{c} crops (exported before the crop size was dynamic); re-export the bundle (vlexport sclip)"
            )
        windows = window_grid(H, W, c, s["slide_stride"])
        crops = np.empty((len(windows), 3, ch, cw), np.float32)
        for k, (y1, y2, x1, x2) in enumerate(windows):
            crops[k] = norm[y1:y2, x1:x2].transpose(2, 0, 1)
        return crops, windows

    def _infer(self, crops: np.ndarray) -> np.ndarray:
        n = crops.shape[0]
        step = n if self._max_batch is None else int(self._max_batch)
        parts = []
        for i in range(0, n, step):
            chunk = crops[i : i + step]
            if self._max_batch is not None and isinstance(self._input_spec(CROPS_INPUT).shape[0], int) \
                    and chunk.shape[0] < step:
                # A fixed-batch graph: pad the last chunk with copies, drop their outputs.
                fill = np.repeat(chunk[-1:], step - chunk.shape[0], axis=0)
                res = self.backend.infer({CROPS_INPUT: np.concatenate([chunk, fill])})[LOGITS_OUTPUT][: chunk.shape[0]]
            else:
                res = self.backend.infer({CROPS_INPUT: chunk})[LOGITS_OUTPUT]
            parts.append(np.asarray(res, np.float32))
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        ch, cw, q = crops.shape[2], crops.shape[3], len(self._q2c)
        if logits.shape != (n, q, ch, cw):
            raise BundleError(
                f"{self.bundle.root}: the segmenter returned logits of shape {tuple(logits.shape)}, "
                f"expected {(n, q, ch, cw)}"
            )
        return logits

    def _segment_one(self, bgr: np.ndarray, stamp: FrameStamp | None, times: dict[str, float],
                     return_probabilities: bool = False) -> Segmentation:
        s = self.settings
        t0 = now_ms()
        crops, windows, (H, W), norm = self._preprocess(bgr)
        t1 = now_ms()
        logits = self._infer(crops)
        t2 = now_ms()
        stitched = stitch(logits, windows, H, W)
        if self._pamr_steps > 0:
            stitched = self._refine(stitched, norm, bgr.shape[:2])
        probs = None
        if return_probabilities:
            probs = probabilities_from_logits(stitched, bgr.shape[:2], self._q2c, s["logit_scale"],
                                              s["background_index"], s["area_threshold"], len(self.classes))
            labels = labels_from_probabilities(probs, s["prob_threshold"], s["background_index"])
        else:
            labels = labels_from_logits(stitched, bgr.shape[:2], self._q2c, s["logit_scale"], s["prob_threshold"],
                                        s["background_index"], s["area_threshold"])
        times["preprocess"] += t1 - t0
        times["infer"] += t2 - t1
        times["postprocess"] += now_ms() - t2
        self.last_windows = len(windows)
        return Segmentation(labels, self.classes, stamp, probabilities=probs)

    def _setup_pamr(self) -> None:
        """PAMR as the manifest says: none, in numpy (``runtime``) or the exported ``refiner`` graph."""
        pamr = self.bundle.section("segment").section("pamr")
        self._pamr_steps = int(pamr.get("steps", 0))
        self._pamr_dilations = tuple(int(d) for d in pamr.get("dilations", (8, 16)))
        self._pamr_where = pamr.get("where", "runtime")
        self._refiner = None
        if self._pamr_steps > 0 and self._pamr_where == "graph":
            from vlexport.runtime.backends import create_backend

            part = self.bundle.part("refiner")
            self._refiner = create_backend(self.bundle.verify(part.files["fp32"]), "onnxruntime", self._threads)

    def _refine(self, stitched: np.ndarray, norm: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        """PAMR at the source size, guided by the normalised input resized there (as the reference)."""
        import cv2

        H, W = out_hw
        guide = cv2.resize(norm, (W, H), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        hwq = np.ascontiguousarray(stitched.transpose(1, 2, 0))
        mask = np.stack([cv2.resize(np.ascontiguousarray(hwq[:, :, i]), (W, H), interpolation=cv2.INTER_LINEAR)
                         for i in range(hwq.shape[2])])
        if self._refiner is not None:
            out = self._refiner.infer({"guide": np.ascontiguousarray(guide[None]), "mask": mask[None]})
            return out["refined"][0]
        from vlexport.runtime.pamr import pamr

        return pamr(np.ascontiguousarray(guide), mask, self._pamr_steps, self._pamr_dilations)

    def close(self) -> None:
        """Release the segmenter (and the refiner graph, if any)."""
        if getattr(self, "_refiner", None) is not None:
            self._refiner.close()
        super().close()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({k: v for k, v in self.settings.items() if k != "query_to_class"})
        d.update(classes=len(self.classes), queries=len(self._q2c))
        return d
