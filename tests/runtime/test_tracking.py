"""The multi-object tracker: stable, distinct ids on moving boxes, and on a real video."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from vlexport.errors import DependencyError, UsageError
from vlexport.runtime.results import Detections, FrameStamp

pytest.importorskip("supervision")

from vlexport.runtime.tracking import UNTRACKED, Tracker  # noqa: E402

W, H = 80, 80


def _box(x: float, y: float) -> list[float]:
    return [x, y, x + W, y + H]


def _dets(boxes, scores=None, classes=None, labels=None, stamp=None, masks=None) -> Detections:
    k = len(boxes)
    return Detections(
        np.array(boxes, np.float32).reshape(k, 4),
        np.array(scores if scores is not None else [0.9] * k, np.float32),
        np.array(classes if classes is not None else [0] * k, np.int64),
        labels if labels is not None else ["thing"] * k,
        stamp,
        masks,
    )


def _crossing_scene(frames: int = 24, gone: tuple[int, ...] = (5, 6)):
    """Per frame: {object name: box}. A moves right, B moves left 20 px lower (their boxes
    overlap with IoU 0.6 at frame 11), B is missing in the ``gone`` frames, and C appears from
    frame 16 on, far from both."""
    scene = []
    for f in range(frames):
        objs = {"A": _box(20 + 12 * f, 100)}
        if f not in gone:
            objs["B"] = _box(284 - 12 * f, 120)
        if f >= 16:
            objs["C"] = _box(400, 300 + 3 * f)
        scene.append(objs)
    return scene


def _run(tracker: Tracker, scene, seed: int = 0) -> list[dict[str, int]]:
    """Feed the scene in a shuffled detection order; returns {object name: track id} per frame."""
    rng = np.random.default_rng(seed)
    out = []
    for objs in scene:
        names = list(objs)
        order = rng.permutation(len(names))
        names = [names[i] for i in order]
        tracked = tracker.update(_dets([objs[n] for n in names]))
        out.append(dict(zip(names, tracked.track_ids.tolist())))
    return out


def test_ids_stay_with_objects_that_cross_and_disappear():
    scene = _crossing_scene()
    # The boxes really cross: B's box overlaps A's by IoU 0.6 at the crossing frame.
    a, b = np.array(scene[11]["A"]), np.array(scene[11]["B"])
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    assert inter / (2 * W * H - inter) > 0.5

    ids = _run(Tracker("bytetrack", frame_rate=30), scene)
    # ByteTrack confirms a track that starts after the first frame on its second detection.
    assert ids[16]["C"] == UNTRACKED
    ids[16].pop("C")
    for name in ("A", "B", "C"):
        seen = {frame[name] for frame in ids if name in frame}
        assert len(seen) == 1, f"{name} changed ids: {seen}"
        assert UNTRACKED not in seen
    a_id, b_id, c_id = ids[0]["A"], ids[0]["B"], ids[17]["C"]
    assert len({a_id, b_id, c_id}) == 3
    # B came back after 2 frames without a detection under its old id.
    assert ids[7]["B"] == b_id and "B" not in ids[5]


def test_a_track_lost_longer_than_the_buffer_gets_a_new_id():
    tracker = Tracker(frame_rate=30, lost_track_buffer=2)
    first = tracker.update(_dets([_box(100, 100)])).track_ids[0]
    for _ in range(5):  # more frames than the buffer without the object
        tracker.update(_dets([]))
    tracker.update(_dets([_box(100, 100)]))  # a new track, confirmed by the next detection
    again = tracker.update(_dets([_box(100, 100)])).track_ids[0]
    assert again != first and again != UNTRACKED


def test_weak_detections_are_kept_untracked_and_everything_else_is_preserved():
    tracker = Tracker()
    stamp = FrameStamp(7, 1.5, 1700000000.25)
    masks = np.zeros((2, 480, 640), bool)
    masks[0, 100:180, 100:180] = True
    dets = _dets([_box(100, 100), _box(300, 300)], scores=[0.9, 0.05], classes=[3, 5], labels=["car", "dog"],
                 stamp=stamp, masks=masks)
    out = tracker.update(dets)
    assert dets.track_ids is None  # the input is unchanged
    assert out.track_ids.dtype == np.int64 and out.track_ids[0] >= 0 and out.track_ids[1] == UNTRACKED
    np.testing.assert_array_equal(out.boxes, dets.boxes)
    np.testing.assert_array_equal(out.scores, dets.scores)
    np.testing.assert_array_equal(out.class_ids, [3, 5])
    assert out.labels == ["car", "dog"] and out.stamp == stamp and out.masks is masks
    recs = out.records()
    assert [r["track_id"] for r in recs] == out.track_ids.tolist()
    assert "track_id" not in dets.records()[0]


def test_an_empty_frame_gives_empty_ids():
    out = Tracker().update(Detections.empty())
    assert len(out) == 0 and out.track_ids.shape == (0,)


def test_reset_behaves_like_a_new_tracker():
    scene = _crossing_scene()
    used = Tracker(frame_rate=30)
    _run(used, scene[:10])
    used.reset()
    np.testing.assert_equal(_run(used, scene, seed=1), _run(Tracker(frame_rate=30), scene, seed=1))


def test_bad_arguments_are_user_errors():
    with pytest.raises(UsageError, match="unknown tracker 'sort'"):
        Tracker("sort")
    with pytest.raises(UsageError, match="unknown bytetrack option"):
        Tracker(max_age=3)
    with pytest.raises(UsageError, match="lost_track_buffer must be a positive integer"):
        Tracker(lost_track_buffer=0)
    with pytest.raises(UsageError, match="track_activation_threshold must be a number between 0 and 1"):
        Tracker(track_activation_threshold=1.5)
    with pytest.raises(UsageError, match="frame_rate"):
        Tracker(frame_rate=0)
    with pytest.raises(UsageError, match="takes Detections"):
        Tracker().update(np.zeros((1, 4)))


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "supervision", None)  # makes `import supervision` fail
    with pytest.raises(DependencyError, match=r"pip install 'vlexport\[track\]'"):
        Tracker()


def test_track_ids_are_validated():
    with pytest.raises(ValueError, match="track_ids: got shape"):
        Detections(np.zeros((2, 4)), np.zeros(2), np.zeros(2, np.int64), ["a", "b"], track_ids=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="track_ids: got dtype"):
        Detections(np.zeros((1, 4)), np.zeros(1), np.zeros(1, np.int64), ["a"], track_ids=np.array([0.5]))


def test_drawing_shows_track_ids_only_for_tracked_detections():
    from vlexport.runtime.draw import draw_detections

    img = np.full((240, 320, 3), 40, np.uint8)
    dets = _dets([[60, 80, 200, 200]], labels=["car"])
    plain = draw_detections(img, dets)
    untracked = Detections(dets.boxes, dets.scores, dets.class_ids, dets.labels, track_ids=np.array([-1]))
    tracked = Detections(dets.boxes, dets.scores, dets.class_ids, dets.labels, track_ids=np.array([12]))
    np.testing.assert_array_equal(draw_detections(img, untracked), plain)
    drawn = draw_detections(img, tracked)
    # The "#12 " prefix widens the tag: it reaches further right than the plain one.
    tag_rows = slice(0, 76)  # above the box, whose outline starts at y = 79

    def right_edge(a: np.ndarray) -> int:
        return int(np.nonzero((a[tag_rows] != img[tag_rows]).any(axis=(0, 2)))[0].max())

    assert right_edge(drawn) > right_edge(plain)


# -- a real video ---------------------------------------------------------------------------
ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[3] / "shared" / "assets"))
VIDEO = ASSETS / "video" / "car-detection.mp4"
WEIGHTS = ASSETS / "weights" / "yolov8n_coco.pt"


@pytest.fixture(scope="module")
def yolo_bundle(tmp_path_factory) -> Path:
    if not (VIDEO.is_file() and WEIGHTS.is_file()):
        pytest.skip(f"shared assets not found at {ASSETS} (set VLEXPORT_ASSETS)")
    pytest.importorskip("ultralytics")
    from vlexport.export.yolo import YoloExportOptions, export_yolo

    out = tmp_path_factory.mktemp("yolo") / "b"
    export_yolo(YoloExportOptions(checkpoint=WEIGHTS, out=out, trust_checkpoint=True, parity_count=1))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_cars_keep_their_ids_on_a_real_video(yolo_bundle):
    import cv2

    from vlexport.runtime import load

    task = load(yolo_bundle, threads=1)
    tracker = Tracker(frame_rate=12.5)  # the video's rate
    cap = cv2.VideoCapture(str(VIDEO))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 185)  # a stretch with several cars driving both ways
    frames = []
    for _ in range(40):
        ok, frame = cap.read()
        assert ok
        frames.append(tracker.update(task.detect(frame)))
    cap.release()
    task.close()

    centres: dict[int, list[np.ndarray]] = {}
    for d in frames:
        ids = d.track_ids[d.track_ids >= 0]
        assert len(set(ids.tolist())) == len(ids), "two detections share a track id in one frame"
        for box, tid in zip(d.boxes, d.track_ids):
            if tid >= 0:
                centres.setdefault(int(tid), []).append((box[:2] + box[2:]) / 2)
    # The scene really moves: some car is tracked over 20+ frames and travels 100+ pixels.
    assert any(len(c) >= 20 and np.linalg.norm(c[-1] - c[0]) > 100 for c in centres.values())
    assert len(centres) >= 2

    # Independently of the tracker: a box in one frame and its mutual best IoU match in the
    # next are the same car; both must carry the same id.
    pairs = same = 0
    for prev, cur in zip(frames, frames[1:]):
        if not len(prev) or not len(cur):
            continue
        m = _iou(prev.boxes, cur.boxes)
        for i in range(len(prev)):
            j = int(m[i].argmax())
            if m[i, j] > 0.5 and int(m[:, j].argmax()) == i and prev.track_ids[i] >= 0 and cur.track_ids[j] >= 0:
                pairs += 1
                same += int(prev.track_ids[i] == cur.track_ids[j])
    assert pairs >= 30
    assert same / pairs >= 0.95
