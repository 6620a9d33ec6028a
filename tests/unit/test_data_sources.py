"""Data-set plumbing built on libraries: one image-extension list, Pillow headers, PyYAML data.yaml."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from vlexport.data.detection import image_size, load_detection_dataset
from vlexport.data.readers import calibration_frames
from vlexport.errors import SourceError
from vlexport.runtime.sources import IMAGE_EXTS


def _ppm_folder(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        img = np.full((24, 32, 3), 40 * i, np.uint8)
        path = folder / f"frame{i}.ppm"
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def test_ppm_folder_is_a_calibration_source(tmp_path):
    # `vlexport run` reads .ppm folders (runtime IMAGE_EXTS); calibration must accept the same folder.
    assert ".ppm" in IMAGE_EXTS
    paths = _ppm_folder(tmp_path / "ppm")
    cal = calibration_frames(tmp_path / "ppm", 5)
    assert cal.kind == "images" and len(cal) == 3
    assert cal.names == [str(p) for p in paths]
    assert all(f.shape == (24, 32, 3) and f.dtype == np.uint8 for f in cal.frames)
    assert image_size(paths[0]) == (32, 24)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_follows_exif_rotation_like_opencv(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(path, exif=exif)
    img = cv2.imread(str(path))
    assert image_size(path) == (img.shape[1], img.shape[0])


def test_image_size_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(SourceError, match="broken.png"):
        image_size(bad)
    with pytest.raises(SourceError, match="missing.jpg"):
        image_size(tmp_path / "missing.jpg")


def test_data_yaml_names_forms_and_yaml_errors(tmp_path):
    for i in range(2):
        img = tmp_path / "images" / "train" / f"a{i}.jpg"
        img.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img), np.zeros((20, 20, 3), np.uint8))
        lab = tmp_path / "labels" / "train" / f"a{i}.txt"
        lab.parent.mkdir(parents=True, exist_ok=True)
        lab.write_text("1 0.5 0.5 0.2 0.2\n")
    yaml_path = tmp_path / "data.yaml"
    for names in ("names: [cat, dog]\n", "names:\n  - cat\n  - dog\n", "names:\n  1: dog\n  0: cat\n"):
        yaml_path.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/train\n{names}")
        ds = load_detection_dataset(yaml_path)
        assert ds.names == ["cat", "dog"] and len(ds) == 2 and ds.num_boxes == 2
    yaml_path.write_text("train: images/train\nnames: [cat, dog\n")
    with pytest.raises(SourceError, match=r"data\.yaml is not valid YAML"):
        load_detection_dataset(yaml_path)


def test_image_size_bypasses_ultralytics_image_open_patch(tmp_path, capsys):
    # Ultralytics wraps PIL.Image.open: on an unidentified file it tries to install pi-heif.
    pytest.importorskip("ultralytics.utils.patches")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(SourceError, match="broken.jpg"):
        image_size(bad)
    assert "pi-heif" not in capsys.readouterr().out
