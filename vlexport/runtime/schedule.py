"""Running a slow task beside a stream without holding it up (captioning every N seconds).

A :class:`BackgroundTask` owns a one-worker :class:`~concurrent.futures.ThreadPoolExecutor`.
The stream loop :meth:`~BackgroundTask.offer`\\ s every frame; when the task is due
(``every_s`` seconds of frame time or ``every_frames`` frames since the last job started) and
the worker is idle, the frame is handed over and the loop goes
on at once. :meth:`~BackgroundTask.poll` returns a finished result (with the frame it was computed
on) the next time the loop asks. A due frame that arrives while the worker is busy is not
queued: the next due frame after the worker frees up is taken instead, so results are never about
stale frames (``offer(..., block=True)`` waits instead, for files whose schedule must hold
exactly). onnxruntime releases the GIL while it runs, so the worker computes in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlexport.errors import UsageError

__all__ = ["BackgroundTask", "BackgroundResult"]


@dataclass
class BackgroundResult:
    """A finished job: the result, and the index and stamp of the frame it was computed on."""

    frame_index: int
    result: Any
    stamp: Any = None


class BackgroundTask:
    """Runs ``fn(image, stamp)`` on a one-worker thread pool, at most one job at a time, on a schedule."""

    def __init__(self, fn: Callable[[np.ndarray, Any], Any], *, every_s: float | None = None,
                 every_frames: int | None = None, name: str = "background"):
        if (every_s is None) == (every_frames is None):
            raise UsageError("give exactly one of every_s (seconds) or every_frames")
        if every_s is not None and every_s < 0:
            raise UsageError(f"the interval must be zero or positive seconds, got {every_s}")
        if every_frames is not None and every_frames < 1:
            raise UsageError(f"every_frames must be at least 1, got {every_frames}")
        self.fn, self.every_s, self.every_frames, self.name = fn, every_s, every_frames, name
        self._last_start_t: float | None = None
        self._last_start_index: int | None = None
        # _busy is cleared by the job's done-callback, after its result is stored: "not busy" then
        # always means "the result (or error) is there for poll()", which a bare Future.done() is not.
        self._cond = threading.Condition()
        self._future: Future | None = None
        self._done: list[BackgroundResult] = []
        self._error: BaseException | None = None
        self._busy = False
        self.started = 0
        self.skipped_busy = 0  # due frames passed over because the worker was still busy
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vlexport-{name}")

    def _due(self, index: int, t: float) -> bool:
        if self._last_start_index is None:
            return True
        if self.every_frames is not None:
            return index - self._last_start_index >= self.every_frames
        return t - self._last_start_t >= self.every_s  # type: ignore[operator]

    def offer(self, index: int, image: np.ndarray, t: float, stamp: Any = None, *, block: bool = False) -> bool:
        """Hand ``image`` over if the task is due and idle; returns whether a job started.

        A live stream never blocks on the job (a due frame that finds the worker busy is passed
        over); ``block=True`` (offline files, where the schedule must hold exactly) waits for
        the worker to be free instead.
        """
        self._raise_error()
        if not self._due(index, t):
            return False
        with self._cond:
            if self._busy and block:
                self._cond.wait_for(lambda: not self._busy or self._error is not None)
                self._raise_error()
            if self._busy:
                self.skipped_busy += 1
                return False
            self._busy = True
            self._last_start_index, self._last_start_t = index, t
            self.started += 1
            # a copy: the caller may reuse its buffer
            future = self._pool.submit(self.fn, image.copy(), stamp)
            self._future = future
        future.add_done_callback(lambda f: self._finished(f, index, stamp))
        return True

    def _finished(self, future: Future, index: int, stamp: Any) -> None:
        """Done-callback (on the worker, or here if the job already ended): store the result or the error."""
        error = None if future.cancelled() else future.exception()
        with self._cond:
            if error is not None:  # surfaced in the stream loop by the next offer/poll
                self._error = error
            elif not future.cancelled():
                self._done.append(BackgroundResult(index, future.result(), stamp))
            self._busy = False
            self._cond.notify_all()

    def poll(self) -> BackgroundResult | None:
        """The oldest finished result not yet returned, or ``None``."""
        self._raise_error()
        with self._cond:
            return self._done.pop(0) if self._done else None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the worker is idle (its result, if any, is then ready for :meth:`poll`); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy or self._error is not None, timeout=timeout)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy

    def _raise_error(self) -> None:
        with self._cond:
            err, self._error = self._error, None
        if err is not None:
            raise err

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the worker after its current job (waiting at most ``timeout`` seconds for it)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        future = self._future
        if future is not None:
            wait([future], timeout=timeout)

    def __enter__(self) -> BackgroundTask:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
