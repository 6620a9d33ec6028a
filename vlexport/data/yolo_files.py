"""YOLO dataset files: ``data.yaml`` (PyYAML), image lists and folders, and label ``.txt`` files.

Boxes come back in source pixels for the caller (:mod:`vlexport.data.detection`) to wrap in its
dataset types; nothing here decodes an image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlexport.data.readers import list_images
from vlexport.errors import DependencyError, SourceError, UsageError
from vlexport.runtime.sources import IMAGE_EXTS

__all__ = ["YAML_SUFFIXES", "parse_yaml_text", "label_path"]

YAML_SUFFIXES = (".yaml", ".yml")


# -- data.yaml ----------------------------------------------------------------------------------
def parse_yaml_text(text: str, where: str | Path = "<yaml>") -> Any:
    """``yaml.safe_load`` of ``text``; a YAML error becomes a SourceError naming ``where``."""
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - PyYAML comes with the export and eval extras
        raise DependencyError("reading a data.yaml needs PyYAML: pip install 'vlexport[eval]'") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{where} is not valid YAML: {first}") from e


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    data = parse_yaml_text(text, path)
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a YOLO dataset file (expected a mapping with 'names' and split keys)")
    return data


def _names_from_yaml(value: Any, where: Path) -> list[str]:
    if isinstance(value, dict):
        try:
            keys = sorted(int(k) for k in value)
        except (TypeError, ValueError):
            raise SourceError(f"{where}: 'names' keys must be class indices 0..N-1") from None
        if keys != list(range(len(keys))):
            raise SourceError(f"{where}: 'names' must number the classes 0..{len(keys) - 1} without gaps")
        lookup = {int(k): v for k, v in value.items()}
        return [str(lookup[i]) for i in keys]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise SourceError(f"{where}: 'names' must be a list or an index: name mapping, got {type(value).__name__}")


# -- YOLO folders and label files ---------------------------------------------------------------
_IMG_DIR = "/images/"
_LABEL_DIR = "/labels/"


def label_path(image: Path) -> Path:
    """The YOLO label file of ``image``: the last ``/images/`` becomes ``/labels/``, suffix ``.txt``."""
    s = image.as_posix()
    if _IMG_DIR in s:
        head, tail = s.rsplit(_IMG_DIR, 1)
        s = head + _LABEL_DIR + tail
    return Path(s).with_suffix(".txt")


def _yaml_split_images(yaml_path: Path, data: dict[str, Any], split: str) -> list[Path]:
    base = yaml_path.parent
    if data.get("path"):
        p = Path(str(data["path"]))
        base = p if p.is_absolute() else (yaml_path.parent / p)
    if split not in data or not data[split]:
        present = [k for k in ("train", "val", "test") if data.get(k)]
        raise UsageError(f"{yaml_path} has no {split!r} split; it has {present}")
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    images: list[Path] = []
    for entry in entries:
        p = Path(str(entry))
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            images += list_images(p)
        elif p.is_file() and p.suffix.lower() == ".txt":
            # An image list, one path a line, relative to the dataset root (Ultralytics' convention).
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line:
                    q = Path(line)
                    images.append(q if q.is_absolute() else (base / q))
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            images.append(p)
        else:
            raise SourceError(f"{yaml_path}: split {split!r} points at {p}, which does not exist")
    return sorted(set(images))


def _yolo_folder_images(folder: Path) -> list[Path]:
    if (folder / "images").is_dir():
        return list_images(folder / "images")
    return list_images(folder)


def _find_yaml(folder: Path) -> Path | None:
    dirs = [folder, folder.parent]
    s = folder.resolve().as_posix() + "/"
    if _IMG_DIR in s:  # .../root/images/train → look in root too
        dirs.append(Path(s.rsplit(_IMG_DIR, 1)[0]))
    for d in dirs:
        for name in ("data.yaml", "data.yml", "dataset.yaml"):
            if (d / name).is_file():
                return d / name
    return None


def _parse_label_file(path: Path, width: int, height: int, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    boxes, classes = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read label file {path}: {e}") from e
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{n}"
        # 5 values: class cx cy w h; an odd count >= 7: class and a polygon (YOLO segment labels).
        if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
            raise SourceError(f"{where}: expected 'class cx cy w h' (or 'class x1 y1 x2 y2 ...'), got {line.strip()!r}")
        try:
            cls_f = float(parts[0])
            vals = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        except ValueError:
            raise SourceError(f"{where}: non-numeric value in {line.strip()!r}") from None
        if not cls_f.is_integer() or cls_f < 0:
            raise SourceError(f"{where}: class {parts[0]!r} is not a non-negative integer")
        cls = int(cls_f)
        if num_classes is not None and cls >= num_classes:
            raise SourceError(f"{where}: class {cls} is out of range for {num_classes} class names")
        if not np.isfinite(vals).all() or (vals < 0).any() or (vals > 1).any():
            raise SourceError(f"{where}: coordinates must be normalised to [0, 1], got {line.strip()!r}")
        if len(parts) == 5:
            cx, cy, w, h = vals
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = vals[0::2], vals[1::2]
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max(), ys.max()
        boxes.append((x1 * width, y1 * height, x2 * width, y2 * height))
        classes.append(cls)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(classes, dtype=np.int64)
