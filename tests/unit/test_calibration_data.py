"""Detection datasets (YOLO / COCO loaders, splits, COCO GT) and calibration frame sampling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from vlexport.data.detection import DetectionDataset, image_size, load_detection_dataset, to_coco_gt
from vlexport.data.yolo_files import parse_yaml_text as parse_simple_yaml
from vlexport.data.readers import CalibrationSet, calibration_frames
from vlexport.errors import SourceError, UsageError

COCO_JSON = "coco128/annotations/instances_train2017.json"


@pytest.fixture(scope="module")
def coco128(assets: Path) -> tuple[DetectionDataset, DetectionDataset]:
    return load_detection_dataset(assets / "coco128/data.yaml"), load_detection_dataset(assets / COCO_JSON)


def _write_image(path: Path, w: int = 64, h: int = 48, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), value, np.uint8)
    cv2.rectangle(img, (5, 5), (w // 2, h // 2), (value + 50) % 256, -1)
    assert cv2.imwrite(str(path), img)
    return path


def _yolo_dataset(root: Path, labels: dict[str, str], names=("cat", "dog")) -> Path:
    for stem, text in labels.items():
        _write_image(root / "images" / "train" / f"{stem}.jpg")
        if text is not None:
            lp = root / "labels" / "train" / f"{stem}.txt"
            lp.parent.mkdir(parents=True, exist_ok=True)
            lp.write_text(text)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/train\nnames:\n"
        + "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
    )
    return root / "data.yaml"


# -- datasets -------------------------------------------------------------------------------------
def test_yolo_and_coco_loaders_agree_on_coco128(coco128):
    yolo, coco = coco128
    assert (yolo.kind, coco.kind) == ("yolo", "coco")
    assert len(yolo) == len(coco) == 128
    assert coco.num_boxes == 939  # every box of the JSON, crowd regions included
    crowd = sum(int(it.iscrowd.sum()) for it in coco.items)
    assert crowd == 10
    # The YOLO labels were converted without crowd regions; two images have no label file.
    assert yolo.num_boxes == 939 - crowd == 929
    assert sum(1 for it in yolo.items if len(it) == 0) == 2
    assert yolo.names == coco.names and len(yolo.names) == 80 and yolo.names[:3] == ["person", "bicycle", "car"]
    assert yolo.image_paths == coco.image_paths
    checked = 0
    for a, b in zip(yolo.items, coco.items):
        assert (a.width, a.height) == (b.width, b.height)
        keep = b.iscrowd == 0
        assert len(a) == int(keep.sum())
        for box, cls in zip(a.boxes, a.class_ids):
            dist = np.abs(b.boxes[keep] - box).max(axis=1)
            j = int(dist.argmin())
            assert dist[j] < 1.0, f"{a.image_path.name}: YOLO box {box} has no COCO box within 1 px"
            assert b.class_ids[keep][j] == cls
            checked += 1
    assert checked == 929


def test_yolo_folder_forms_and_coco_category_mapping(assets, coco128):
    yolo, coco = coco128
    for path in (assets / "coco128", assets / "coco128/images/train2017"):
        ds = load_detection_dataset(path)
        assert ds.num_boxes == yolo.num_boxes and ds.names == yolo.names  # names found in data.yaml
    # COCO ids 1..90 with gaps → contiguous indices; the first box of image 9 is a bowl (id 51 → 45).
    item = next(it for it in coco.items if it.image_path.name == "000000000009.jpg")
    assert coco.names[45] == "bowl" and 45 in item.class_ids.tolist()
    # names= selects and orders categories by name; other categories are left out.
    sub = load_detection_dataset(assets / COCO_JSON, names=["car", "person"])
    assert sub.names == ["car", "person"]
    n_person = sum(int((it.class_ids == 0).sum()) for it in coco.items)
    n_car = sum(int((it.class_ids == 2).sum()) for it in coco.items)
    assert sum(int((it.class_ids == 1).sum()) for it in sub.items) == n_person
    assert sum(int((it.class_ids == 0).sum()) for it in sub.items) == n_car


def test_image_size_reads_headers_like_opencv(assets):
    paths = sorted((assets / "coco128/images/train2017").glob("*.jpg"))[:20] + sorted((assets / "images").iterdir())
    for p in paths:
        img = cv2.imread(str(p))
        if img is not None:
            assert image_size(p) == (img.shape[1], img.shape[0]), p


def test_fallback_yaml_reader_matches_pyyaml(assets):
    yaml = pytest.importorskip("yaml")
    text = (assets / "coco128/data.yaml").read_text()
    assert parse_simple_yaml(text) == yaml.safe_load(text)
    flow = parse_simple_yaml("train: a  # comment\nnames: ['x', \"y, z\", w]\nnc: 3\n")
    assert flow == {"train": "a", "names": ["x", "y, z", "w"], "nc": 3}
    block = parse_simple_yaml("names:\n  - cat\n  - dog\n")
    assert block == {"names": ["cat", "dog"]}


def test_disjoint_split_is_deterministic_and_never_overlaps(coco128):
    yolo, _ = coco128
    a1, b1 = yolo.disjoint_split(32, seed=3)
    a2, b2 = yolo.disjoint_split(32, seed=3)
    a3, _ = yolo.disjoint_split(32, seed=4)
    assert (len(a1), len(b1)) == (32, 96)
    assert a1.image_paths == a2.image_paths and b1.image_paths == b2.image_paths
    assert a1.image_paths != a3.image_paths
    assert not set(a1.image_paths) & set(b1.image_paths)
    assert set(a1.image_paths) | set(b1.image_paths) == set(yolo.image_paths)
    assert a1.names == yolo.names and a1.kind == "yolo"
    f, r = yolo.disjoint_split(0.25, seed=0)
    assert (len(f), len(r)) == (32, 96)
    sub = yolo.subset([5, 1])
    assert sub.image_paths == [yolo.items[5].image_path, yolo.items[1].image_path]
    for bad in (200, -1, 1.5):
        with pytest.raises(UsageError):
            yolo.disjoint_split(bad)
    with pytest.raises(UsageError, match="out of range"):
        yolo.subset([1000])


def test_to_coco_gt_keeps_boxes_and_crowd(coco128, assets):
    _, coco = coco128
    gt = to_coco_gt(coco)
    assert len(gt["images"]) == 128 and len(gt["annotations"]) == 939 and len(gt["categories"]) == 80
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 10
    raw = json.loads((assets / COCO_JSON).read_text())
    # Same boxes as the JSON (xywh), matched by file name.
    by_name = {im["file_name"]: im["id"] for im in raw["images"]}
    raw_boxes = sorted(tuple(round(v, 2) for v in a["bbox"]) for a in raw["annotations"]
                       if a["image_id"] == by_name["000000000009.jpg"])
    img_id = next(im["id"] for im in gt["images"] if im["file_name"].endswith("000000000009.jpg"))
    gt_boxes = sorted(tuple(round(v, 2) for v in a["bbox"]) for a in gt["annotations"] if a["image_id"] == img_id)
    assert raw_boxes == gt_boxes


def test_yolo_label_errors_name_file_and_line(tmp_path):
    bad = _yolo_dataset(tmp_path / "a", {"x": "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n"})
    with pytest.raises(SourceError, match=r"x\.txt:2: expected 'class cx cy w h'"):
        load_detection_dataset(bad)
    rng = _yolo_dataset(tmp_path / "b", {"x": "0 0.5 1.5 0.2 0.2\n"})
    with pytest.raises(SourceError, match=r"x\.txt:1: coordinates must be normalised"):
        load_detection_dataset(rng)
    cls = _yolo_dataset(tmp_path / "c", {"x": "7 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(SourceError, match=r"x\.txt:1: class 7 is out of range for 2"):
        load_detection_dataset(cls)
    word = _yolo_dataset(tmp_path / "d", {"x": "cat 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(SourceError, match=r"x\.txt:1: non-numeric"):
        load_detection_dataset(word)


def test_yolo_small_dataset_boxes_background_and_polygons(tmp_path):
    data = _yolo_dataset(tmp_path / "ok", {"a": "1 0.5 0.5 0.5 0.5\n", "b": None, "c": "0 0.1 0.1 0.3 0.1 0.2 0.4\n"})
    ds = load_detection_dataset(data)
    a, b, c = ds.items
    assert (a.width, a.height) == (64, 48)
    np.testing.assert_allclose(a.boxes, [[16, 12, 48, 36]], atol=1e-4)
    assert a.class_ids.tolist() == [1] and len(b) == 0  # no label file: a background image
    np.testing.assert_allclose(c.boxes, [[0.1 * 64, 0.1 * 48, 0.3 * 64, 0.4 * 48]], atol=1e-4)
    # names= must agree with the data.yaml when both exist.
    with pytest.raises(UsageError, match="differ"):
        load_detection_dataset(data, names=["dog", "cat"])


def test_dataset_path_errors(tmp_path, assets):
    with pytest.raises(SourceError, match="dataset not found"):
        load_detection_dataset(tmp_path / "nope")
    txt = tmp_path / "list.txt"
    txt.write_text("hello")
    with pytest.raises(UsageError, match="not a detection dataset"):
        load_detection_dataset(txt)
    nolabels = tmp_path / "nolabels"
    _write_image(nolabels / "images" / "a.jpg")
    (nolabels / "labels").mkdir()
    with pytest.raises(SourceError, match="no YOLO label files"):
        load_detection_dataset(nolabels)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(SourceError, match="no images"):
        load_detection_dataset(empty)
    # A COCO JSON whose images are nowhere to be found.
    lone = tmp_path / "ann" / "instances_val.json"
    lone.parent.mkdir()
    shutil.copy(assets / COCO_JSON, lone)
    with pytest.raises(SourceError, match="pass image_dir="):
        load_detection_dataset(lone)
    ds = load_detection_dataset(lone, image_dir=assets / "coco128/images/train2017")
    assert len(ds) == 128
    notcoco = tmp_path / "x.json"
    notcoco.write_text('{"a": 1}')
    with pytest.raises(SourceError, match="not a COCO annotation file"):
        load_detection_dataset(notcoco)
    with pytest.raises(UsageError, match="no 'test' split"):
        load_detection_dataset(assets / "coco128/data.yaml", split="test")


# -- calibration frames -----------------------------------------------------------------------------
@pytest.mark.parametrize("rel, kind", [
    ("coco128/data.yaml", "yolo"),
    (COCO_JSON, "coco"),
    ("video/car-detection.mp4", "video"),
    ("images", "images"),
])
def test_calibration_frames_are_deterministic(assets, rel, kind):
    src = assets / rel
    a = calibration_frames(src, 4, seed=0)
    b = calibration_frames(src, 4, seed=0)
    c = calibration_frames(src, 4, seed=1)
    assert isinstance(a, CalibrationSet) and a.kind == kind and a.source == str(src)
    assert len(a) == 4 and all(f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3 for f in a.frames)
    assert a.names == b.names and a.sha256 == b.sha256 and len(a.sha256) == 64
    assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))
    assert c.names != a.names and c.sha256 != a.sha256
    assert a.describe() == {"source": str(src), "kind": kind, "count": 4, "sha256": a.sha256}


@pytest.mark.parametrize("rel, suffix", [("coco128/semantic.yaml", ".jpg"), ("voc", "_image.png")])
def test_segmentation_datasets_give_their_images_not_their_masks(assets, rel, suffix):
    # A segmenter's --val is its parity source too: the frames are the photos, never the masks.
    s = calibration_frames(assets / rel, 1000, seed=0)
    assert s.kind == "segmentation" and len(s) == (100 if rel.endswith(".yaml") else 7)
    assert all(n.endswith(suffix) and "/masks/" not in n for n in s.names)
    assert all(f.ndim == 3 and f.shape[2] == 3 for f in s.frames)


def test_calibration_frames_video_sampling_spans_the_video(assets):
    s = calibration_frames(assets / "video/car-detection.mp4", 10, seed=0)
    idx = [int(n.rsplit("#", 1)[1]) for n in s.names]
    assert idx == sorted(idx) and len(set(idx)) == 10
    assert idx[0] < 377 / 10 and idx[-1] >= 377 * 0.9  # evenly over all 377 frames
    everything = calibration_frames(assets / "video/car-detection.mp4", 1000)
    assert 370 <= len(everything) <= 377


def test_calibration_frames_exclude_evaluation_images(assets, coco128):
    yolo, _ = coco128
    calib, evaluation = yolo.disjoint_split(100, seed=0)
    excluded = {str(p) for p in evaluation.image_paths}
    s = calibration_frames(assets / "coco128/images/train2017", 200, seed=0, exclude=excluded)
    assert len(s) == 100
    assert {str(Path(n).resolve()) for n in s.names} == {str(p.resolve()) for p in calib.image_paths}
    with pytest.raises(SourceError, match="excluded"):
        calibration_frames(assets / "coco128/images/train2017", 4, exclude={str(p) for p in yolo.image_paths})


def test_calibration_frames_hash_is_of_the_file_bytes(tmp_path):
    folder = tmp_path / "imgs"
    _write_image(folder / "a.png", value=10)
    _write_image(folder / "b.png", value=20)
    one = calibration_frames(folder, 2)
    _write_image(folder / "b.png", value=30)
    two = calibration_frames(folder, 2)
    assert one.names == two.names and one.sha256 != two.sha256


def test_calibration_frames_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images .* found under"):
        calibration_frames(tmp_path / "empty", 4)
    with pytest.raises(SourceError, match="not found"):
        calibration_frames(tmp_path / "missing", 4)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(SourceError, match="broken.jpg"):
        calibration_frames(bad, 4)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 100)
    with pytest.raises(SourceError, match="clip.mp4"):
        calibration_frames(video, 4)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(UsageError, match="not a calibration source: pass an image folder"):
        calibration_frames(notes, 4)
    for count in (0, -3, 2.5, True):
        with pytest.raises(UsageError, match="positive integer"):
            calibration_frames(tmp_path, count)
