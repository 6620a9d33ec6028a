"""The ROS-free heart of the detection node: a bundle, an optional tracker, a changeable vocabulary.

:class:`DetectorCore` takes a BGR frame with its header's stamp and frame id and returns the
fields of a ``vision_msgs/Detection2DArray`` (:func:`~vlexport.ros2.convert.detections_to_fields`);
the node only converts messages in and out. It is thread-safe: a vocabulary change waits for
the frame being detected, and the next frame uses the new classes.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlexport.errors import UsageError
from vlexport.ros2.convert import CLASS_ID_FORMATS, detections_to_fields, stamp_to_seconds
from vlexport.ros2.vocabulary import VocabularyEncoder, parse_class_names
from vlexport.runtime.results import Detections, FrameStamp

__all__ = ["DetectorCore"]


class DetectorCore:
    """Runs a detect bundle on frames, with tracking and run-time vocabulary changes.

    ``precision``/``backend``/``threads`` choose how the detector loads (None: the best here);
    ``score_threshold`` None keeps the bundle's. ``vocabulary`` (class names) replaces the
    bundle's classes at start; ``vocabulary_file`` and ``templates`` feed the
    :class:`~vlexport.ros2.vocabulary.VocabularyEncoder`. ``track`` gives detections stable ids
    (``pip install 'vlexport[track]'``), ``track_frame_rate`` being the rate frames arrive at.
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        *,
        precision: str | None = None,
        backend: str | None = None,
        threads: int | None = None,
        score_threshold: float | None = None,
        vocabulary: Sequence[str] | str | None = None,
        vocabulary_file: str | os.PathLike | None = None,
        templates: str | os.PathLike | None = None,
        track: bool = False,
        track_frame_rate: float = 30.0,
        class_id_format: str = "name",
    ):
        from vlexport.runtime.tasks.detect import DetectTask

        if class_id_format not in CLASS_ID_FORMATS:
            raise UsageError(f"unknown class id format {class_id_format!r}; choose one of {', '.join(CLASS_ID_FORMATS)}")
        self.class_id_format = class_id_format
        self._lock = threading.Lock()
        self._frames = itertools.count()
        self.task = DetectTask(bundle, precision=precision, backend=backend, threads=threads)
        #: The bundle's own score threshold and classes, restored by ``set_score_threshold(None)``
        #: and ``set_vocabulary(core.default_classes)``.
        self.default_score_threshold: float = self.task.settings["score_threshold"]
        self.default_classes: list[str] = list(self.task.classes)
        self._vocabulary_file = vocabulary_file
        self._templates = templates
        self._encoder: VocabularyEncoder | None = None
        self.tracker: Any = None
        try:
            if score_threshold is not None:
                self.set_score_threshold(score_threshold)
            if track:
                self.set_tracking(True, track_frame_rate)
            if vocabulary is not None and (not isinstance(vocabulary, str) or vocabulary.strip()):
                self.set_vocabulary(vocabulary)
        except BaseException:
            self.close()
            raise

    # -- settings ------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """The classes the detector reports now."""
        return list(self.task.classes)

    @property
    def vocab_mode(self) -> str:
        """``"input"`` when the vocabulary can change at run time, ``"baked"`` otherwise."""
        return self.task.vocab_mode

    def set_vocabulary(self, classes: Sequence[str] | str, vocabulary_file: str | os.PathLike | None = None) -> list[str]:
        """Detect ``classes`` from the next frame on; returns the new class list.

        A baked bundle raises :class:`~vlexport.errors.UsageError`; names that none of the
        encoder's sources can embed raise it too, and the current vocabulary stays.
        ``vocabulary_file`` replaces the ``.npz`` of precomputed embeddings given so far.
        """
        if self.task.vocab_mode != "input":
            raise UsageError(
                f"{self.task.bundle.root}: this bundle has its vocabulary baked into the graph; "
                "re-export it with --vocab-mode input to change classes at run time"
            )
        names = parse_class_names(classes)
        if vocabulary_file is not None and vocabulary_file != self._vocabulary_file:
            self._vocabulary_file = vocabulary_file
            self._close_encoder()
        embeddings = self._vocabulary_encoder().encode(names)
        with self._lock:
            self.task.set_vocabulary(names, embeddings)
        return names

    def set_score_threshold(self, value: float | None) -> None:
        """Report detections scoring at least ``value`` (0..1; None: the bundle's) from the next frame on."""
        if value is None:
            value = self.default_score_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise UsageError(f"score_threshold must be a number between 0 and 1, got {value!r}")
        with self._lock:
            self.task.settings["score_threshold"] = float(value)

    def set_tracking(self, enabled: bool, frame_rate: float = 30.0) -> None:
        """Turn tracking on (fresh tracks) or off."""
        tracker = None
        if enabled:
            from vlexport.runtime.tracking import Tracker

            tracker = Tracker("bytetrack", frame_rate=frame_rate)
        with self._lock:
            self.tracker = tracker

    # -- running -------------------------------------------------------------------------
    def detect(self, bgr: np.ndarray, stamp: tuple[int, int] = (0, 0)) -> Detections:
        """Detections (with track ids when tracking) for one frame; ``stamp`` is its header's (sec, nanosec)."""
        frame = FrameStamp(next(self._frames), time.monotonic(), stamp_to_seconds(*stamp))
        with self._lock:
            dets = self.task.detect(bgr, frame)
            if self.tracker is not None:
                dets = self.tracker.update(dets)
        return dets

    def process(self, bgr: np.ndarray, frame_id: str = "", stamp: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """The ``vision_msgs/Detection2DArray`` fields for one frame (see :func:`detections_to_fields`)."""
        dets = self.detect(bgr, stamp)
        return detections_to_fields(dets, frame_id=frame_id, stamp=stamp, class_id_format=self.class_id_format)

    # -- helpers -------------------------------------------------------------------------
    def _vocabulary_encoder(self) -> VocabularyEncoder:
        if self._encoder is None:
            self._encoder = VocabularyEncoder(self.task.bundle, vocabulary_file=self._vocabulary_file,
                                              templates=self._templates)
        return self._encoder

    def _close_encoder(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None

    def close(self) -> None:
        """Release the models."""
        self._close_encoder()
        self.task.close()
