"""BackgroundTask: a slow job never holds the stream up, runs on schedule, and reports the frame it used."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vlexport.errors import UsageError
from vlexport.runtime.schedule import BackgroundTask


def _frame(i: int) -> np.ndarray:
    return np.full((4, 4, 3), i % 256, np.uint8)


def test_offer_returns_at_once_while_the_job_runs_and_busy_frames_are_skipped():
    release = threading.Event()

    def slow(image, stamp):
        release.wait(5)
        return int(image[0, 0, 0])

    with BackgroundTask(slow, every_frames=1) as bg:
        t0 = time.perf_counter()
        assert bg.offer(0, _frame(0), 0.0)
        started = [bg.offer(i, _frame(i), float(i)) for i in range(1, 6)]
        assert time.perf_counter() - t0 < 0.5  # the stream loop was never blocked
        assert started == [False] * 5 and bg.skipped_busy == 5
        assert bg.poll() is None
        release.set()
        assert bg.wait(5)
        done = bg.poll()
        assert done.frame_index == 0 and done.result == 0  # computed on the frame it was given
        assert bg.offer(6, _frame(6), 6.0)  # the next due frame after the worker frees up, not a stale one
        bg.wait(5)
        assert bg.poll().result == 6


def test_every_k_frames_and_every_n_seconds_schedules():
    with BackgroundTask(lambda im, st: int(im[0, 0, 0]), every_frames=3) as bg:
        ran = []
        for i in range(10):
            if bg.offer(i, _frame(i), 0.0):
                bg.wait(5)
                ran.append(bg.poll().frame_index)
    assert ran == [0, 3, 6, 9]
    with BackgroundTask(lambda im, st: None, every_s=0.5) as bg:
        ran = []
        for i in range(10):  # frames 0.2 s apart
            if bg.offer(i, _frame(i), i * 0.2):
                bg.wait(5)
                ran.append(i)
    assert ran == [0, 3, 6, 9]  # t = 0, 0.6, 1.2, 1.8: the first frame at least 0.5 s after the last job


def test_the_job_gets_a_copy_of_the_frame():
    seen = []
    gate = threading.Event()

    def job(image, stamp):
        gate.wait(5)
        seen.append(int(image[0, 0, 0]))

    buffer = _frame(7)
    with BackgroundTask(job, every_frames=1) as bg:
        bg.offer(0, buffer, 0.0)
        buffer[:] = 99  # the capture loop reuses its buffer
        gate.set()
        bg.wait(5)
    assert seen == [7]


def test_a_failing_job_surfaces_in_the_stream_loop():
    def boom(image, stamp):
        raise RuntimeError("model crashed")

    with BackgroundTask(boom, every_frames=1) as bg:
        bg.offer(0, _frame(0), 0.0)
        bg.wait(5)
        with pytest.raises(RuntimeError, match="model crashed"):
            bg.poll()


def test_bad_schedules_are_refused():
    with pytest.raises(UsageError):
        BackgroundTask(lambda i, s: None)
    with pytest.raises(UsageError):
        BackgroundTask(lambda i, s: None, every_s=1.0, every_frames=2)
    with pytest.raises(UsageError):
        BackgroundTask(lambda i, s: None, every_frames=0)
