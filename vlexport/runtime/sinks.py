"""Result sinks: an annotated video or image, JSONL records, a window.

File sinks (:class:`VideoSink`, :class:`JsonlSink`, :class:`ImageSink`) write to a temporary file
beside the target and rename it into place on :meth:`close`, so a reader never sees a
half-written file; :class:`AnnotatedSink`, :class:`RecordSink` and :class:`WindowSink` adapt them
(and a window) to the pipeline's frame results. Running tasks over a source with these sinks is
:mod:`vlexport.runtime.run`'s job; sources are :mod:`vlexport.runtime.sources`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vlexport.errors import OutputError, UsageError
from vlexport.runtime.sources import IMAGE_EXTS

__all__ = [
    "VideoSink",
    "JsonlSink",
    "ImageSink",
    "open_frame_sink",
    "AnnotatedSink",
    "RecordSink",
    "WindowSink",
    "annotate",
    "check_display",
]

log = logging.getLogger("vlexport")

# Names that lived here before; served from their modules for old imports (drop once none is left).
# -- sinks -----------------------------------------------------------------------------------
class _AtomicSink:
    """A file written under a temporary name beside ``path`` and renamed into place on close.

    As a context manager it commits on normal exit and on KeyboardInterrupt (what was written is
    complete and useful) and discards the temporary file on any other exception.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise OutputError(f"cannot write {self.path}: it is a folder; give a file path")
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the output folder {folder}: {e.strerror or e}") from e
        # Same folder as the target so the final rename is atomic; the real suffix so that
        # OpenCV picks the right container.
        self.tmp_path = folder / f".{self.path.stem}.{uuid.uuid4().hex[:8]}.tmp{self.path.suffix}"
        try:
            self._fh = open(self.tmp_path, "w", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write to the output folder {folder}: {e.strerror or e}") from e
        self.closed = False

    def _finish(self) -> bool:
        """Flush the content into the temporary file; False when there is nothing worth keeping."""
        return True

    def close(self) -> None:
        """Finish the file and move it into place (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            keep = self._finish()
        except BaseException:
            self._discard()
            raise
        if keep:
            try:
                os.replace(self.tmp_path, self.path)
            except OSError as e:
                self._discard()
                raise OutputError(f"cannot move the output into place at {self.path}: {e.strerror or e}") from e
        else:
            self._discard()

    def abort(self) -> None:
        """Drop what was written; the target path is left untouched (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._finish()
        finally:
            self._discard()

    def _discard(self) -> None:
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            self.close()
        else:
            self.abort()


class JsonlSink(_AtomicSink):
    """One JSON object per line, flushed per line; appears at ``path`` on :meth:`close`."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        if self.closed:
            raise UsageError(f"{self.path}: the JSONL sink is closed")
        self._fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._fh.flush()
        self.lines += 1

    def _finish(self) -> bool:
        self._fh.close()
        return True


class VideoSink(_AtomicSink):
    """An mp4 (``mp4v``) video; appears at ``path`` on :meth:`close`, complete and readable.

    ``size`` is ``(width, height)``; None takes it from the first frame. Frames of another size are
    resized to it (an image folder may mix sizes; a video file cannot). With no frame written,
    :meth:`close` writes nothing.
    """

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int] | None = None, fourcc: str = "mp4v"):
        if not fps or fps <= 0:
            raise UsageError(f"video fps must be positive, got {fps!r}")
        super().__init__(path)
        self._fh.close()  # created only to prove the folder is writable; OpenCV writes the file
        self.fps = float(fps)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.fourcc = fourcc
        self.frames = 0
        self._writer: Any = None

    def _open_writer(self, size: tuple[int, int]) -> None:
        writer = cv2.VideoWriter(str(self.tmp_path), cv2.VideoWriter.fourcc(*self.fourcc), self.fps, size)
        if not writer.isOpened():
            raise OutputError(f"cannot write video {self.path}: OpenCV has no {self.fourcc!r} encoder for it")
        self._writer = writer
        self.size = size

    def write(self, frame: np.ndarray) -> None:
        if self.closed:
            raise UsageError(f"{self.path}: the video sink is closed")
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise UsageError(
                f"video frame: expected an HxWx3 uint8 array, got shape {getattr(frame, 'shape', None)} "
                f"dtype {getattr(frame, 'dtype', type(frame).__name__)}"
            )
        size = (frame.shape[1], frame.shape[0])
        if self._writer is None:
            self._open_writer(self.size or size)
        if size != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(frame)
        self.frames += 1

    def _finish(self) -> bool:
        if self._writer is not None:
            self._writer.release()  # writes the container index: the file is now playable
            self._writer = None
        if self.frames == 0:
            log.warning("no frames were written; %s not created", self.path)
            return False
        return True


class ImageSink(_AtomicSink):
    """One annotated image (format from the suffix); appears at ``path`` on :meth:`close`.

    For single-image sources; a second frame is a UsageError (save a video instead).
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._fh.close()
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        if self.closed:
            raise UsageError(f"{self.path}: the image sink is closed")
        if self.frames:
            raise UsageError(f"cannot save several frames to the image {self.path}; give a video path such as out.mp4")
        ok, buf = cv2.imencode(self.path.suffix, frame)
        if not ok:
            raise OutputError(f"cannot encode an image as {self.path.suffix!r} for {self.path}")
        buf.tofile(str(self.tmp_path))
        self.frames += 1

    def _finish(self) -> bool:
        return self.frames > 0


def open_frame_sink(path: str | os.PathLike, fps: float) -> VideoSink | ImageSink:
    """An :class:`ImageSink` for an image suffix (.jpg, .png, ...), else a :class:`VideoSink`."""
    if Path(path).suffix.lower() in IMAGE_EXTS:
        return ImageSink(path)
    return VideoSink(path, fps=fps)


# -- pipeline sinks ---------------------------------------------------------------------------
def annotate(image: np.ndarray, latest: dict[str, Any]) -> np.ndarray:
    """Draw the latest results on a copy of ``image``: mask overlay, then boxes, then the caption band."""
    from vlexport.runtime.draw import draw_caption, draw_detections
    from vlexport.runtime.segmentation import draw_segmentation

    out = image
    kinds = {type(r).__name__: r for r in latest.values()}
    if "Segmentation" in kinds:
        out = draw_segmentation(out, kinds["Segmentation"])
    for r in latest.values():
        if type(r).__name__ == "Detections":
            out = draw_detections(out, r)
    if "Caption" in kinds:
        out = draw_caption(out, kinds["Caption"])
    return out if out is not image else image.copy()


class AnnotatedSink:
    """Pipeline sink: each frame with its latest results drawn, into a :class:`VideoSink` or :class:`ImageSink`."""

    def __init__(self, sink: VideoSink | ImageSink):
        self.sink = sink

    def write(self, result: Any) -> None:
        self.sink.write(annotate(result.frame.image, result.latest))

    def close(self) -> None:
        self.sink.close()

    def abort(self) -> None:
        self.sink.abort()


class RecordSink:
    """Pipeline sink: one JSON record per frame (see ``FrameResult.record``) into a :class:`JsonlSink`."""

    def __init__(self, sink: JsonlSink):
        self.sink = sink

    def write(self, result: Any) -> None:
        self.sink.write(result.record())

    def close(self) -> None:
        self.sink.close()

    def abort(self) -> None:
        self.sink.abort()


class WindowSink:
    """Pipeline sink: an on-screen window (q or Esc asks the pipeline to stop)."""

    def __init__(self, title: str, stop: Callable[[], None]):
        check_display()
        self.title, self.stop, self.opened = title, stop, False

    def write(self, result: Any) -> None:
        self.opened = True
        if _show(annotate(result.frame.image, result.latest), self.title) == "quit":
            self.stop()

    def close(self) -> None:
        if self.opened:
            _close_windows()

    abort = close


def check_display() -> None:
    """Refuse ``show`` up front where no window can open: Qt aborts the whole process there."""
    import sys

    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")
    ):
        raise OutputError("cannot show a window: no display (DISPLAY is not set); drop --show, or use --save")




def _show(image: np.ndarray, title: str) -> str:
    """Show a frame; returns "quit" when the user pressed q or Esc, else "shown"."""
    try:
        cv2.imshow(f"vlexport: {title}", image)
        key = cv2.waitKey(1) & 0xFF
    except cv2.error as e:
        raise OutputError(f"cannot open a window (is there a display?): {e}") from e
    return "quit" if key in (ord("q"), 27) else "shown"


def _close_windows() -> None:
    try:
        cv2.destroyAllWindows()
    except cv2.error:
        pass
