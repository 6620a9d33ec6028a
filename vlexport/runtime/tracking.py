"""Multi-object tracking: stable ids for detections across frames.

A thin wrapper around `supervision <https://github.com/roboflow/supervision>`_'s ByteTrack
(the ``track`` extra: ``pip install 'vlexport[track]'``); supervision is imported when a
:class:`Tracker` is created, never with this module.

>>> tracker = Tracker("bytetrack", frame_rate=25)
>>> for frame, stamp in source:
...     dets = tracker.update(task.detect(frame, stamp))   # dets.track_ids: one id per detection

ByteTrack associates boxes by IoU after a Kalman prediction of every track's motion, first
with the confident detections, then with the weak ones; it does not look at class ids, so the
output keeps each detection's own class. It counts frames by calls to :meth:`Tracker.update`:
call it once per processed frame, also when a frame has no detections. A track that starts
after the first frame is confirmed by its second detection: an object's first frame is
reported untracked (-1), its id comes from the next frame on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vlexport.errors import DependencyError, UsageError
from vlexport.runtime.results import Detections

__all__ = ["Tracker", "TRACKERS", "UNTRACKED"]

#: The tracker kinds :class:`Tracker` knows.
TRACKERS = ("bytetrack",)
#: The track id of a detection no track claimed (too weak to start one, or a duplicate).
UNTRACKED = -1

# ByteTrack's options, with the check each value must pass (supervision's names and defaults:
# activation 0.25, buffer 30 frames at 30 fps, matching 0.8, 1 consecutive frame).
_FRACTION = ("a number between 0 and 1", lambda v: _is_number(v) and 0.0 <= float(v) <= 1.0)
_COUNT = ("a positive integer", lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1)
_BYTETRACK_PARAMS: dict[str, tuple[str, Any]] = {
    "track_activation_threshold": _FRACTION,
    "minimum_matching_threshold": _FRACTION,
    "lost_track_buffer": _COUNT,
    "minimum_consecutive_frames": _COUNT,
}
_INSTALL = "pip install 'vlexport[track]'"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _import_supervision() -> Any:
    try:
        import supervision
    except ImportError as e:
        raise DependencyError(f"multi-object tracking needs the supervision library: {_INSTALL}") from e
    return supervision


class Tracker:
    """Gives detections ids that stay the same for one object across frames.

    ``kind`` is one of :data:`TRACKERS`; ``frame_rate`` is the rate :meth:`update` is called
    at (it scales how long a lost track is kept). ``params`` are the tracker's options:
    ``track_activation_threshold`` (a detection must score at least this + 0.1 to start a track),
    ``lost_track_buffer`` (frames, at 30 fps, a lost track waits to be found again),
    ``minimum_matching_threshold`` and ``minimum_consecutive_frames``.
    """

    def __init__(self, kind: str = "bytetrack", frame_rate: float = 30, **params: Any):
        if kind not in TRACKERS:
            raise UsageError(f"unknown tracker {kind!r}; choose one of {', '.join(TRACKERS)}")
        if not _is_number(frame_rate) or not float(frame_rate) > 0:
            raise UsageError(f"the tracker's frame_rate must be a positive number, got {frame_rate!r}")
        unknown = sorted(set(params) - set(_BYTETRACK_PARAMS))
        if unknown:
            raise UsageError(f"unknown {kind} option(s) {unknown}; choose from {sorted(_BYTETRACK_PARAMS)}")
        for name, value in params.items():
            what, ok = _BYTETRACK_PARAMS[name]
            if not ok(value):
                raise UsageError(f"{kind} option {name} must be {what}, got {value!r}")
        self.kind = kind
        self.frame_rate = float(frame_rate)
        self.params = dict(params)
        self._sv = _import_supervision()
        self._tracker = self._sv.ByteTrack(frame_rate=self.frame_rate, **self.params)

    def update(self, detections: Detections) -> Detections:
        """Advance the tracker by one frame; returns new Detections with ``track_ids`` set.

        Every detection is kept, in its order; one that no track claims gets :data:`UNTRACKED`.
        Boxes, scores, classes, labels, masks and the stamp are those of the input (the arrays
        are shared, not copied); the input itself is left unchanged.
        """
        if not isinstance(detections, Detections):
            raise UsageError(f"Tracker.update takes Detections, got {type(detections).__name__}")
        n = len(detections)
        sv_dets = self._sv.Detections(
            xyxy=detections.boxes.astype(np.float64),
            confidence=detections.scores.astype(np.float64),
            class_id=detections.class_ids.copy(),
            # supervision returns the subset of detections it tracked: the index maps them back.
            data={"index": np.arange(n)},
        )
        tracked = self._tracker.update_with_detections(sv_dets)
        ids = np.full(n, UNTRACKED, dtype=np.int64)
        if len(tracked):
            ids[np.asarray(tracked.data["index"], dtype=np.int64)] = np.asarray(tracked.tracker_id, dtype=np.int64)
        return dataclasses.replace(detections, track_ids=ids)

    def reset(self) -> None:
        """Forget every track (a new video, a camera that jumped); ids start again from the first."""
        self._tracker.reset()

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in sorted(self.params.items()))
        return f"Tracker({self.kind!r}, frame_rate={self.frame_rate:g}{opts})"
