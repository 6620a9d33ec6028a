"""The multi-task pipeline: schedules, results attached to their own frames, live sources, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from vlexport import runtime
from vlexport.errors import UsageError
from vlexport.runtime.pipeline import Pipeline, TaskSlot
from vlexport.runtime.sources import open_source
from vlexport.runtime.sinks import AnnotatedSink, JsonlSink, RecordSink, VideoSink


@pytest.fixture(scope="module")
def tasks(tiny_bundle, tiny_segment_bundle, tiny_caption_bundle):
    det = runtime.load(tiny_bundle, precision="fp32", threads=1)
    seg = runtime.load(tiny_segment_bundle, precision="fp32", threads=1)
    cap = runtime.load(tiny_caption_bundle, precision="fp32", threads=1)
    yield det, seg, cap
    for t in (det, seg, cap):
        t.close()


def _video(assets: Path) -> Path:
    return assets / "video" / "car-detection.mp4"


def test_three_tasks_at_their_own_rates_attach_results_to_their_own_frames(tasks, assets, tmp_path):
    det, seg, cap = tasks
    sinks = [AnnotatedSink(VideoSink(tmp_path / "out.mp4", fps=12.5)), RecordSink(JsonlSink(tmp_path / "out.jsonl"))]
    pipe = Pipeline(str(_video(assets)), detect=det, segment=seg, caption=cap, segment_every=3,
                    caption_every_frames=4, sinks=sinks, max_frames=13)
    results = list(pipe)
    assert [r.index for r in results] == list(range(13))
    ran = {name: [r.index for r in results if name in r.results] for name in ("detect", "segment", "caption")}
    assert ran == {"detect": list(range(13)), "segment": [0, 3, 6, 9, 12], "caption": [0, 4, 8, 12]}
    for r in results:  # every result carries the stamp of the frame it was computed on
        for result in r.results.values():
            assert result.stamp.index == r.index
        assert set(r.latest) == {"detect", "segment", "caption"}
        assert r.latest["segment"].stamp.index == r.index - r.index % 3
    # The caption attached to frame 8 is the one the task gives for frame 8's image.
    video = cv2.VideoCapture(str(_video(assets)))
    frames = [video.read()[1] for _ in range(9)]
    video.release()
    assert results[8].results["caption"].token_ids == cap.caption(frames[8]).token_ids
    stats = pipe.stats
    assert stats.processed == 13 and stats.read >= 13 and stats.dropped == 0
    assert {"decode", "preprocess", "infer", "postprocess", "end_to_end"} <= set(stats.latency_ms)
    assert stats.tasks["segment"]["runs"] == 5 and stats.tasks["caption"]["runs"] == 4
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [("segmentation" in r, "caption" in r) for r in records][:5] == [
        (True, True), (False, False), (False, False), (True, False), (False, True)]
    cap_file = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    assert int(cap_file.get(cv2.CAP_PROP_FRAME_COUNT)) == 13
    cap_file.release()


def test_stopping_iteration_early_still_closes_the_outputs(tasks, assets, tmp_path):
    det, _, _ = tasks
    pipe = Pipeline(str(_video(assets)), detect=det, sinks=[RecordSink(JsonlSink(tmp_path / "r.jsonl"))])
    for r in pipe:
        if r.index == 4:
            break
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) >= 5 and all(json.loads(line)["frame"] == i for i, line in enumerate(lines))


class _Slow:
    """A detect task that takes ``seconds`` per frame (a slow model)."""

    def __init__(self, task, seconds: float):
        self.task, self.seconds, self.timings = task, seconds, {}

    def detect(self, image, stamp=None):
        time.sleep(self.seconds)
        return self.task.detect(image, stamp)


def test_live_source_and_slow_model_work_on_the_newest_frames(tasks, assets):
    det, _, _ = tasks
    src = open_source(str(_video(assets)), realtime=True)  # paced at 12.5 fps like a camera
    pipe = Pipeline(src, detect=_Slow(det, 0.25), max_frames=8)
    indices = [r.index for r in pipe]
    src.close()
    assert len(indices) == 8 and indices == sorted(set(indices))
    assert pipe.stats.dropped > 0  # 0.25 s per frame at 12.5 fps: about two of three frames are never seen
    assert max(np.diff(indices)) >= 2


def test_process_api_for_a_robots_own_loop(tasks, assets):
    det, seg, _ = tasks
    pipe = Pipeline(str(_video(assets)), detect=det, segment=seg)
    image = cv2.imread(str(assets / "images" / "bus.jpg"))
    out = pipe.process(image)
    assert set(out) == {"detect", "segment"}
    assert out["segment"].label_map.shape == image.shape[:2]


def test_bad_pipelines_are_refused(tasks, assets):
    det, _, _ = tasks
    with pytest.raises(UsageError, match="at least one task"):
        Pipeline(str(_video(assets)))
    with pytest.raises(UsageError, match="unique"):
        Pipeline(str(_video(assets)), tasks=[TaskSlot("a", det), TaskSlot("a", det)])
    with pytest.raises(UsageError, match="every_frames"):
        TaskSlot("x", det, every_frames=0)


def test_sigint_leaves_a_complete_video_and_jsonl(tiny_bundle, tiny_caption_bundle, assets, tmp_path):
    """Ctrl-C during `vlexport run`: exit 130, and the MP4 and JSONL hold the same complete frames."""
    out, rec = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "vlexport.cli", "run", "--detect", str(tiny_bundle), "--caption",
           str(tiny_caption_bundle), "--caption-every-frames", "10", "--source", str(_video(assets)), "--realtime",
           "--save", str(out), "--jsonl", str(rec), "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        tmp = list(tmp_path.glob(".out.*.tmp.jsonl"))
        if tmp and tmp[0].read_bytes().count(b"\n") >= 5:  # some frames written
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    records = [json.loads(line) for line in rec.read_text().splitlines()]  # every line is whole JSON
    assert len(records) >= 3
    frames = [r["frame"] for r in records]
    assert frames == sorted(frames)
    video = cv2.VideoCapture(str(out))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == len(records)
    video.release()
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary file left behind


def test_prepared_input_gives_the_same_detections(tasks, assets):
    det, _, _ = tasks
    image = cv2.imread(str(assets / "images" / "zidane.jpg"))
    plain = det.detect(image)
    ahead = det.detect(image, prepared=det.prepare(image))
    np.testing.assert_array_equal(plain.boxes, ahead.boxes)
    np.testing.assert_array_equal(plain.class_ids, ahead.class_ids)
    assert det.timings["preprocess"] > 0
