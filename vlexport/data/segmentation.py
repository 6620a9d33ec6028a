"""Semantic-segmentation ground truth: image/mask pairs and their class indices.

Two on-disk layouts load into one :class:`SegmentationDataset` (image/mask pairs, contiguous class
indices into ``names``, ``ignore_index`` for unlabeled pixels):

* **id masks + semantic.yaml** (the shared COCO128 masks): single-channel PNGs whose pixel values
  are category ids; the yaml's ``classes`` (``id: name``) lists them. Ids map to class indices in
  the yaml's order; the yaml's ``ignore_index`` id (0, "unlabeled") and ids it does not list
  become ``ignore_index``. Images are found by stem under the yaml's ``images`` folder (or the
  sibling ``images/`` tree of the masks folder).
* **VOC pairs**: ``*_image.png`` / ``*_target.png`` in one folder, targets in the standard VOC
  colour palette (21 classes, background 0 ... tvmonitor 20); the boundary colour (224,224,192)
  becomes ``ignore_index``.

Torch-free, like the detection datasets; the metrics live in :mod:`vlexport.evaluation.segmentation`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from vlexport.data.yolo_files import YAML_SUFFIXES, _read_yaml
from vlexport.errors import SourceError, UsageError
from vlexport.runtime.sources import IMAGE_EXTS

__all__ = [
    "VOC_CLASSES",
    "voc_palette",
    "SegmentationDataset",
    "load_segmentation_dataset",
    "read_mask",
]

log = logging.getLogger("vlexport")

SEGMENTATION_KINDS = ("ids", "voc")
SEMANTIC_YAML = "semantic.yaml"

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_IGNORE_RGB = (224, 224, 192)


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map, ``[n, 3]`` uint8 RGB (class ``i`` is row ``i``)."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def _rgb_key(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@dataclass
class SegmentationDataset:
    """Image/mask pairs; ``names[i]`` is the name of class index ``i``.

    ``kind`` says how masks decode ("ids": category-id PNGs through ``id_to_index``; "voc":
    palette colours). Pixels with no class read as ``ignore_index``.
    """

    items: list[tuple[Path, Path]]
    names: list[str]
    ignore_index: int = 255
    kind: str = "ids"
    id_to_index: dict[int, int] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SEGMENTATION_KINDS:
            raise UsageError(f"segmentation dataset kind {self.kind!r} is not one of {list(SEGMENTATION_KINDS)}")
        self.items = [(Path(a), Path(b)) for a, b in self.items]
        self.names = [str(n) for n in self.names]
        if not self.names:
            raise UsageError("a segmentation dataset needs at least one class name")
        if 0 <= self.ignore_index < len(self.names):
            raise UsageError(f"ignore_index {self.ignore_index} collides with class index {self.ignore_index} "
                             f"({self.names[self.ignore_index]!r}); use a value outside 0..{len(self.names) - 1}")
        if self.kind == "ids" and not self.id_to_index:
            raise UsageError("an 'ids' segmentation dataset needs an id_to_index map")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def subset(self, indices: Iterable[int]) -> SegmentationDataset:
        return SegmentationDataset([self.items[i] for i in indices], list(self.names), self.ignore_index, self.kind,
                                   dict(self.id_to_index), self.source)

    def read_mask(self, i: int) -> np.ndarray:
        """The ``i``-th ground truth as ``[H, W]`` int64 class indices (``ignore_index`` where unlabeled)."""
        return read_mask(self.items[i][1], self)

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.source or self.kind!r}, {len(self)} images, {len(self.names)} classes)"


def read_mask(path: str | Path, dataset: SegmentationDataset) -> np.ndarray:
    """Decode one mask file of ``dataset`` to ``[H, W]`` int64 class indices with ``ignore_index``."""
    path = Path(path)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise SourceError(f"cannot read mask {path} (missing, unreadable or not an image)")
    ignore = int(dataset.ignore_index)
    if dataset.kind == "ids":
        if raw.ndim == 3:
            # A grey PNG saved with 3 equal channels still reads as ids; anything else is not an id mask.
            if raw.shape[2] >= 3 and np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]):
                raw = raw[..., 0]
            else:
                raise SourceError(f"{path}: expected a single-channel id mask, got {raw.shape[2]} channels")
        if raw.dtype.kind not in "iu":
            raise SourceError(f"{path}: expected an integer id mask, got dtype {raw.dtype}")
        top = max(int(raw.max()), max(dataset.id_to_index)) + 1
        lut = np.full(top, ignore, np.int64)
        for cid, idx in dataset.id_to_index.items():
            if 0 <= cid < top:
                lut[cid] = idx
        return lut[raw.astype(np.int64)]
    # voc: colour targets (cv2 decodes palette PNGs to BGR too)
    if raw.ndim == 2:
        raise SourceError(f"{path}: expected a VOC colour target, got a single-channel image")
    rgb = raw[..., 2::-1] if raw.shape[2] >= 3 else None
    if rgb is None:
        raise SourceError(f"{path}: expected a VOC colour target, got {raw.shape[2]} channels")
    keys = _rgb_key(rgb)
    out = np.full(keys.shape, -1, np.int64)
    for idx, col in enumerate(voc_palette(len(VOC_CLASSES))):
        out[keys == _rgb_key(col)] = idx
    out[keys == _rgb_key(np.asarray(VOC_IGNORE_RGB))] = ignore
    unknown = out == -1
    if unknown.any():
        bad = np.unique(rgb[unknown].reshape(-1, 3), axis=0)[:5].tolist()
        raise SourceError(f"{path}: {int(unknown.sum())} pixels have colours outside the VOC palette, e.g. {bad}")
    return out


# -- loading ------------------------------------------------------------------------------------
def _find_semantic_yaml(path: Path) -> Path | None:
    if path.is_file() and path.suffix.lower() in YAML_SUFFIXES:
        return path
    if path.is_dir():
        for cand in (path, *list(path.parents)[:3]):
            if (cand / SEMANTIC_YAML).is_file():
                return cand / SEMANTIC_YAML
    return None


def _image_by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            out.setdefault(p.stem, p)
    return out


def _load_ids(yaml_path: Path, masks_dir: Path | None, ignore_index: int) -> SegmentationDataset:
    data = _read_yaml(yaml_path)
    root = yaml_path.parent
    classes = data.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise SourceError(f"{yaml_path}: expected 'classes' as an id: name mapping")
    try:
        pairs = [(int(k), str(v)) for k, v in classes.items()]
    except (TypeError, ValueError):
        raise SourceError(f"{yaml_path}: 'classes' keys must be integer category ids") from None
    unlabeled = data.get("ignore_index", 0)
    names, id_to_index = [], {}
    for cid, name in pairs:  # the yaml's order
        if unlabeled is not None and cid == int(unlabeled):
            continue
        id_to_index[cid] = len(names)
        names.append(name)
    if masks_dir is None:
        masks_dir = root / str(data.get("masks", "masks"))
    if not masks_dir.is_dir():
        raise SourceError(f"{yaml_path}: masks folder {masks_dir} not found")
    images_dir = root / str(data["images"]) if data.get("images") else None
    if images_dir is None or not images_dir.is_dir():
        # The sibling tree: .../masks/<split> -> .../images/<split>
        parts = list(masks_dir.resolve().parts)
        last = max((i for i, part in enumerate(parts) if part == "masks"), default=None)
        images_dir = None
        if last is not None:
            parts[last] = "images"
            images_dir = Path(*parts)
        if images_dir is None or not images_dir.is_dir():
            raise SourceError(f"{yaml_path}: no images folder for {masks_dir} (set 'images' in the yaml)")
    masks = sorted(p for p in masks_dir.rglob("*.png") if p.is_file())
    if not masks:
        raise SourceError(f"{masks_dir} holds no .png masks")
    by_stem = _image_by_stem(images_dir)
    missing = [m.stem for m in masks if m.stem not in by_stem]
    if missing:
        raise SourceError(
            f"{len(missing)} of {len(masks)} masks in {masks_dir} have no image under {images_dir} "
            f"(e.g. {missing[:3]})"
        )
    items = [(by_stem[m.stem], m) for m in masks]
    return SegmentationDataset(items, names, ignore_index, "ids", id_to_index, source=str(yaml_path))


def _load_voc(folder: Path, ignore_index: int) -> SegmentationDataset:
    targets = sorted(folder.glob("*_target.png"))
    items = []
    for t in targets:
        img = t.with_name(t.name[: -len("_target.png")] + "_image.png")
        if not img.is_file():
            raise SourceError(f"{t} has no image {img.name} beside it")
        items.append((img, t))
    return SegmentationDataset(items, list(VOC_CLASSES), ignore_index, "voc", source=str(folder))


def load_segmentation_dataset(path: str | Path, ignore_index: int = 255) -> SegmentationDataset:
    """Load a segmentation dataset from a ``semantic.yaml`` (or a folder with one, or its masks
    folder) or from a VOC folder of ``*_image.png`` / ``*_target.png`` pairs; see the module doc."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"segmentation dataset {p} not found")
    if p.is_dir() and any(p.glob("*_target.png")):
        ds = _load_voc(p, ignore_index)
    else:
        y = _find_semantic_yaml(p)
        if y is None:
            raise SourceError(
                f"{p} is not a segmentation dataset: expected a {SEMANTIC_YAML} (id masks) "
                "or a folder of VOC *_image.png / *_target.png pairs"
            )
        masks_dir = p if p.is_dir() and p != y.parent else None
        ds = _load_ids(y, masks_dir, ignore_index)
    if len(ds) == 0:
        raise SourceError(f"segmentation dataset {p} has no images")
    log.info("segmentation dataset %s: %d images, %d classes", p, len(ds), ds.num_classes)
    return ds
