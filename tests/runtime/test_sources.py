"""Frame sources: a real MJPEG stream served over local HTTP that drops and comes back, the
newest-frame policy under a slow consumer, files read frame by frame or in realtime, and shutdown."""

from __future__ import annotations

import http.server
import logging
import os
import signal
import socketserver
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from vlexport.errors import SourceError, UsageError
from vlexport.runtime.sources import CaptureSource, Frame, LiveSource, open_source

# -- a local MJPEG stream (what many IP cameras serve) ---------------------------------------


class _MjpegHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        server: MjpegServer = self.server  # type: ignore[assignment]
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        while not server.stopping.is_set():
            part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(server.jpeg)
            try:
                self.wfile.write(part + server.jpeg + b"\r\n")
            except OSError:  # the client went away
                return
            server.sent += 1
            time.sleep(server.period)


class MjpegServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Serves one uniform grey JPEG (``level``) as a ``multipart/x-mixed-replace`` stream at ``fps``."""

    daemon_threads = True
    allow_reuse_address = True  # so that a restarted server gets the same port back

    def __init__(self, level: int, fps: float = 50.0, port: int = 0):
        super().__init__(("127.0.0.1", port), _MjpegHandler)
        ok, buf = cv2.imencode(".jpg", np.full((48, 64, 3), level, np.uint8))
        assert ok
        self.jpeg, self.period, self.sent = buf.tobytes(), 1.0 / fps, 0
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/stream.mjpg"

    def stop(self) -> None:
        """End every open stream (the client sees the connection close) and free the port."""
        self.stopping.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def servers():
    started: list[MjpegServer] = []

    def start(level: int, fps: float = 50.0, port: int = 0) -> MjpegServer:
        s = MjpegServer(level, fps, port)
        started.append(s)
        return s

    yield start
    for s in started:
        if not s.stopping.is_set():
            s.stop()


def grey(frame: Frame) -> float:
    return float(frame.image.mean())


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def watchdog():
    """close(source) after ``seconds``: a source that never recovers fails the test, not hangs it."""
    timers: list[threading.Timer] = []

    def arm(source, seconds: float = 10.0) -> None:
        t = threading.Timer(seconds, source.close)
        t.daemon = True
        t.start()
        timers.append(t)

    yield arm
    for t in timers:
        t.cancel()


# -- a small video file with one grey level per frame ----------------------------------------


@pytest.fixture(scope="module")
def short_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 frames at 50 fps; frame i is uniformly grey at level 10 * i."""
    path = tmp_path_factory.mktemp("video") / "grey.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 50.0, (64, 48))
    assert writer.isOpened()
    for i in range(20):
        writer.write(np.full((48, 64, 3), 10 * i, np.uint8))
    writer.release()
    return path


# -- live streams: reconnection --------------------------------------------------------------


def test_stream_reconnects_after_the_server_drops_and_comes_back(servers, watchdog, caplog) -> None:
    first = servers(level=60)
    port = first.server_address[1]
    restarted_at: list[float] = []

    def restart() -> None:
        restarted_at.append(time.monotonic())
        servers(level=200, port=port)

    with caplog.at_level(logging.INFO, logger="vlexport"):
        src = open_source(first.url, backoff=(0.05, 0.2))
        watchdog(src)
        assert isinstance(src, LiveSource) and src.live and src.len_hint() is None
        frames: list[Frame] = []
        for frame in src:
            frames.append(frame)
            if len(frames) == 5:
                first.stop()  # mid-stream: the connection closes under the reader
                timer = threading.Timer(0.6, restart)  # down for a while: several failed attempts
                timer.start()
            if grey(frame) > 150 and sum(grey(f) > 150 for f in frames) == 5:
                break
        src.close()
    timer.join()
    before = [f for f in frames if grey(f) < 100]
    after = [f for f in frames if grey(f) > 150]
    assert len(before) >= 5 and len(after) == 5, "frames from the restarted server must arrive"
    assert frames == before + after  # nothing out of place, no frame of the other server in between
    assert src.reconnects == 1
    assert after[0].stamp.t_monotonic > restarted_at[0]
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)), "indices keep counting across the reconnect"
    stamps = [f.stamp.t_monotonic for f in frames]
    assert stamps == sorted(stamps)
    assert all(f.stamp.index == f.index for f in frames)
    assert src.frames_read == src.delivered + src.dropped
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reconnecting" in warnings[0].getMessage()  # one line per outage
    assert any("reconnected" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_outage_longer_than_the_budget_ends_the_iteration(servers, watchdog, caplog) -> None:
    server = servers(level=60)
    src = open_source(server.url, backoff=(0.05, 0.1), max_reconnect_s=0.4)
    watchdog(src)
    n, t_stop = 0, None
    with caplog.at_level(logging.WARNING, logger="vlexport"):
        for _ in src:
            n += 1
            if n == 3:
                server.stop()
                t_stop = time.monotonic()
    waited = time.monotonic() - t_stop
    assert 0.35 < waited < 3.0 and src.reconnects == 0
    assert src.end_reason == "outage longer than 0.4s"
    assert any("max_reconnect_s" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    src.close()


def test_reconnect_off_ends_at_the_first_outage(servers, watchdog) -> None:
    server = servers(level=60)
    src = open_source(server.url, reconnect=False)
    watchdog(src)
    n = 0
    for _ in src:
        n += 1
        if n == 3:
            server.stop()
    assert src.reconnects == 0 and src.end_reason == "stream stopped (reconnect off)"
    src.close()


def test_close_is_prompt_while_waiting_to_reconnect(servers, caplog) -> None:
    server = servers(level=60)
    src = open_source(server.url, backoff=(5.0, 5.0))  # long waits between attempts
    with caplog.at_level(logging.WARNING, logger="vlexport"):
        it = iter(src)
        next(it)
        server.stop()
        assert wait_for(lambda: any("reconnecting" in r.getMessage() for r in caplog.records))
    assert src.running
    t0 = time.monotonic()
    src.close()
    assert time.monotonic() - t0 < 1.0
    assert not src.running
    assert next(it, None) is None  # the iteration ends; it does not hang
    src.close()  # idempotent


def test_ctrl_c_interrupts_a_consumer_waiting_for_frames(servers, caplog) -> None:
    server = servers(level=60)
    src = open_source(server.url, backoff=(5.0, 5.0))
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    try:
        it = iter(src)
        next(it)
        with caplog.at_level(logging.WARNING, logger="vlexport"):
            server.stop()
            assert wait_for(lambda: any("reconnecting" in r.getMessage() for r in caplog.records))
        if src.ready:
            next(it)  # the last frame before the outage
        assert not src.ready  # nothing left: the consumer will wait
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            next(it)
        assert time.monotonic() - t0 < 1.5
    finally:
        timer.cancel()
        src.close()


# -- live streams: the newest frame, never a stale one ---------------------------------------


def test_slow_consumer_gets_the_newest_frame_and_drops_are_counted(servers, watchdog) -> None:
    server = servers(level=90, fps=100.0)
    src = open_source(server.url)
    watchdog(src)
    got: list[tuple[int, float, Frame]] = []  # (frames read when asking, time of asking, frame)
    it = iter(src)
    next(it)  # connected and streaming
    for _ in range(12):
        time.sleep(0.06)  # a slow model: several frames arrive meanwhile
        asked_after, t_ask = src.frames_read, time.monotonic()
        frame = next(it)
        got.append((asked_after, t_ask, frame))
    src.close()
    for asked_after, t_ask, frame in got:
        # The newest frame read when the consumer asked (or a later one), never an older one.
        assert frame.index >= asked_after - 1
        # Acquired during the consumer's sleep, not queued from long before.
        assert frame.stamp.t_monotonic > t_ask - 0.06
    indices = [f.index for _, _, f in got]
    assert indices == sorted(set(indices)) and indices[-1] - indices[0] > len(indices)  # gaps: drops
    stamps = [f.stamp.t_monotonic for _, _, f in got]
    assert stamps == sorted(stamps)
    assert src.dropped > 0
    assert src.delivered == 13
    assert src.frames_read == src.delivered + src.dropped


def test_realtime_file_paces_at_its_fps_and_drops_for_a_slow_consumer(car_video: Path) -> None:
    with open_source(car_video, realtime=True) as src:
        assert src.live and src.fps == pytest.approx(12.5) and src.len_hint() == 377
        got: list[Frame] = []
        for frame in src:
            got.append(frame)
            if len(got) == 8:
                break
            time.sleep(0.2)  # 2.5 frame periods
    indices = [f.index for f in got]
    assert indices[0] == 0 and indices == sorted(set(indices))
    assert src.dropped > 0 and src.frames_read == src.delivered + src.dropped
    assert src.frames_read < 30  # paced, not read as fast as the disk allows
    # Stamps are acquisition times on the file's clock: frame k read about k/fps after frame 0.
    for f in got[1:]:
        assert abs((f.stamp.t_monotonic - got[0].stamp.t_monotonic) - f.index / 12.5) < 0.2
    # Each frame is the one the index names: compare with a plain frame-by-frame read.
    with open_source(car_video) as plain:
        reference = {f.index: f.image for f in plain if f.index <= indices[-1]}
    for f in got:
        assert np.array_equal(f.image, reference[f.index])


def test_realtime_file_ends_at_its_last_frame(short_video: Path) -> None:
    t0 = time.monotonic()
    with open_source(short_video, realtime=True) as src:
        frames = list(src)
        elapsed = time.monotonic() - t0
        assert src.end_reason == "end of file" and src.reconnects == 0
    assert src.frames_read == 20 and src.frames_read == src.delivered + src.dropped
    assert frames[-1].index == 19  # the last frame is never lost
    assert elapsed > 19 / 50 * 0.8  # paced at 50 fps
    for f in frames:
        assert abs(grey(f) - 10 * f.index) < 4


# -- files, frame by frame -------------------------------------------------------------------


def test_file_without_realtime_yields_every_frame_in_order(short_video: Path) -> None:
    with open_source(short_video) as src:
        assert isinstance(src, CaptureSource) and not src.live and src.len_hint() == 20
        frames = []
        for frame in src:
            frames.append(frame)
            time.sleep(0.01)  # a slow consumer: a file waits for it
    assert [f.index for f in frames] == list(range(20))
    assert [round(grey(f) / 10) for f in frames] == list(range(20))
    stamps = [f.stamp.t_monotonic for f in frames]
    assert stamps == sorted(stamps)
    assert src.dropped == 0 and src.frames_read == src.delivered == 20


# -- custom captures and user errors ---------------------------------------------------------


class FlakyCamera:
    """A driver-level camera (what ``capture_factory`` is for): the first connection gives 3
    frames, the next two attempts fail with a driver error, the fourth streams on."""

    attempts = 0

    def __init__(self, target: str):
        FlakyCamera.attempts += 1
        if FlakyCamera.attempts in (2, 3):
            raise ConnectionError("camera busy")
        self.left, self.open = (3 if FlakyCamera.attempts == 1 else 10**6), True

    def isOpened(self) -> bool:
        return self.open

    def read(self):
        if self.left == 0:
            return False, None
        self.left -= 1
        time.sleep(0.005)
        return True, np.full((4, 4, 3), FlakyCamera.attempts, np.uint8)

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        self.open = False


def test_capture_factory_with_failed_reconnection_attempts(watchdog) -> None:
    FlakyCamera.attempts = 0
    src = open_source("mycam://serial-42", capture_factory=FlakyCamera, backoff=(0.01, 0.02))
    watchdog(src)
    seen = []
    for frame in src:  # a consumer as fast as the camera: nothing to drop
        seen.append(int(frame.image[0, 0, 0]))
        if 4 in seen:
            break
    src.close()
    assert seen[0] == 1 and seen[-1] == 4 and src.reconnects == 1
    assert FlakyCamera.attempts == 4 and src.fps == 30.0


def test_capture_factory_failing_at_open_is_one_source_error() -> None:
    def broken(target):
        raise OSError("no such device")

    with pytest.raises(SourceError) as e:
        open_source("mycam://x", capture_factory=broken)
    assert "mycam://x" in str(e.value) and "no such device" in str(e.value) and "\n" not in str(e.value)


def test_unreachable_stream_is_one_source_error(servers) -> None:
    server = servers(level=1)
    url = server.url
    server.stop()  # nothing listens on that port any more
    with pytest.raises(SourceError) as e:
        open_source(url)
    assert url in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs", [{"backoff": (0, 1)}, {"backoff": (2, 1)}, {"backoff": "fast"},
                                    {"max_reconnect_s": 0}, {"max_reconnect_s": "1"}])
def test_bad_reconnect_options_are_usage_errors(kwargs, short_video: Path) -> None:
    with pytest.raises(UsageError):
        open_source("mycam://x", capture_factory=lambda t: cv2.VideoCapture(str(short_video)), **kwargs)


def test_realtime_needs_a_video(assets: Path) -> None:
    with pytest.raises(UsageError, match="still images"):
        open_source(assets / "images" / "bus.jpg", realtime=True)


def test_iterating_a_closed_source_is_an_error(short_video: Path) -> None:
    for realtime in (False, True):
        src = open_source(short_video, realtime=realtime)
        src.close()
        with pytest.raises(SourceError, match="closed"):
            next(iter(src))
