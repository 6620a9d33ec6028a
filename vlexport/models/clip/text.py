"""Prompt templates, vocabularies, and the class text-embedding bake with its on-disk cache.

The bake follows open_clip's ``build_zero_shot_classifier``: for every class, each template is
filled with the class name and encoded by the frozen CLIP text tower, the unit-norm embeddings
are averaged over templates and the mean is L2-normalised again. Results are cached on disk per
(CLIP model, weights hash, templates, class name), so exporting again with the same vocabulary
does not run the text tower at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlexport.errors import UsageError
from vlexport.models.clip.towers import FrozenCLIPTextEncoder
from vlexport.runtime.text_cache import TextEmbeddingCache  # torch-free: the runtime shares it

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_TEMPLATES",
    "SINGLE_TEMPLATE",
    "COCO80_CLASSES",
    "resolve_templates",
    "parse_vocabulary",
    "TextEmbeddingCache",
    "TextEmbeddings",
    "build_text_embeddings",
]

#: The 80 prompt templates OpenAI used for zero-shot ImageNet (CLIP paper, "Prompt_Engineering_for_ImageNet").
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

#: One plain template: cheaper to bake, slightly less accurate zero-shot.
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

_BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {"imagenet80": IMAGENET_TEMPLATES, "single": SINGLE_TEMPLATE}

#: The 80 COCO detection classes in the standard (YOLO, contiguous id 0..79) order.
COCO80_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def _read_lines(path: Path, what: str) -> list[str]:
    """Lines of a UTF-8 text file (BOM tolerated); any read problem is a UsageError naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(f"cannot read the {what} file {str(path)!r}: {reason}") from exc


def resolve_templates(spec: str) -> tuple[str, tuple[str, ...]]:
    """Resolve a ``--templates`` value to ``(templates_id, templates)``.

    ``"imagenet80"`` and ``"single"`` are built in; anything else is a text file with one template
    per line, each containing ``{}`` exactly once (blank lines ignored). The id of a file is
    ``"file:<first 16 hex of the sha256 of its templates>"``, so the cache follows its content, not its path.
    """
    if spec in _BUILTIN_TEMPLATES:
        return spec, _BUILTIN_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        hint = "is a directory, not a file" if path.is_dir() else "is neither a built-in name nor a file"
        raise UsageError(
            f"prompt templates {spec!r} {hint}: use 'imagenet80', 'single' or a text file "
            "with one template per line containing '{}'"
        )
    templates = tuple(line.strip() for line in _read_lines(path, "templates") if line.strip())
    if not templates:
        raise UsageError(f"the templates file {str(path)!r} is empty: write one template per line, e.g. 'a photo of a {{}}.'")
    for number, template in enumerate(templates, 1):
        if "{}" not in template:
            raise UsageError(
                f"template {number} in {str(path)!r} has no '{{}}' placeholder for the class name: {template!r}"
            )
        try:
            # Catches '{} and {}', '{0}', '{name}', stray braces, and '{{}}' (no real placeholder).
            usable = "\x00" in template.format("\x00")
        except (IndexError, KeyError, ValueError):
            usable = False
        if not usable:
            raise UsageError(
                f"template {number} in {str(path)!r} must contain '{{}}' exactly once and no other braces: {template!r}"
            )
    digest = hashlib.sha256("\n".join(templates).encode("utf-8")).hexdigest()
    return f"file:{digest[:16]}", templates


def parse_vocabulary(classes: str | None, vocab_file: str | os.PathLike[str] | None) -> list[str]:
    """Class names from ``--classes "a,b,c"`` or ``--vocab FILE``; COCO's 80 classes when neither is given.

    A vocabulary file has one class name per line; blank lines and lines starting with ``#`` are
    ignored. Names are stripped of surrounding whitespace and must be unique.
    """
    if classes is not None and vocab_file is not None:
        raise UsageError("pass either --classes or --vocab, not both")
    if classes is None and vocab_file is None:
        return list(COCO80_CLASSES)
    if classes is not None:
        names = [name.strip() for name in classes.split(",")]
    else:
        assert vocab_file is not None  # narrowed above; helps type checkers
        lines = _read_lines(Path(vocab_file).expanduser(), "vocabulary")
        names = [line.strip() for line in lines if not line.strip().startswith("#")]
    names = [name for name in names if name]
    if not names:
        raise UsageError(
            'the vocabulary is empty: pass --classes "person,car" or --vocab FILE with one class name per line'
        )
    duplicates = [name for name, count in Counter(names).items() if count > 1]
    if duplicates:
        shown = ", ".join(repr(name) for name in duplicates)
        raise UsageError(f"duplicate class names in the vocabulary: {shown}; list each class once")
    return names


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
    """Class text embeddings of one vocabulary.

    Attributes:
        embeddings: ``float32 [C, D]``, one unit-norm row per class, in vocabulary order.
        encoded: how many classes went through the text tower.
        cached: how many classes came from the cache.
        class_names: the vocabulary, in row order.
        templates_id: the templates used (``"imagenet80"``, ``"single"``, ``"file:…"``).
    """

    embeddings: np.ndarray
    encoded: int
    cached: int
    class_names: tuple[str, ...] = ()
    templates_id: str = ""

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.dtype != np.float32:
            raise ValueError(
                f"embeddings must be float32 [C, D], got {self.embeddings.dtype} {self.embeddings.shape}"
            )
        if self.encoded + self.cached != self.embeddings.shape[0]:
            raise ValueError(
                f"encoded ({self.encoded}) + cached ({self.cached}) != rows ({self.embeddings.shape[0]})"
            )
        if self.class_names and len(self.class_names) != self.embeddings.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.embeddings.shape[0]} rows")


#: Above this many classes to encode, a progress bar is shown.
_PROGRESS_MIN_CLASSES = 50


def build_text_embeddings(
    encoder: FrozenCLIPTextEncoder,
    class_names: Sequence[str],
    templates: Sequence[str],
    templates_id: str,
    cache: TextEmbeddingCache | None = None,
    *,
    batch_size: int = 256,
) -> TextEmbeddings:
    """Embed each class as the normalised mean of its normalised template embeddings.

    Classes found in ``cache`` are not encoded; the others are encoded in chunks of ``batch_size``
    prompts (class x template) under ``torch.no_grad()`` and written to the cache.
    """
    names = list(class_names)
    if not names:
        raise UsageError(
            'the vocabulary is empty: pass --classes "person,car" or --vocab FILE with one class name per line'
        )
    if not templates:
        raise UsageError("no prompt templates: use 'imagenet80', 'single' or a templates file")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dim = encoder.embed_dim
    ident = (encoder.model_name, encoder.weights_sha256, templates_id)
    activation = encoder.activation

    found: dict[str, np.ndarray] = {}
    if cache is not None:
        for name in dict.fromkeys(names):
            value = cache.get(*ident, name, activation=activation)
            if value is not None and value.shape == (dim,):
                found[name] = value
    misses = [name for name in dict.fromkeys(names) if name not in found]

    if misses:
        computed = _encode_classes(encoder, misses, tuple(templates), batch_size)
        for name, row in zip(misses, computed):
            found[name] = row
            if cache is not None:
                cache.put(*ident, name, row, activation=activation)
    logger.debug("text embeddings: %d classes encoded, %d from cache", len(misses), len(names) - len(misses))

    matrix = np.stack([found[name] for name in names]).astype(np.float32, copy=False)
    missed = set(misses)
    encoded = sum(1 for name in names if name in missed)
    return TextEmbeddings(
        embeddings=matrix,
        encoded=encoded,
        cached=len(names) - encoded,
        class_names=tuple(names),
        templates_id=templates_id,
    )


@torch.no_grad()
def _encode_classes(
    encoder: FrozenCLIPTextEncoder, names: list[str], templates: tuple[str, ...], batch_size: int
) -> np.ndarray:
    """``float32 [len(names), D]``: per class, mean of unit template embeddings, re-normalised."""
    n_templates = len(templates)
    prompts = [template.format(name) for name in names for template in templates]
    # Prompt p belongs to class p // n_templates: summing per class avoids holding all C*T embeddings.
    owner = torch.arange(len(prompts)) // n_templates
    sums = torch.zeros((len(names), encoder.embed_dim), dtype=torch.float32)
    with tqdm(
        total=len(prompts),
        desc=f"text embeddings ({len(names)} classes)",
        unit="prompt",
        disable=len(names) <= _PROGRESS_MIN_CLASSES,
    ) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            embedded = encoder.encode(chunk, batch_size=len(chunk)).cpu()
            sums.index_add_(0, owner[start : start + len(chunk)], embedded)
            bar.update(len(chunk))
    means = sums / n_templates
    return torch.nn.functional.normalize(means, dim=-1).numpy().astype(np.float32, copy=False)


#: COCO's category id (the 2017 annotation files' ids, 1..90 with gaps) of each COCO80_CLASSES entry.
COCO80_TO_COCO91_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
    32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
    58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
    88, 89, 90,
)  # fmt: skip


def _coco91_names() -> tuple[str, ...]:
    names = ["N/A"] * (max(COCO80_TO_COCO91_IDS) + 1)
    for name, cid in zip(COCO80_CLASSES, COCO80_TO_COCO91_IDS):
        names[cid] = name
    return tuple(names)


#: Names indexed by raw COCO category id 0..90: the label space of models trained on COCO's ids
#: (DETR: ``num_classes`` 91). Ids without a category (0 = background, 12, 26, ...) are "N/A".
COCO91_CLASSES: tuple[str, ...] = _coco91_names()
