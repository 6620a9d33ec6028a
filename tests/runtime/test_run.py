"""RunRequest (checked once, one line per bad combination) and run_bundles on real bundles and videos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import pytest
from conftest import write_bundle

from vlexport.errors import UsageError
from vlexport.runtime.run import RunRequest, run_bundles


@pytest.fixture(scope="module")
def det_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 320x320 keeps the per-frame cost of the tiny graph negligible.
    return write_bundle(tmp_path_factory.mktemp("bundle") / "det", size=(320, 320))


@pytest.fixture(scope="module")
def embed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("bundle") / "embed", size=(64, 64), task="embed")


def _frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


NOWHERE = "/nonexistent/bundle"  # checks that need no bundle fire before any bundle is opened


@pytest.mark.parametrize("kwargs, needle", [
    ({}, "give a BUNDLE, or --detect/--segment/--caption bundles"),
    ({"caption": NOWHERE, "score_threshold": 0.3, "max_detections": 5},
     "--score-threshold, --max-detections apply to detection: give a detection bundle"),
    ({"segment": NOWHERE, "max_length": 8}, "--max-length applies to captioning: give a captioner bundle"),
    ({"caption": NOWHERE, "classes": "forklift"}, "--classes applies to detection: give a detection bundle"),
    ({"segment": NOWHERE, "track": True}, "--track needs a detection bundle"),
    ({"detect": NOWHERE, "segment_every": 0}, "--segment-every must be an integer of at least 1, got 0"),
    ({"detect": NOWHERE, "caption_every_frames": 0}, "--caption-every-frames must be an integer of at least 1"),
    ({"detect": NOWHERE, "max_frames": -3}, "--max-frames must be an integer of at least 1, got -3"),
    ({"detect": NOWHERE, "threads": 2.5}, "--threads must be an integer of at least 1, got 2.5"),
    ({"detect": NOWHERE, "caption_every_s": -1.0}, "--caption-every must be zero or more seconds, got -1.0"),
])
def test_bad_requests_are_one_clear_line(kwargs, needle) -> None:
    with pytest.raises(UsageError) as e:
        RunRequest(source="x.jpg", **kwargs).plan()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_roles_come_from_the_manifests(det_bundle: Path, embed_bundle: Path) -> None:
    plan = RunRequest(source="x.jpg", bundle=det_bundle, score_threshold=0.5, classes="forklift, pallet ,").plan()
    assert list(plan.bundles) == ["detect"] and plan.paths == {"detect": det_bundle}
    assert plan.overrides["detect"] == {"score_threshold": 0.5} and plan.classes == ["forklift", "pallet"]
    for kwargs, needle in (
        ({"bundle": det_bundle, "detect": det_bundle}, f"two detect bundles: {det_bundle} and --detect {det_bundle}"),
        ({"bundle": embed_bundle}, "is a embed bundle; `run` takes detect, segment and caption bundles"),
        ({"caption": det_bundle}, f"--caption {det_bundle} is a detect bundle"),
        ({"detect": det_bundle, "classes": " , "}, "the vocabulary is empty"),
    ):
        with pytest.raises(UsageError) as e:
            RunRequest(source="x.jpg", **kwargs).plan()
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_run_bundles_writes_a_record_per_frame_of_the_whole_video(det_bundle, car_video, tmp_path) -> None:
    js, stats_json = tmp_path / "out.jsonl", tmp_path / "stats.json"
    stats = run_bundles(RunRequest(source=str(car_video), bundle=det_bundle, jsonl=js, stats_json=stats_json,
                                   threads=1, progress=False))
    expected = _frames(car_video)
    assert expected == 377 and stats.processed == expected and not stats.interrupted
    records = _records(js)
    assert [r["frame"] for r in records] == list(range(expected))
    assert all(r["source"] == str(car_video) and "detections" in r for r in records)
    saved = json.loads(stats_json.read_text())
    assert saved["frames_processed"] == expected and saved["tasks"]["detect"]["runs"] == expected


def test_run_bundles_max_frames_video_and_overrides(det_bundle, car_video, tmp_path) -> None:
    out, js = tmp_path / "o" / "cars.mp4", tmp_path / "o" / "cars.jsonl"
    stats = run_bundles(RunRequest(source=str(car_video), detect=det_bundle, save=out, jsonl=js, max_frames=12,
                                   score_threshold=0.85, threads=1, progress=False))
    assert stats.processed == 12 and _frames(out) == 12
    records = _records(js)
    assert [r["frame"] for r in records] == list(range(12))
    # The tiny graph scores one person at 0.9 and everything else lower: 0.85 keeps that one.
    assert all([d["score"] for d in r["detections"]] == [0.9] for r in records)
    assert sorted(p.name for p in out.parent.iterdir()) == ["cars.jsonl", "cars.mp4"]


def test_run_bundles_refuses_an_image_path_for_a_video_and_writes_nothing(det_bundle, car_video, tmp_path) -> None:
    with pytest.raises(UsageError, match="give a video path such as out.mp4"):
        run_bundles(RunRequest(source=str(car_video), bundle=det_bundle, save=tmp_path / "x.jpg",
                               jsonl=tmp_path / "x.jsonl", progress=False))
    assert list(tmp_path.iterdir()) == []


def test_detect_and_caption_on_a_folder_caption_every_photo(det_bundle, tiny_caption_bundle, assets, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("bus.jpg", "zidane.jpg"):
        shutil.copy(assets / "images" / name, folder / name)
    js = tmp_path / "r.jsonl"
    stats = run_bundles(RunRequest(source=str(folder), detect=det_bundle, caption=tiny_caption_bundle, jsonl=js,
                                   precision="fp32", threads=1, progress=False))
    assert stats.processed == 2 and stats.tasks["caption"]["runs"] == 2
    records = _records(js)
    assert [Path(r["source"]).name for r in records] == ["bus.jpg", "zidane.jpg"]
    assert all("detections" in r and isinstance(r["caption"]["text"], str) for r in records)


def test_ctrl_c_closes_the_outputs_complete_and_writes_the_stats(det_bundle, car_video, tmp_path) -> None:
    out, js, stats_json = tmp_path / "out.mp4", tmp_path / "out.jsonl", tmp_path / "stats.json"
    code = textwrap.dedent(f"""
        from vlexport.runtime.run import RunRequest, run_bundles
        try:
            run_bundles(RunRequest(source={str(car_video)!r}, bundle={str(det_bundle)!r}, realtime=True,
                                   save={str(out)!r}, jsonl={str(js)!r}, stats_json={str(stats_json)!r},
                                   threads=1, progress=False))
        except KeyboardInterrupt as e:
            import sys
            assert "torch" not in sys.modules, "the run path pulled in torch"
            print("interrupted", e.stats.processed)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        tmp = list(tmp_path.glob(".out.*.tmp.jsonl"))
        if tmp and tmp[0].read_bytes().count(b"\n") >= 5:
            break
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and stdout.startswith("interrupted"), err
    n = int(stdout.split()[1])
    assert n >= 5 and len(_records(js)) == n and _frames(out) == n
    saved = json.loads(stats_json.read_text())
    assert saved["interrupted"] is True and saved["frames_processed"] == n
    assert not list(tmp_path.glob(".*.tmp*"))
