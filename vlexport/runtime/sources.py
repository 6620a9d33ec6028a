"""Frame sources: image files, folders and globs, video files, cameras and network streams.

(Over 500 lines on purpose: one module because :func:`open_source` chooses among every kind of
source, and the live reader :class:`LiveSource` is a :class:`CaptureSource` that shares its
opening, error wording and counters; a live module of its own would import this one and be
imported back by ``open_source``.)

:func:`open_source` turns what a user typed into a :class:`Source`, an iterable of :class:`Frame`.
Every frame carries its index in the source and a :class:`~vlexport.runtime.results.FrameStamp`
(monotonic and wall-clock time) taken when the frame was read from the device or the file, not
when the consumer got it, so end-to-end latency can be measured from acquisition.

Two ways of reading:

* **Frame by frame** (images, and video files by default): the consumer's loop reads the next
  frame when it asks for one. Nothing is dropped; a slow consumer slows the reading down.
* **Live** (a camera index, an rtsp/http(s)/udp/... URL, and a video file opened with
  ``realtime=True``): a reader thread reads as fast as the device delivers (a file: at its own
  frame rate) and keeps only the newest frame. Iteration yields the newest frame not yet taken,
  waiting for one when there is none (in short waits, so Ctrl-C works); a slow consumer never works
  on a stale frame. A frame replaced before anyone took it counts in :attr:`Source.dropped`, and
  indices count every frame read, so gaps in the indices show the drops. The reader never waits
  for the consumer.

When a camera or stream stops delivering (a failed read or the end of the stream), the reader
logs one warning, releases the capture and reopens it with exponential backoff (``backoff =
(first, cap)`` seconds, doubling: 0.25, 0.5, 1, 2, 4, 5, 5, ... by default) without ending the
iteration; success is counted in :attr:`Source.reconnects` and logged at INFO. Iteration ends when
the consumer stops, when :meth:`Source.close` is called, or when one outage has lasted longer
than ``max_reconnect_s`` (None: keep trying for ever); a file read in realtime ends at its last
frame (files never reconnect). With ``reconnect=False`` the first outage ends the iteration.

After :meth:`Source.close`, ``frames_read == delivered + dropped`` (a frame still waiting when the
source closes counts as dropped). Images that cannot be decoded inside a folder or glob are
logged and counted in :attr:`Source.skipped`. A source that cannot be opened at all is one
:class:`~vlexport.errors.SourceError` line.

Any camera that is not an OpenCV device can be plugged in with ``capture_factory``: a callable
that takes the target (the camera index as an int, or the path/URL string) and returns an object
with OpenCV ``VideoCapture``'s ``isOpened()``, ``read()``, ``get(prop)`` and ``release()``.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vlexport.errors import SourceError, UsageError
from vlexport.runtime.results import FrameStamp

__all__ = [
    "Frame",
    "Source",
    "ImageSource",
    "CaptureSource",
    "LiveSource",
    "open_source",
    "IMAGE_EXTS",
    "DEFAULT_BACKOFF",
]

log = logging.getLogger("vlexport")

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm", ".pgm", ".ppm"})
_URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
_GLOB_CHARS = set("*?[")
_DEFAULT_FPS = 30.0
#: First and longest wait (seconds) between reconnection attempts.
DEFAULT_BACKOFF = (0.25, 5.0)
# How long the consumer waits in one go: short, so that Ctrl-C and close() are seen promptly.
_WAIT_SLICE_S = 0.1
# How long close() waits for the reader thread.
_JOIN_S = 1.0
# A network stream that neither connects nor sends for this long counts as down (FFmpeg's own
# default is far longer, and a reader stuck in FFmpeg cannot be stopped).
_STREAM_TIMEOUT_MS = 5000

CaptureFactory = Callable[[Any], Any]


@dataclass
class Frame:
    """One frame: its position in the source, the BGR uint8 image, when it was read, and from where."""

    index: int
    image: np.ndarray
    stamp: FrameStamp
    source: str


def _stamp(index: int) -> FrameStamp:
    return FrameStamp(index=index, t_monotonic=time.monotonic(), t_wall=time.time())


def _imread(path: Path) -> np.ndarray | None:
    """Read an image as BGR uint8 (None if it cannot be decoded); works with non-ASCII paths."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def _opencv_capture(target: str | int) -> Any:
    """The default capture: ``cv2.VideoCapture``, with bounded open/read waits for URLs."""
    if isinstance(target, str) and "://" in target:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _STREAM_TIMEOUT_MS,
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, _STREAM_TIMEOUT_MS]
        return cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
    return cv2.VideoCapture(target)


# -- the interface ---------------------------------------------------------------------------
class Source:
    """An iterable of :class:`Frame`. Use as a context manager, or call :meth:`close`.

    Counters, readable at any time: ``frames_read`` (frames read from the device or files),
    ``delivered`` (frames handed to the consumer), ``dropped`` (live sources: frames replaced by a
    newer one before the consumer took them), ``reconnects`` (successful reopenings after an
    outage) and ``skipped`` (unreadable images passed over).
    """

    #: What the user asked for, as given.
    spec: str
    #: Nominal frame rate (the video's, or a default for images and unknown streams).
    fps: float = _DEFAULT_FPS
    #: True when a reader thread keeps only the newest frame (cameras, streams, realtime files).
    live: bool = False

    def __init__(self) -> None:
        self.frames_read = 0
        self.delivered = 0
        self.dropped = 0
        self.reconnects = 0
        self.skipped = 0

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def len_hint(self) -> int | None:
        """Number of frames (or files) expected, for progress bars; None when unknown."""
        return None

    def close(self) -> None:
        """Release the source (idempotent)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class ImageSource(Source):
    """Still images, in the given order; unreadable ones are logged, counted and skipped.

    A frame's index is the image's position in the list, so a skipped image leaves a gap.
    """

    def __init__(self, paths: list[Path], spec: str, fps: float = _DEFAULT_FPS):
        super().__init__()
        self.paths = list(paths)
        self.spec = spec
        self.fps = fps

    def __iter__(self) -> Iterator[Frame]:
        for i, path in enumerate(self.paths):
            img = _imread(path)
            if img is None:
                self.skipped += 1
                log.warning("skipping %s: not a readable image", path)
                continue
            self.frames_read += 1
            frame = Frame(index=i, image=img, stamp=_stamp(i), source=str(path))
            self.delivered += 1
            yield frame

    def len_hint(self) -> int | None:
        return len(self.paths)


class CaptureSource(Source):
    """A video file, camera or stream read frame by frame in the consumer's loop (nothing dropped).

    ``target`` is what the capture opens (a path or URL string, or a camera index); ``spec`` is
    what the user typed. ``live`` only picks the wording of errors and hides the frame count here:
    :class:`LiveSource` is the newest-frame reader.
    """

    def __init__(self, target: str | int, spec: str, live: bool = False, *,
                 capture_factory: CaptureFactory | None = None):
        super().__init__()
        self.spec = spec
        self._target = target
        self._stream = live
        self._factory: CaptureFactory = capture_factory or _opencv_capture
        self._closed = False
        self._cap: Any = self._open_first()
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0.0 < fps < 1000.0 else _DEFAULT_FPS
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._count = count if (count > 0 and not live) else None

    def _kind(self) -> str:
        if isinstance(self._target, int):
            return "camera"
        return "stream" if self._stream else "video file"

    def _open_first(self) -> Any:
        try:
            cap = self._factory(self._target)
        except Exception as e:  # a custom camera's driver error is still "cannot open"
            raise SourceError(f"cannot open {self._kind()} {self.spec!r}: {type(e).__name__}: {e}") from e
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            raise SourceError(f"cannot open {self._kind()} {self.spec!r}: OpenCV could not read it")
        return cap

    def __iter__(self) -> Iterator[Frame]:
        if self._closed:
            raise SourceError(f"source {self.spec!r} is closed")
        while self._cap is not None:
            ok, img = self._cap.read()
            if not ok or img is None:
                break
            index = self.frames_read
            frame = Frame(index=index, image=img, stamp=_stamp(index), source=self.spec)
            self.frames_read += 1
            self.delivered += 1
            yield frame

    def len_hint(self) -> int | None:
        return self._count

    def close(self) -> None:
        self._closed = True
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class LiveSource(CaptureSource):
    """A camera, stream or realtime file read by a thread that keeps only the newest frame.

    The capture is opened (and checked) at construction; the reader thread starts with the first
    iteration, or with :meth:`start`. See the module docstring for the reconnection policy.
    ``realtime_file=True`` paces a file at its own frame rate and ends at its last frame.
    """

    live = True

    def __init__(self, target: str | int, spec: str, *, realtime_file: bool = False, reconnect: bool = True,
                 backoff: tuple[float, float] = DEFAULT_BACKOFF, max_reconnect_s: float | None = None,
                 capture_factory: CaptureFactory | None = None):
        first, cap = _check_backoff(backoff)
        if max_reconnect_s is not None and not (isinstance(max_reconnect_s, (int, float)) and max_reconnect_s > 0):
            raise UsageError(f"max_reconnect_s must be a positive number of seconds or None, got {max_reconnect_s!r}")
        super().__init__(target, spec, live=not realtime_file, capture_factory=capture_factory)
        self.realtime_file = realtime_file
        self.reconnect = reconnect and not realtime_file
        self.backoff = (first, cap)
        self.max_reconnect_s = None if max_reconnect_s is None else float(max_reconnect_s)
        #: Why the reader stopped ("end of file", "outage ...", "closed"); None while it runs.
        self.end_reason: str | None = None
        self._cond = threading.Condition()
        self._latest: Frame | None = None  # newest frame not yet taken
        self._ended = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True while the reader thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def ready(self) -> bool:
        """True when a frame not yet taken is waiting (the next iteration step will not wait)."""
        return self._latest is not None

    # -- the consumer's side ----------------------------------------------------------------
    def start(self) -> None:
        """Start the reader thread now (iteration starts it otherwise); idempotent."""
        if self._closed:
            raise SourceError(f"source {self.spec!r} is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._read_loop, name=f"vlexport-source:{self.spec}", daemon=True)
            self._thread.start()

    def __iter__(self) -> Iterator[Frame]:
        self.start()
        while True:
            frame = self._take()
            if frame is None:
                return
            yield frame

    def _take(self) -> Frame | None:
        """The newest untaken frame, waiting for one; None once the reader is done and drained."""
        with self._cond:
            while self._latest is None:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self._ended or self._stop.is_set():
                    return None
                self._cond.wait(_WAIT_SLICE_S)
            frame, self._latest = self._latest, None
            self.delivered += 1
            return frame

    def close(self) -> None:
        """Stop the reader thread and release the capture; returns within about a second."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._cond:
            if self._latest is not None:  # read but never taken
                self._latest = None
                self.dropped += 1
            self._cond.notify_all()
        thread = self._thread
        if thread is None:
            super().close()
            return
        thread.join(_JOIN_S)
        if thread.is_alive():
            # Stuck inside the capture's read or open; the thread releases the capture itself when
            # that call returns, and being a daemon it never holds the process up.
            log.debug("source %s: reader thread still inside the capture after %.1fs", self.spec, _JOIN_S)

    # -- the reader thread ------------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            self._read_until_done()
        except BaseException as e:  # a bug in a custom capture: hand it to the consumer
            with self._cond:
                self._error = e
        finally:
            with self._cond:
                self._ended = True
                if self.end_reason is None:
                    self.end_reason = "closed" if self._stop.is_set() else "error"
                self._cond.notify_all()
            cap, self._cap = self._cap, None
            if cap is not None:
                cap.release()

    def _read_until_done(self) -> None:
        period = 1.0 / self.fps
        due = time.monotonic()
        while not self._stop.is_set():
            ok, img = self._read_one()
            if not ok:
                if self.realtime_file:
                    self.end_reason = "end of file"
                    return
                if not self._recover():
                    return
                continue
            self._publish(img)
            if self.realtime_file:
                # Pace at the file's own rate; after a stall, restart the clock rather than burst.
                due += period
                delay = due - time.monotonic()
                if delay < -period:
                    due = time.monotonic()
                elif delay > 0:
                    self._stop.wait(delay)

    def _read_one(self) -> tuple[bool, np.ndarray | None]:
        try:
            ok, img = self._cap.read()
        except Exception as e:
            if self.realtime_file:
                raise
            log.debug("source %s: read raised %s: %s", self.spec, type(e).__name__, e)
            return False, None
        return bool(ok) and img is not None, img

    def _publish(self, img: np.ndarray) -> None:
        stamp = _stamp(self.frames_read)  # taken as the frame arrives, before any waiting
        frame = Frame(index=stamp.index, image=img, stamp=stamp, source=self.spec)
        with self._cond:
            if self._stop.is_set():  # closing: close() has settled the counters already
                return
            if self._latest is not None:
                self.dropped += 1
            self._latest = frame
            self.frames_read += 1
            self._cond.notify_all()

    def _recover(self) -> bool:
        """Reopen the capture with backoff; False when the source should end instead."""
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
        if not self.reconnect:
            log.warning("%s %s stopped delivering frames; reconnect is off, ending", self._kind(), self.spec)
            self.end_reason = "stream stopped (reconnect off)"
            return False
        budget = "" if self.max_reconnect_s is None else f", giving up after {self.max_reconnect_s:g}s"
        log.warning("%s %s stopped delivering frames; reconnecting (backoff %gs to %gs%s)",
                    self._kind(), self.spec, self.backoff[0], self.backoff[1], budget)
        t0 = time.monotonic()
        backoff, attempts = self.backoff[0], 0
        while True:
            delay = backoff
            if self.max_reconnect_s is not None:
                remaining = self.max_reconnect_s - (time.monotonic() - t0)
                if remaining <= 0:
                    log.error("%s %s: no frames for %.1fs (max_reconnect_s=%g); ending",
                              self._kind(), self.spec, time.monotonic() - t0, self.max_reconnect_s)
                    self.end_reason = f"outage longer than {self.max_reconnect_s:g}s"
                    return False
                delay = min(delay, remaining)  # one last attempt at the end of the budget
            if self._stop.wait(delay):
                return False
            attempts += 1
            cap = self._try_open()
            if cap is not None:
                if self._stop.is_set():
                    cap.release()
                    return False
                self._cap = cap
                self.reconnects += 1
                log.info("%s %s: reconnected after %.1fs (%d attempt%s)", self._kind(), self.spec,
                         time.monotonic() - t0, attempts, "" if attempts == 1 else "s")
                return True
            backoff = min(backoff * 2.0, self.backoff[1])

    def _try_open(self) -> Any:
        try:
            cap = self._factory(self._target)
        except Exception as e:
            log.debug("source %s: reopening raised %s: %s", self.spec, type(e).__name__, e)
            return None
        if cap is None:
            return None
        if not cap.isOpened():
            cap.release()
            return None
        return cap


def _check_backoff(backoff: Any) -> tuple[float, float]:
    try:
        first, cap = (float(b) for b in backoff)
    except (TypeError, ValueError):
        raise UsageError(f"backoff must be (first, longest) seconds, got {backoff!r}") from None
    if not (0 < first <= cap):
        raise UsageError(f"backoff must be (first, longest) seconds with 0 < first <= longest, got {backoff!r}")
    return first, cap


def open_source(
    spec: str | int | os.PathLike,
    *,
    realtime: bool = False,
    reconnect: bool = True,
    backoff: tuple[float, float] = DEFAULT_BACKOFF,
    max_reconnect_s: float | None = None,
    capture_factory: CaptureFactory | None = None,
) -> Source:
    """Open a frame source; a missing or unreadable one is a SourceError naming it.

    ``spec`` is an image file, a folder of images (sorted by name), a glob pattern, a video file,
    a camera index (``0`` or ``"0"``) or an rtsp/http(s)/udp URL (any ``scheme://`` when a
    ``capture_factory`` is given). Cameras and URLs are live (newest frame only, reconnecting);
    ``realtime=True`` reads a video file the same way at its own frame rate. ``reconnect``,
    ``backoff`` (first, longest wait in seconds) and ``max_reconnect_s`` (the longest one outage
    may last; None: for ever) set the reconnection policy of cameras and URLs.
    ``capture_factory(target)`` replaces ``cv2.VideoCapture`` for videos, cameras and streams.
    """
    if isinstance(spec, bool) or not isinstance(spec, (str, int, os.PathLike)):
        raise SourceError(f"invalid source {spec!r}: give a path, a glob, a camera index or a URL")
    _check_backoff(backoff)
    live_options = dict(reconnect=reconnect, backoff=backoff, max_reconnect_s=max_reconnect_s,
                        capture_factory=capture_factory)
    if isinstance(spec, int):
        return LiveSource(spec, str(spec), **live_options)
    text = os.fspath(spec)
    if not isinstance(text, str) or not text:
        raise SourceError(f"empty or invalid source {spec!r}")
    if text.isdigit():
        return LiveSource(int(text), text, **live_options)
    if text.lower().startswith(_URL_SCHEMES) or (capture_factory is not None and "://" in text):
        return LiveSource(text, text, **live_options)
    path = Path(text).expanduser()
    images: list[Path] | None = None
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not images:
            raise SourceError(f"source folder {text!r} has no images ({', '.join(sorted(IMAGE_EXTS))})")
    elif path.is_file():
        if path.suffix.lower() not in IMAGE_EXTS:
            if realtime:
                return LiveSource(str(path), text, realtime_file=True, **live_options)
            return CaptureSource(str(path), text, live=False, capture_factory=capture_factory)
        # A single image is the whole source: an unreadable one is an error, not a skip.
        if _imread(path) is None:
            raise SourceError(f"cannot read image {text!r}: not a valid image file")
        images = [path]
    elif _GLOB_CHARS & set(text):
        images = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        images = [p for p in images if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        if not images:
            raise SourceError(f"glob pattern {text!r} matches no images")
    if images is None:
        raise SourceError(
            f"source not found: {text!r} (expected an image, a folder of images, a glob pattern, "
            "a video file, a camera index or an rtsp/http URL)"
        )
    if realtime:
        raise UsageError(f"realtime reading needs a video file, camera or stream; {text!r} is still images")
    return ImageSource(images, text)
