"""Sources, sinks and run_on_source on the real car video and images."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_bundle

import vlexport.runtime as vr
from vlexport.errors import OutputError, SourceError, UsageError
from vlexport.runtime.run import run_on_source
from vlexport.runtime.sinks import JsonlSink, VideoSink
from vlexport.runtime.sources import Frame, open_source


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory):
    # 320x320 keeps the per-frame cost of the tiny graph negligible.
    root = write_bundle(tmp_path_factory.mktemp("bundle") / "b", size=(320, 320))
    with vr.load(root, threads=1) as t:
        yield t


def count_frames(path: Path) -> tuple[int, tuple[int, int]]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} is not a readable video"
    n, size = 0, (0, 0)
    while True:
        ok, img = cap.read()
        if not ok:
            break
        n, size = n + 1, (img.shape[1], img.shape[0])
    cap.release()
    return n, size


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_on_video_writes_video_and_jsonl(task, car_video: Path, tmp_path: Path) -> None:
    out, js = tmp_path / "out" / "cars.mp4", tmp_path / "out" / "cars.jsonl"
    stats = run_on_source(task, str(car_video), save=out, jsonl=js, progress=False, max_frames=30)
    assert stats.frames == 30 and not stats.interrupted and stats.fps > 0
    assert {"decode", "preprocess", "infer", "postprocess", "end_to_end"} <= set(stats.latency_ms)
    assert all(p["p50"] <= p["p90"] <= p["p99"] for p in stats.latency_ms.values())
    assert count_frames(out) == (30, (768, 432))
    records = read_jsonl(js)
    assert [r["frame"] for r in records] == list(range(30))
    assert set(records[0]) == {"frame", "t_monotonic", "t_wall", "source", "detections"}
    assert records[0]["source"] == str(car_video)
    assert records[0]["detections"][0] == {
        "box": records[0]["detections"][0]["box"],
        "score": 0.9,
        "class_id": 0,
        "label": "person",
    }
    assert all(r1["t_monotonic"] <= r2["t_monotonic"] for r1, r2 in zip(records, records[1:]))
    assert sorted(p.name for p in out.parent.iterdir()) == ["cars.jsonl", "cars.mp4"]
    json.dumps(stats.to_dict())
    assert "30 frames" in stats.summary()


def test_interrupted_run_leaves_complete_outputs(task, car_video: Path, tmp_path: Path) -> None:
    out, js = tmp_path / "cars.mp4", tmp_path / "cars.jsonl"
    seen: list[int] = []

    def stop_after_7(frame: Frame, dets) -> None:
        seen.append(frame.index)
        if len(seen) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as e:
        run_on_source(task, str(car_video), save=out, jsonl=js, progress=False, on_result=stop_after_7)
    assert e.value.stats.frames == 7 and e.value.stats.interrupted
    assert count_frames(out)[0] == 7
    assert [r["frame"] for r in read_jsonl(js)] == list(range(7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cars.jsonl", "cars.mp4"]  # no temp files


def test_failed_run_leaves_nothing(task, car_video: Path, tmp_path: Path) -> None:
    def boom(frame: Frame, dets) -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        run_on_source(
            task, str(car_video), save=tmp_path / "a.mp4", jsonl=tmp_path / "a.jsonl", progress=False, on_result=boom
        )
    assert list(tmp_path.iterdir()) == []


def test_run_on_image_folder_skips_unreadable(
    task, assets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(assets / "images" / "bus.jpg", folder / "a.jpg")
    shutil.copy(assets / "images" / "zidane.jpg", folder / "c.jpg")
    (folder / "b.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    src = open_source(str(folder))
    assert src.len_hint() == 3
    with caplog.at_level(logging.WARNING, logger="vlexport"):
        stats = run_on_source(task, src, jsonl=tmp_path / "r.jsonl", save=tmp_path / "r.mp4", progress=False)
    assert stats.frames == 2 and stats.skipped == 1
    assert "b.jpg" in caplog.text
    records = read_jsonl(tmp_path / "r.jsonl")
    assert [Path(r["source"]).name for r in records] == ["a.jpg", "c.jpg"]
    assert [r["frame"] for r in records] == [0, 2]  # the index is the position in the source
    assert count_frames(tmp_path / "r.mp4") == (2, (810, 1080))  # zidane resized to the first frame's size


def test_image_and_glob_sources(assets: Path) -> None:
    bus = assets / "images" / "bus.jpg"
    frames = list(open_source(str(bus)))
    assert len(frames) == 1 and frames[0].image.shape == (1080, 810, 3) and frames[0].source == str(bus)
    src = open_source(str(assets / "images" / "*.jpg"))
    names = [Path(f.source).name for f in src]
    assert names == sorted(names) and "bus.jpg" in names and src.len_hint() == len(names)


def test_video_source_len_hint(car_video: Path) -> None:
    with open_source(str(car_video)) as src:
        assert src.len_hint() == 377 and src.fps == pytest.approx(12.5)
        first = next(iter(src))
        assert first.index == 0 and first.image.shape == (432, 768, 3)


@pytest.mark.parametrize("make_bad", ["missing", "text_as_mp4", "corrupt_jpg", "empty_folder", "glob", "camera"])
def test_unreadable_sources(make_bad: str, tmp_path: Path) -> None:
    if make_bad == "missing":
        spec = str(tmp_path / "nope.mp4")
    elif make_bad == "text_as_mp4":
        spec = str(tmp_path / "x.mp4")
        Path(spec).write_text("hello")
    elif make_bad == "corrupt_jpg":
        spec = str(tmp_path / "x.jpg")
        Path(spec).write_bytes(b"\xff\xd8garbage")
    elif make_bad == "empty_folder":
        spec = str(tmp_path)
    elif make_bad == "glob":
        spec = str(tmp_path / "*.png")
    else:
        spec = "97"  # no such camera
    with pytest.raises(SourceError) as e:
        open_source(spec)
    msg = str(e.value)
    assert spec in msg and "\n" not in msg


def test_sinks_refuse_unwritable_places(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        VideoSink(blocker / "out.mp4", fps=10)
    with pytest.raises(OutputError, match="cannot create the output folder"):
        JsonlSink(blocker / "out.jsonl")
    with pytest.raises(OutputError, match="it is a folder"):
        JsonlSink(tmp_path)


def test_run_reports_output_errors_before_reading(task, car_video: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        run_on_source(task, str(car_video), save=tmp_path / "ok.mp4", jsonl=blocker / "x.jsonl", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the video sink was discarded


def test_sink_context_managers(tmp_path: Path) -> None:
    with JsonlSink(tmp_path / "a.jsonl") as s:
        s.write({"a": 1})
        assert not (tmp_path / "a.jsonl").exists()  # only the temp file until close
    assert (tmp_path / "a.jsonl").read_text() == '{"a":1}\n'
    with pytest.raises(ValueError):
        with JsonlSink(tmp_path / "b.jsonl") as s:
            s.write({"b": 1})
            raise ValueError
    with VideoSink(tmp_path / "v.mp4", fps=5) as v:
        for i in range(3):
            v.write(np.full((48, 64, 3), i * 50, np.uint8))
        with pytest.raises(UsageError, match="HxWx3 uint8"):
            v.write(np.zeros((48, 64), np.uint8))
    with VideoSink(tmp_path / "empty.mp4", fps=5):
        pass  # no frames: no file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "v.mp4"]
    assert count_frames(tmp_path / "v.mp4") == (3, (64, 48))


def test_run_needs_a_detect_task(tmp_path: Path, assets: Path) -> None:
    with pytest.raises(UsageError, match="no detect, segment or caption method"):
        run_on_source(object(), str(assets / "images" / "bus.jpg"), progress=False)


def test_show_without_display_is_refused_up_front(task, assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("display detection is Linux-specific")
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(OutputError, match="no display"):
        run_on_source(task, str(assets / "images" / "bus.jpg"), show=True, progress=False)


def test_progress_bar_runs(task, assets: Path, capsys: pytest.CaptureFixture) -> None:
    stats = run_on_source(task, str(assets / "images" / "bus.jpg"), progress=True)
    assert stats.frames == 1
    assert "1/1" in capsys.readouterr().err


def test_save_single_image_as_image(task, assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "bus_annotated.jpg"
    stats = run_on_source(task, str(assets / "images" / "bus.jpg"), save=out, progress=False)
    assert stats.frames == 1
    img = cv2.imread(str(out))
    assert img is not None and img.shape == (1080, 810, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bus_annotated.jpg"]
    with pytest.raises(UsageError, match="give a video path"):
        run_on_source(task, str(assets / "images" / "*.jpg"), save=tmp_path / "many.jpg", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bus_annotated.jpg"]
