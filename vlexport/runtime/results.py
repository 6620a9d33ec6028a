"""Typed task results, validated on construction ("got shape X, expected Y")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FrameStamp", "Detections", "Embedding", "Caption", "FrameResult"]

_DECIMALS = 2  # JSON pixel coordinates: centi-pixels are plenty
_SCORE_DECIMALS = 4


@dataclass(frozen=True)
class FrameStamp:
    """Where a frame came from in time: its index in the source and when it was acquired."""

    index: int
    t_monotonic: float
    t_wall: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame": int(self.index),
            "t_monotonic": round(float(self.t_monotonic), 6),
            "t_wall": round(float(self.t_wall), 6),
        }


def _as_array(name: str, value: Any, dtype: Any, shape_desc: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: got dtype {arr.dtype}, expected a numeric array {shape_desc}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _int_ids(name: str, value: Any, k: int) -> np.ndarray:
    """``value`` as a contiguous int64 ``[k]`` array, or a ValueError naming ``name``."""
    arr = np.asarray(value)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: got dtype {arr.dtype}, expected an integer array")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.shape != (k,):
        raise ValueError(f"{name}: got shape {tuple(arr.shape)}, expected ({k},)")
    return arr


@dataclass
class Detections:
    """Detections in one frame: xyxy boxes in source-image pixels, scores, class ids and labels.

    ``masks``, for models that segment their detections (DETR's mask head), is a bool
    ``[K, H, W]`` array in source-image pixels, one mask per detection; None otherwise.
    ``track_ids``, set by a tracker (:mod:`vlexport.runtime.tracking`), is an int64 ``[K]`` array
    of ids that stay the same for one object across frames (-1: not tracked); None otherwise.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    labels: list[str] = field(default_factory=list)
    stamp: FrameStamp | None = None
    masks: np.ndarray | None = None
    track_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.boxes = _as_array("boxes", self.boxes, np.float32, "[K, 4]")
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            # An empty list of boxes is the one shape we accept loosely: no detections.
            if self.boxes.size == 0:
                self.boxes = self.boxes.reshape(0, 4)
            else:
                raise ValueError(f"boxes: got shape {tuple(self.boxes.shape)}, expected (K, 4)")
        k = self.boxes.shape[0]
        self.scores = _as_array("scores", self.scores, np.float32, "[K]")
        if self.scores.shape != (k,):
            raise ValueError(f"scores: got shape {tuple(self.scores.shape)}, expected ({k},)")
        self.class_ids = _int_ids("class_ids", self.class_ids, k)
        self.labels = list(self.labels)
        if len(self.labels) != k:
            raise ValueError(f"labels: got {len(self.labels)} labels, expected {k}")
        if self.stamp is not None and not isinstance(self.stamp, FrameStamp):
            raise ValueError(f"stamp: got {type(self.stamp).__name__}, expected FrameStamp or None")
        if self.masks is not None:
            masks = np.asarray(self.masks)
            if masks.dtype != np.bool_:
                raise ValueError(f"masks: got dtype {masks.dtype}, expected bool [K, H, W]")
            if masks.ndim != 3 or masks.shape[0] != k:
                raise ValueError(f"masks: got shape {tuple(masks.shape)}, expected ({k}, H, W)")
            self.masks = masks
        if self.track_ids is not None:
            self.track_ids = _int_ids("track_ids", self.track_ids, k)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, stamp: FrameStamp | None = None) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64), [], stamp)

    def records(self) -> list[dict[str, Any]]:
        """One JSON-safe dict per detection: box (rounded), score, class_id, label,
        ``mask_area`` (pixels in its mask) when there are masks, and ``track_id`` when tracked."""
        boxes = np.round(self.boxes.astype(np.float64), _DECIMALS).tolist()
        scores = np.round(self.scores.astype(np.float64), _SCORE_DECIMALS).tolist()
        out = [
            {"box": b, "score": s, "class_id": int(c), "label": str(lab)}
            for b, s, c, lab in zip(boxes, scores, self.class_ids.tolist(), self.labels)
        ]
        if self.masks is not None:
            for rec, area in zip(out, self.masks.sum(axis=(1, 2)).tolist()):
                rec["mask_area"] = int(area)
        if self.track_ids is not None:
            for rec, tid in zip(out, self.track_ids.tolist()):
                rec["track_id"] = int(tid)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the stamp's fields (when there is one) and ``detections``."""
        out: dict[str, Any] = self.stamp.to_dict() if self.stamp is not None else {}
        out["detections"] = self.records()
        return out


@dataclass
class Embedding:
    """One image embedding: a 1-D float32 vector (L2-normalised by the exported graph)."""

    vector: np.ndarray
    stamp: FrameStamp | None = None

    def __post_init__(self) -> None:
        self.vector = _as_array("vector", self.vector, np.float32, "[D]")
        if self.vector.ndim != 1 or self.vector.shape[0] == 0:
            raise ValueError(f"vector: got shape {tuple(self.vector.shape)}, expected (D,) with D > 0")
        if self.stamp is not None and not isinstance(self.stamp, FrameStamp):
            raise ValueError(f"stamp: got {type(self.stamp).__name__}, expected FrameStamp or None")

    def __len__(self) -> int:
        return int(self.vector.shape[0])

    def to_dict(self, decimals: int = 6) -> dict[str, Any]:
        out: dict[str, Any] = self.stamp.to_dict() if self.stamp is not None else {}
        out["embedding"] = np.round(self.vector.astype(np.float64), decimals).tolist()
        return out


@dataclass
class Caption:
    """A generated caption for one frame, with the encoder's region predictions when it makes them.

    ``token_ids`` are the generated GPT-2 ids (no end-of-sequence token); ``score`` the decoder's
    log-probability score (see :mod:`vlexport.runtime.decoding`). The optional regions are ``boxes``
    ``[K, 4]`` xyxy in source pixels, ``objectness`` ``[K]`` probabilities, ``class_ids`` ``[K]`` and
    their ``labels`` (class ids and labels may be None when the model has no region classes).
    """

    text: str
    token_ids: list[int]
    score: float = 0.0
    stamp: FrameStamp | None = None
    boxes: np.ndarray | None = None
    objectness: np.ndarray | None = None
    class_ids: np.ndarray | None = None
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"text: got {type(self.text).__name__}, expected str")
        ids = np.asarray(self.token_ids)
        if ids.size and (ids.ndim != 1 or ids.dtype.kind not in "iu"):
            raise ValueError(f"token_ids: got shape {tuple(ids.shape)} dtype {ids.dtype}, expected a list of ints")
        self.token_ids = [int(i) for i in ids.reshape(-1)]
        self.score = float(self.score)
        if self.stamp is not None and not isinstance(self.stamp, FrameStamp):
            raise ValueError(f"stamp: got {type(self.stamp).__name__}, expected FrameStamp or None")
        if (self.boxes is None) != (self.objectness is None):
            raise ValueError("boxes and objectness come together: give both or neither")
        if self.boxes is None:
            if self.class_ids is not None or self.labels is not None:
                raise ValueError("class_ids and labels need boxes")
            return
        self.boxes = _as_array("boxes", self.boxes, np.float32, "[K, 4]")
        if self.boxes.size == 0:
            self.boxes = self.boxes.reshape(0, 4)
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes: got shape {tuple(self.boxes.shape)}, expected (K, 4)")
        k = self.boxes.shape[0]
        self.objectness = _as_array("objectness", self.objectness, np.float32, "[K]")
        if self.objectness.shape != (k,):
            raise ValueError(f"objectness: got shape {tuple(self.objectness.shape)}, expected ({k},)")
        if self.class_ids is not None:
            self.class_ids = _int_ids("class_ids", self.class_ids, k)
        if self.labels is not None:
            self.labels = [str(x) for x in self.labels]
            if len(self.labels) != k:
                raise ValueError(f"labels: got {len(self.labels)} labels, expected {k}")

    def regions(self) -> list[dict[str, Any]]:
        """One JSON-safe dict per region: box (rounded), objectness, and class_id/label when known."""
        if self.boxes is None or self.objectness is None:
            return []
        boxes = np.round(self.boxes.astype(np.float64), _DECIMALS).tolist()
        obj = np.round(self.objectness.astype(np.float64), _SCORE_DECIMALS).tolist()
        out: list[dict[str, Any]] = []
        for i, (b, o) in enumerate(zip(boxes, obj)):
            r: dict[str, Any] = {"box": b, "objectness": o}
            if self.class_ids is not None:
                r["class_id"] = int(self.class_ids[i])
            if self.labels is not None:
                r["label"] = self.labels[i]
            out.append(r)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the stamp's fields (when there is one), ``caption``, ``token_ids``,
        ``score`` and, when the model predicts them, ``regions``."""
        out: dict[str, Any] = self.stamp.to_dict() if self.stamp is not None else {}
        out["caption"] = self.text
        out["token_ids"] = list(self.token_ids)
        out["score"] = round(self.score, _SCORE_DECIMALS) if np.isfinite(self.score) else None
        if self.boxes is not None:
            out["regions"] = self.regions()
        return out


@dataclass
class FrameResult:
    """One frame leaving the pipeline.

    ``results`` holds what was computed on this very frame (task name → Detections,
    Segmentation or Caption); ``latest`` the most recent result of every task at this point of
    the stream (what an overlay shows); ``timings`` the frame's stage latencies in ms.
    """

    frame: Any
    results: dict[str, Any]
    latest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def index(self) -> int:
        return int(self.frame.index)

    def record(self) -> dict[str, Any]:
        """The JSONL record: index, timestamps, source, then each task's result that ran on this frame
        (``detections``, ``segmentation``, ``caption``; a custom task under its own name)."""
        rec: dict[str, Any] = {**self.frame.stamp.to_dict(), "source": self.frame.source}
        for name, result in self.results.items():
            rec[_RECORD_KEYS.get(name, name)] = _result_fields(result)
        return rec


_STAMP_KEYS = ("frame", "t_monotonic", "t_wall")
_RECORD_KEYS = {"detect": "detections", "segment": "segmentation", "caption": "caption"}


def _result_fields(result: Any) -> Any:
    kind = type(result).__name__
    if kind == "Detections":
        return result.records()
    fields = {k: v for k, v in result.to_dict().items() if k not in _STAMP_KEYS}
    if kind == "Caption":
        fields = {"text": fields.pop("caption"), **fields}
    return fields
