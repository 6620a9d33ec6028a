"""Labelled detection datasets (YOLO folders / ``data.yaml``, COCO JSON) for the accuracy gate.

A :class:`DetectionDataset` holds, per image, the ground-truth boxes in *source pixels* (xyxy)
and contiguous class indices into ``names``, whatever the on-disk format. Both loaders sort the
images by path, so the same images loaded from YOLO labels and from a COCO JSON line up.

Reading the YOLO files (data.yaml, labels) is in :mod:`vlexport.data.yolo_files`. Numpy, OpenCV,
Pillow and PyYAML only: this module is imported by the evaluator, which runs bundles without torch.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import JpegImagePlugin, PngImagePlugin

from vlexport.data.yolo_files import (
    _IMG_DIR,
    _LABEL_DIR,
    YAML_SUFFIXES,
    _find_yaml,
    _names_from_yaml,
    _parse_label_file,
    _read_yaml,
    _yaml_split_images,
    _yolo_folder_images,
    label_path,
)
from vlexport.errors import SourceError, UsageError
from vlexport.runtime.sources import IMAGE_EXTS

__all__ = [
    "DetectionItem",
    "DetectionDataset",
    "load_detection_dataset",
    "dataset_images",
    "dataset_kind",
    "to_coco_gt",
    "category_id",
    "image_size",
]

log = logging.getLogger("vlexport")

DATASET_KINDS = ("yolo", "coco")


def category_id(class_index: int) -> int:
    """The COCO category id :func:`to_coco_gt` gives class ``class_index`` (ids start at 1)."""
    return int(class_index) + 1


@dataclass
class DetectionItem:
    """One image and its ground truth: xyxy boxes in the image's pixels and class indices.

    ``iscrowd`` and ``areas`` are kept from a COCO JSON (crowd regions are ignored by the COCO
    metric rather than counted as misses); None means "no crowd, area = box area".
    """

    image_path: Path
    boxes: np.ndarray
    class_ids: np.ndarray
    width: int
    height: int
    iscrowd: np.ndarray | None = None
    areas: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image_path = Path(self.image_path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        k = self.boxes.shape[0]
        self.class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
        if self.class_ids.shape != (k,):
            raise ValueError(f"class_ids: got shape {self.class_ids.shape}, expected ({k},)")
        for name in ("iscrowd", "areas"):
            value = getattr(self, name)
            if value is not None:
                arr = np.asarray(value, dtype=np.int64 if name == "iscrowd" else np.float64).reshape(-1)
                if arr.shape != (k,):
                    raise ValueError(f"{name}: got shape {arr.shape}, expected ({k},)")
                setattr(self, name, arr)
        if self.width < 1 or self.height < 1:
            raise ValueError(f"{self.image_path}: image size {self.width}x{self.height} is not positive")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class DetectionDataset:
    """Images with ground-truth boxes; ``names[i]`` is the name of class index ``i``."""

    root: Path
    names: list[str]
    items: list[DetectionItem]
    kind: str
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"unknown dataset kind {self.kind!r}; expected one of {DATASET_KINDS}")
        self.root = Path(self.root)
        self.names = [str(n) for n in self.names]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_boxes(self) -> int:
        """Boxes over all images (crowd regions included)."""
        return sum(len(it) for it in self.items)

    @property
    def image_paths(self) -> list[Path]:
        return [it.image_path for it in self.items]

    def subset(self, indices: Iterable[int]) -> DetectionDataset:
        """A dataset of the items at ``indices`` (in that order); names and kind are kept."""
        idx = [int(i) for i in indices]
        n = len(self.items)
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise UsageError(f"subset: index {bad[0]} is out of range for a dataset of {n} images")
        if len(set(idx)) != len(idx):
            raise UsageError("subset: the indices repeat an image")
        return DetectionDataset(self.root, list(self.names), [self.items[i] for i in idx], self.kind,
                                self.split, dict(self.extra))

    def disjoint_split(self, n_first: int | float, seed: int = 0) -> tuple[DetectionDataset, DetectionDataset]:
        """Split into two datasets that share no image, e.g. (calibration, evaluation).

        ``n_first`` is a number of images, or a fraction in (0, 1). The choice is a seeded
        shuffle (the same seed always gives the same split); each part keeps the dataset order.
        """
        n = len(self.items)
        if isinstance(n_first, bool) or not isinstance(n_first, (int, float, np.integer, np.floating)):
            raise UsageError(f"disjoint_split: n_first must be a count or a fraction, got {n_first!r}")
        if isinstance(n_first, (float, np.floating)):
            if not 0.0 < float(n_first) < 1.0:
                raise UsageError(f"disjoint_split: a fraction must lie in (0, 1), got {n_first}")
            k = int(round(float(n_first) * n))
        else:
            k = int(n_first)
        if not 0 <= k <= n:
            raise UsageError(f"disjoint_split: cannot take {k} of {n} images")
        order = list(range(n))
        random.Random(seed).shuffle(order)
        first = sorted(order[:k])
        rest = sorted(order[k:])
        return self.subset(first), self.subset(rest)

    def __repr__(self) -> str:
        return (f"DetectionDataset(kind={self.kind!r}, root={str(self.root)!r}, images={len(self.items)}, "
                f"boxes={self.num_boxes}, classes={len(self.names)})")


# -- image size without decoding ---------------------------------------------------------------
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (transpose / 90° turns)
# Pillow's own JPEG and PNG readers, which parse the header lazily (no pixel decoding). They are
# used directly rather than through Image.open: Ultralytics replaces Image.open with a wrapper
# that, on a file Pillow cannot identify, tries to pip-install a HEIF plugin.
_HEADER_READERS = (
    (b"\xff\xd8", JpegImagePlugin.JpegImageFile, True),  # JPEG: cv2.imread applies its EXIF rotation
    (b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile, False),
)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as OpenCV decodes it (EXIF rotation applied).

    Reads only the header of PNG and JPEG files (with Pillow); other formats are decoded.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            for magic, reader, rotates in _HEADER_READERS:
                if not head.startswith(magic):
                    continue
                f.seek(0)
                try:
                    with reader(f) as im:
                        w, h = im.size
                        orientation = im.getexif().get(0x0112, 1) if rotates else 1
                except (SyntaxError, ValueError, OSError, EOFError):  # a damaged header: let OpenCV judge it
                    break
                if w > 0 and h > 0:
                    return (h, w) if orientation in _ROTATED else (w, h)
                break
    except OSError as e:
        raise SourceError(f"cannot read image {path}: {e.strerror or e}") from e
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SourceError(f"cannot read image {path} (missing, unreadable or not an image)")
    return int(img.shape[1]), int(img.shape[0])


# -- YOLO ---------------------------------------------------------------------------------------
def _load_yolo(path: Path, names: Sequence[str] | None, split: str) -> DetectionDataset:
    yaml_path: Path | None = None
    if path.is_file():
        yaml_path = path
        data = _read_yaml(path)
        images = _yaml_split_images(path, data, split)
        root = path.parent
        file_names = _names_from_yaml(data["names"], path) if data.get("names") is not None else None
    else:
        root = path
        images = _yolo_folder_images(path)
        yaml_path = _find_yaml(path)
        file_names = None
        if yaml_path is not None:
            ydata = _read_yaml(yaml_path)
            if ydata.get("names") is not None:
                file_names = _names_from_yaml(ydata["names"], yaml_path)
    if not images:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found in the YOLO dataset {path}")
    if names is not None:
        class_names = [str(n) for n in names]
        if file_names is not None and file_names != class_names:
            raise UsageError(f"the names given differ from those in {yaml_path}; pass names=None to use the file's")
    elif file_names is not None:
        class_names = file_names
    else:
        class_names = []
    labels = [label_path(p) for p in images]
    if not any(lp.is_file() for lp in labels):
        raise SourceError(
            f"no YOLO label files found for the {len(images)} images of {path} "
            f"(expected e.g. {labels[0]} beside {images[0]})"
        )
    items = []
    for img, lp in zip(images, labels):
        w, h = image_size(img)
        if lp.is_file():
            boxes, cls = _parse_label_file(lp, w, h, len(class_names) or None)
        else:  # an image without a label file is a background image: no boxes
            boxes, cls = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        items.append(DetectionItem(img, boxes, cls, w, h))
    if not class_names:
        top = max((int(it.class_ids.max()) for it in items if len(it)), default=-1)
        class_names = [f"class{i}" for i in range(top + 1)]
        log.warning("%s: no class names (no data.yaml, no names=); using %s…", path, class_names[:3])
    return DetectionDataset(root, class_names, items, "yolo", split if path.is_file() else None)


# -- COCO -----------------------------------------------------------------------------------
def _read_coco_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise SourceError(f"{path} is not a COCO annotation file (expected 'images', 'annotations', 'categories')")
    return data


def _coco_image_dir(path: Path, data: dict[str, Any], image_dir: str | Path | None) -> Path:
    if not data["images"]:
        raise SourceError(f"{path} lists no images")
    first = str(data["images"][0].get("file_name", ""))
    if image_dir is not None:
        d = Path(image_dir)
        if not d.is_dir():
            raise SourceError(f"image folder not found: {d}")
        return d
    # instances_val2017.json → the split is "val2017"; the images live in one of the usual places.
    split = path.stem.split("_", 1)[1] if "_" in path.stem else path.stem
    ann_dir = path.parent
    candidates = [ann_dir.parent / "images" / split, ann_dir.parent / split, ann_dir / "images" / split,
                  ann_dir / "images", ann_dir.parent / "images", ann_dir]
    for c in candidates:
        if (c / first).is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise SourceError(f"cannot find the images of {path} (looked for {first} in {tried}); pass image_dir=")


def _load_coco(path: Path, names: Sequence[str] | None, image_dir: str | Path | None) -> DetectionDataset:
    data = _read_coco_json(path)
    img_dir = _coco_image_dir(path, data, image_dir)
    cats = sorted(data["categories"], key=lambda c: int(c["id"]))
    if names is None:
        # Sorted COCO ids give the contiguous 80-class order YOLO uses.
        class_names = [str(c["name"]) for c in cats]
        cat_to_index = {int(c["id"]): i for i, c in enumerate(cats)}
    else:
        class_names = [str(n) for n in names]
        lookup = {n: i for i, n in enumerate(class_names)}
        cat_to_index = {int(c["id"]): lookup[str(c["name"])] for c in cats if str(c["name"]) in lookup}
        if not cat_to_index:
            raise UsageError(f"none of the names given is a category of {path}")
    per_image: dict[int, list[dict[str, Any]]] = {}
    dropped = 0
    for a in data.get("annotations") or []:
        if int(a["category_id"]) not in cat_to_index:
            dropped += 1
            continue
        per_image.setdefault(int(a["image_id"]), []).append(a)
    if dropped:
        log.warning("%s: %d annotations of categories not in the names given were left out", path, dropped)
    items, missing = [], []
    for im in data["images"]:
        p = img_dir / str(im["file_name"])
        if not p.is_file():
            missing.append(p)
            continue
        anns = per_image.get(int(im["id"]), [])
        xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        items.append(DetectionItem(
            p, boxes, [cat_to_index[int(a["category_id"])] for a in anns], int(im["width"]), int(im["height"]),
            iscrowd=[int(a.get("iscrowd", 0)) for a in anns],
            areas=[float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns],
        ))
    if missing:
        raise SourceError(f"{len(missing)} image(s) of {path} are missing, e.g. {missing[0]}; pass image_dir=")
    if not items:
        raise SourceError(f"{path} lists no images")
    items.sort(key=lambda it: it.image_path.as_posix())
    return DetectionDataset(img_dir, class_names, items, "coco", path.stem)


# -- entry points -------------------------------------------------------------------------------
def dataset_kind(path: str | Path) -> str | None:
    """"coco" for a .json, "yolo" for a data.yaml or a folder with images/ and labels/, else None."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".json":
            return "coco"
        if p.suffix.lower() in YAML_SUFFIXES:
            return "yolo"
        return None
    if p.is_dir():
        if (p / "images").is_dir() and (p / "labels").is_dir():
            return "yolo"
        # An image folder inside a YOLO tree: .../images/train ↔ .../labels/train.
        s = p.resolve().as_posix() + "/"
        if _IMG_DIR in s and Path(s.rsplit(_IMG_DIR, 1)[0] + _LABEL_DIR + s.rsplit(_IMG_DIR, 1)[1]).is_dir():
            return "yolo"
    return None


def load_detection_dataset(
    path: str | Path,
    *,
    names: Sequence[str] | None = None,
    split: str = "val",
    image_dir: str | Path | None = None,
) -> DetectionDataset:
    """Load a labelled detection dataset.

    ``path`` is a YOLO ``data.yaml`` (``split`` picks its images; ``path:`` in the file is
    relative to the file), a YOLO folder with ``images/`` and ``labels/`` (``.../images/x/a.jpg``
    ↔ ``.../labels/x/a.txt``; an image without a label file has no boxes), or a COCO annotation
    JSON (images found beside it, e.g. ``../images/<split>``, or in ``image_dir``).

    ``names`` (class index → name): for YOLO it supplies the names when there is no data.yaml
    (it must match one that exists); for COCO it selects and orders the categories by name.
    Without it COCO category ids map to contiguous indices in id order (COCO's 80-class order).
    """
    p = Path(path)
    if not p.exists():
        raise SourceError(f"dataset not found: {p}")
    kind = dataset_kind(p)
    if kind == "coco":
        return _load_coco(p, names, image_dir)
    if kind == "yolo":
        if image_dir is not None:
            raise UsageError("image_dir= is for COCO JSON datasets; a YOLO dataset finds its images itself")
        return _load_yolo(p, names, split)
    raise UsageError(
        f"{p} is not a detection dataset: pass a YOLO data.yaml, a folder with images/ and labels/, "
        "or a COCO annotation .json"
    )


def dataset_images(path: str | Path, *, split: str | None = None,
                   image_dir: str | Path | None = None) -> tuple[str, list[Path]]:
    """(kind, image paths) of a dataset without reading its labels, for calibration.

    ``split`` for a data.yaml defaults to ``train`` (calibrate on training images), else ``val``.
    """
    p = Path(path)
    kind = dataset_kind(p)
    if kind == "coco":
        data = _read_coco_json(p)
        d = _coco_image_dir(p, data, image_dir)
        return kind, sorted(d / str(im["file_name"]) for im in data["images"])
    if kind == "yolo":
        if p.is_file():
            data = _read_yaml(p)
            chosen = split or ("train" if data.get("train") else "val")
            return kind, _yaml_split_images(p, data, chosen)
        return kind, _yolo_folder_images(p)
    raise UsageError(f"{p} is not a YOLO or COCO dataset")


def to_coco_gt(dataset: DetectionDataset) -> dict[str, Any]:
    """The dataset as a COCO ground-truth dict for pycocotools.

    Image ids are 1..N in dataset order; category ids are ``class index + 1`` (:func:`category_id`).
    ``iscrowd`` and ``area`` come from the COCO JSON when the dataset was loaded from one.
    """
    images, annotations = [], []
    ann_id = 1
    for i, item in enumerate(dataset.items):
        image_id = i + 1
        images.append({"id": image_id, "file_name": item.image_path.as_posix(),
                       "width": int(item.width), "height": int(item.height)})
        for k in range(len(item)):
            x1, y1, x2, y2 = (float(v) for v in item.boxes[k])
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": ann_id,
                "image_id": image_id,
                "category_id": category_id(item.class_ids[k]),
                "bbox": [x1, y1, w, h],
                "area": float(item.areas[k]) if item.areas is not None else w * h,
                "iscrowd": int(item.iscrowd[k]) if item.iscrowd is not None else 0,
            })
            ann_id += 1
    categories = [{"id": category_id(i), "name": n} for i, n in enumerate(dataset.names)]
    return {"info": {"description": f"vlexport {dataset.kind} dataset {dataset.root}"},
            "images": images, "annotations": annotations, "categories": categories}
