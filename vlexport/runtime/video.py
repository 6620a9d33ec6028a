"""Frame sources, result sinks and the detect-on-a-stream loop.

Sources (:func:`open_source`): an image file, a folder of images, a glob pattern, a video file, a
camera index or an rtsp/http(s) URL, each yielding :class:`Frame` objects with acquisition
timestamps. Sinks (:class:`VideoSink`, :class:`JsonlSink`) write to a temporary file beside the
target and rename it into place on :meth:`close`, so a reader never sees a half-written file.
:func:`run_on_source` ties a detect task, a source and the sinks together.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vlexport.errors import OutputError, SourceError, UsageError
from vlexport.runtime.results import FrameStamp

__all__ = [
    "Frame",
    "Source",
    "ImageSource",
    "CaptureSource",
    "open_source",
    "VideoSink",
    "JsonlSink",
    "ImageSink",
    "open_frame_sink",
    "RunStats",
    "run_on_source",
    "IMAGE_EXTS",
]

log = logging.getLogger("vlexport")

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm", ".pgm", ".ppm"})
_URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
_GLOB_CHARS = set("*?[")
_DEFAULT_FPS = 30.0


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
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return img


# -- sources ---------------------------------------------------------------------------------
class Source:
    """An iterable of :class:`Frame`. Use as a context manager, or call :meth:`close`."""

    #: What the user asked for, as given.
    spec: str
    #: Nominal frame rate (the video's, or a default for images and unknown streams).
    fps: float = _DEFAULT_FPS
    #: True for cameras and streams (no end, no length).
    live: bool = False

    def __init__(self) -> None:
        self.skipped = 0  # unreadable items passed over

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
    """Still images, in the given order; unreadable ones are logged, counted and skipped."""

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
            yield Frame(index=i, image=img, stamp=_stamp(i), source=str(path))

    def len_hint(self) -> int | None:
        return len(self.paths)


class CaptureSource(Source):
    """A video file, camera or network stream read with ``cv2.VideoCapture``, frame by frame."""

    def __init__(self, target: str | int, spec: str, live: bool):
        super().__init__()
        self.spec = spec
        self.live = live
        self._target = target
        self._cap: Any = cv2.VideoCapture(target)
        if not self._cap.isOpened():
            self._cap.release()
            kind = "camera" if isinstance(target, int) else ("stream" if live else "video file")
            raise SourceError(f"cannot open {kind} {spec!r}: OpenCV could not read it")
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0.0 < fps < 1000.0 else _DEFAULT_FPS
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._count = count if (count > 0 and not live) else None

    def __iter__(self) -> Iterator[Frame]:
        if self._cap is None:
            raise SourceError(f"source {self.spec!r} is closed")
        index = 0
        while True:
            ok, img = self._cap.read()
            if not ok or img is None:
                break
            yield Frame(index=index, image=img, stamp=_stamp(index), source=self.spec)
            index += 1

    def len_hint(self) -> int | None:
        return self._count

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def open_source(spec: str | int | os.PathLike) -> Source:
    """Open a frame source; a missing or unreadable one is a SourceError naming it.

    ``spec`` is an image file, a folder of images (sorted by name), a glob pattern, a video file,
    a camera index (``"0"``) or an rtsp/http(s) URL.
    """
    if isinstance(spec, bool) or not isinstance(spec, (str, int, os.PathLike)):
        raise SourceError(f"invalid source {spec!r}: give a path, a glob, a camera index or a URL")
    if isinstance(spec, int):
        return CaptureSource(spec, str(spec), live=True)
    text = os.fspath(spec)
    if not isinstance(text, str) or not text:
        raise SourceError(f"empty or invalid source {spec!r}")
    if text.isdigit():
        return CaptureSource(int(text), text, live=True)
    if text.lower().startswith(_URL_SCHEMES):
        return CaptureSource(text, text, live=True)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise SourceError(f"source folder {text!r} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        return ImageSource(files, text)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTS:
            # A single image is the whole source: an unreadable one is an error, not a skip.
            if _imread(path) is None:
                raise SourceError(f"cannot read image {text!r}: not a valid image file")
            return ImageSource([path], text)
        return CaptureSource(str(path), text, live=False)
    if _GLOB_CHARS & set(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        if not files:
            raise SourceError(f"glob pattern {text!r} matches no images")
        return ImageSource(files, text)
    raise SourceError(
        f"source not found: {text!r} (expected an image, a folder of images, a glob pattern, "
        "a video file, a camera index or an rtsp/http URL)"
    )


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


# -- the loop --------------------------------------------------------------------------------
_STAGES = ("preprocess", "infer", "postprocess")


@dataclass
class RunStats:
    """What a run did: frames processed, wall time, throughput and per-stage latency percentiles (ms)."""

    frames: int = 0
    seconds: float = 0.0
    skipped: int = 0
    interrupted: bool = False
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 4),
            "fps": round(self.fps, 2),
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "latency_ms": self.latency_ms,
        }

    def summary(self) -> str:
        """One line for the console."""
        parts = [f"{self.frames} frames in {self.seconds:.2f}s ({self.fps:.1f} FPS)"]
        for stage, p in self.latency_ms.items():
            parts.append(f"{stage} p50 {p['p50']:.1f} / p90 {p['p90']:.1f} / p99 {p['p99']:.1f} ms")
        if self.skipped:
            parts.append(f"{self.skipped} unreadable skipped")
        if self.interrupted:
            parts.append("interrupted")
        return "; ".join(parts)


def _percentiles(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for stage, values in samples.items():
        if values:
            p50, p90, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90, 99])
            out[stage] = {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3)}
    return out


_STAMP_KEYS = ("frame", "t_monotonic", "t_wall")


def _task_adapter(task: Any) -> tuple[Callable, Callable, Callable[[Any], dict[str, Any]]]:
    """(run one frame, draw its result, its JSONL fields) for a detect or a segment task.

    A caption task has no per-frame result: it runs in the background (see ``run_on_source``).
    """
    if callable(getattr(task, "caption", None)):
        return (lambda image, stamp: None), (lambda image, result: image), (lambda result: {})
    if callable(getattr(task, "detect", None)):
        from vlexport.runtime.draw import draw_detections

        return task.detect, draw_detections, lambda r: {"detections": r.records()}
    if callable(getattr(task, "segment", None)):
        from vlexport.runtime.segmentation import draw_segmentation

        return task.segment, draw_segmentation, lambda r: {
            "segmentation": {k: v for k, v in r.to_dict().items() if k not in _STAMP_KEYS}}
    raise UsageError(f"run_on_source needs a detect or segment task, got {type(task).__name__}")


def run_on_source(
    task: Any,
    source: str | int | os.PathLike | Source,
    *,
    save: str | os.PathLike | None = None,
    jsonl: str | os.PathLike | None = None,
    progress: bool = True,
    show: bool = False,
    max_frames: int | None = None,
    on_result: Callable[[Frame, Any], None] | None = None,
    caption: Any = None,
    caption_every_s: float | None = 2.0,
    caption_every_frames: int | None = None,
) -> RunStats:
    """Run a detect or segment task over every frame of ``source``; returns :class:`RunStats`.

    ``save`` writes an annotated video (an annotated image when ``save`` has an image suffix and
    the source is one image), ``jsonl`` one record per frame (``frame``, ``t_monotonic``,
    ``t_wall``, ``source``, then ``detections`` or ``segmentation``); ``show`` opens a window (q or Esc stops);
    ``max_frames`` stops early; ``on_result(frame, detections)`` is called after each frame is
    written. On KeyboardInterrupt the loop stops reading, closes the outputs so that they are
    complete (the frames done so far), and re-raises with the stats attached as ``.stats``; on any
    other error the outputs are discarded.

    Captioning (``task`` itself a caption task, or ``caption=`` one beside a detect/segment task)
    runs on a background thread every ``caption_every_s`` seconds of acquisition time (or every
    ``caption_every_frames`` frames) without holding the stream up: each caption goes into the
    JSONL record of the frame during which it finished, as ``caption`` with the ``frame`` index it
    was computed on, and the latest caption is drawn on every following frame.
    """
    if callable(getattr(task, "caption", None)):
        caption = task
    infer, draw, record_of = _task_adapter(task)
    background = None
    if caption is not None:
        from vlexport.runtime.schedule import BackgroundTask

        background = BackgroundTask(caption.caption, every_s=None if caption_every_frames else caption_every_s,
                                    every_frames=caption_every_frames, name="caption")
    latest_caption = None
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise UsageError(f"max_frames must be a positive integer, got {max_frames!r}")
    if show:
        _check_display()
    src = source if isinstance(source, Source) else open_source(source)
    sinks: list[_AtomicSink] = []
    stats = RunStats()
    samples: dict[str, list[float]] = {s: [] for s in _STAGES}
    bar = None
    window = None
    try:
        if save is not None and Path(save).suffix.lower() in IMAGE_EXTS and src.len_hint() != 1:
            raise UsageError(
                f"--save {save} is an image path but the source {src.spec!r} has more than one frame; "
                "give a video path such as out.mp4"
            )
        frame_sink = open_frame_sink(save, fps=src.fps) if save is not None else None
        if frame_sink is not None:
            sinks.append(frame_sink)
        jsonl_sink = JsonlSink(jsonl) if jsonl is not None else None
        if jsonl_sink is not None:
            sinks.append(jsonl_sink)
        total = src.len_hint()
        if max_frames is not None:
            total = max_frames if total is None else min(total, max_frames)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="frame", desc=Path(str(src.spec)).name or str(src.spec), dynamic_ncols=True)
        t_start = time.perf_counter()
        try:
            for frame in src:
                new_caption = None
                if background is not None:
                    background.offer(frame.index, frame.image, frame.stamp.t_monotonic, frame.stamp)
                dets = infer(frame.image, frame.stamp)
                for stage in _STAGES:
                    if task is not caption and stage in task.timings:
                        samples[stage].append(float(task.timings[stage]))
                if background is not None:
                    if task is caption and background.busy:
                        background.wait()  # a caption-only run on a file: nothing else to overlap with
                    done = background.poll()
                    if done is not None:
                        new_caption = latest_caption = done.result
                annotated = draw(frame.image, dets) if (frame_sink is not None or show) else frame.image
                if latest_caption is not None and (frame_sink is not None or show):
                    from vlexport.runtime.draw import draw_caption

                    annotated = draw_caption(annotated, latest_caption)
                if frame_sink is not None:
                    frame_sink.write(annotated)
                if jsonl_sink is not None:
                    record = {**frame.stamp.to_dict(), "source": frame.source, **record_of(dets)}
                    if new_caption is not None:
                        fields = new_caption.to_dict()  # its stamp says which frame it was computed on
                        record["caption"] = {"text": fields.pop("caption"), **fields}
                    jsonl_sink.write(record)
                stats.frames += 1
                if bar is not None:
                    bar.update(1)
                if on_result is not None:
                    on_result(frame, dets)
                if show:
                    window = _show(annotated, src.spec)
                    if window == "quit":
                        break
                if max_frames is not None and stats.frames >= max_frames:
                    break
        finally:
            stats.seconds = time.perf_counter() - t_start
            stats.skipped = src.skipped
            stats.latency_ms = _percentiles(samples)
    except KeyboardInterrupt as e:
        stats.interrupted = True
        for sink in sinks:
            sink.close()
        e.stats = stats  # type: ignore[attr-defined]  # lets the CLI print what was done
        raise
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    else:
        for sink in sinks:
            sink.close()
    finally:
        if background is not None:
            background.close()
        if bar is not None:
            bar.close()
        if window is not None:
            _close_windows()
        if not isinstance(source, Source):
            src.close()
    return stats


def _check_display() -> None:
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
