"""Training the captioner on a CPU: captioned images (optionally with boxes), AdamW, a few hundred steps.

Data (:func:`load_caption_data`) is either a JSONL file, one sample per line::

    {"image": "photos/0001.jpg", "caption": "a bus on a street", "boxes": [[5, 0.5, 0.6, 0.8, 0.7]]}

(``image`` relative to the file's folder; ``boxes`` optional, ``[class, cx, cy, w, h]`` normalised
to the source image as in YOLO labels), or a YOLO dataset (``data.yaml`` or its folder), whose
captions are written from the labels ("a photo of two persons and a bus") — enough to check
that the whole path, from training to the exported runtime, reproduces what it learned.

Images are pre-processed by the runtime's own ``clip_preprocess``, so training sees exactly the
pixels the exported encoder will.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlexport.errors import UsageError

log = logging.getLogger("vlexport")

__all__ = ["CaptionSample", "load_caption_data", "caption_from_labels", "CaptionBatch", "make_batch",
           "train_captioner"]

_NUMBERS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class CaptionSample:
    """One training image: its path, caption, and boxes ``(class, cx, cy, w, h)`` normalised to the image."""

    image: Path
    caption: str
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)


def caption_from_labels(class_ids: list[int], names: list[str], max_kinds: int = 3) -> str:
    """A short caption from box labels: the most frequent kinds, counted ("a photo of two persons and a bus")."""
    counts = Counter(class_ids).most_common(max_kinds)
    if not counts:
        return "a photo"
    parts = []
    for cls, n in counts:
        name = names[cls]
        word = _NUMBERS[n] if n < len(_NUMBERS) else "many"
        parts.append(f"{word} {name}" if n == 1 else f"{word} {name}s")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"a photo of {text}"


def load_caption_data(source: str | Path, limit: int | None = None) -> list[CaptionSample]:
    """Samples from a JSONL file or a YOLO dataset (captions written from labels); see the module doc."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"caption data {path} does not exist")
    if path.suffix == ".jsonl":
        samples = _from_jsonl(path)
    else:
        samples = _from_yolo(path)
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise UsageError(f"{path} has no captioned images")
    return samples


def _from_jsonl(path: Path) -> list[CaptionSample]:
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image = Path(rec["image"])
            caption = str(rec["caption"]).strip()
            boxes = [(int(b[0]), *map(float, b[1:5])) for b in rec.get("boxes", [])]
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise UsageError(f"{path}:{n}: expected {{\"image\": …, \"caption\": …, \"boxes\": [[class, cx, cy, w, h], …]}} "
                             f"({e})") from None
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise UsageError(f"{path}:{n}: image {image} does not exist")
        if not caption:
            raise UsageError(f"{path}:{n}: empty caption")
        samples.append(CaptionSample(image, caption, boxes))
    return samples


def _from_yolo(path: Path) -> list[CaptionSample]:
    from vlexport.data.detection import load_detection_dataset

    ds = load_detection_dataset(str(path))
    samples = []
    for item in ds.items:
        ids = [int(c) for c in item.class_ids]
        h, w = item.height, item.width
        boxes = [(c, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)
                 for c, (x1, y1, x2, y2) in zip(ids, item.boxes.tolist())]
        samples.append(CaptionSample(item.image_path, caption_from_labels(ids, ds.names), boxes))
    return samples


@dataclass
class CaptionBatch:
    """Tensors for one training step."""

    images: torch.Tensor  # [B, 3, S, S]
    captions: torch.Tensor  # [B, T] token ids ending with the end token, padded with it
    mask: torch.Tensor  # [B, T] 1 on real tokens (the end token included)
    targets: list[dict[str, torch.Tensor]]  # boxes cxcywh in [0, 1] of the network input, labels


def _boxes_in_crop(boxes: list[tuple[int, float, float, float, float]], info: Any) -> dict[str, torch.Tensor]:
    """Source-normalised cxcywh boxes → cxcywh normalised to the centre crop (clipped; empty ones dropped).

    ``info`` is the runtime's ``CropInfo``: the resized size and the crop's offsets.
    """
    new_w, new_h = info.resized
    size = info.size
    labels, out = [], []
    for cls, cx, cy, bw, bh in boxes:
        x1, x2 = (np.clip(((cx + d * bw / 2) * new_w - info.left) / size, 0, 1) for d in (-1, 1))
        y1, y2 = (np.clip(((cy + d * bh / 2) * new_h - info.top) / size, 0, 1) for d in (-1, 1))
        if x2 - x1 > 1e-3 and y2 - y1 > 1e-3:
            labels.append(cls)
            out.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    return {"labels": torch.tensor(labels, dtype=torch.long),
            "boxes": torch.tensor(out, dtype=torch.float32).reshape(-1, 4)}


def make_batch(samples: list[CaptionSample], tokenizer: Any, size: int, mean: tuple[float, ...],
               std: tuple[float, ...], eos_token_id: int, max_tokens: int = 40) -> CaptionBatch:
    """Pre-process images (the runtime's way), tokenize captions (+ end token), map boxes into the crop."""
    from vlexport.data.readers import read_image
    from vlexport.runtime.tasks.caption import clip_preprocess

    images, ids, targets = [], [], []
    for s in samples:
        bgr = read_image(s.image)
        x, info = clip_preprocess(bgr, size, mean, std)
        images.append(torch.from_numpy(x))
        tokens = tokenizer.encode(" " + s.caption.strip())[: max_tokens - 1] + [eos_token_id]
        ids.append(tokens)
        targets.append(_boxes_in_crop(s.boxes, info))
    t = max(len(i) for i in ids)
    captions = torch.full((len(ids), t), eos_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for i, tok in enumerate(ids):
        captions[i, : len(tok)] = torch.tensor(tok)
        mask[i, : len(tok)] = 1
    return CaptionBatch(torch.cat(images), captions, mask, targets)


def train_captioner(model: torch.nn.Module, samples: list[CaptionSample], tokenizer: Any, *, steps: int = 300,
                    lr: float = 1e-3, batch_size: int = 4, weight_decay: float = 0.01, use_boxes: bool = True,
                    seed: int = 0, progress: bool = True) -> list[float]:
    """AdamW on every trainable parameter; returns the total loss of each step.

    Images are pre-processed once (the CLIP tower is frozen or not, the pixels are the same);
    batches are drawn with a seeded shuffle.
    """
    if steps < 1 or batch_size < 1:
        raise UsageError("steps and batch size must be at least 1")
    enc = model.encoder
    torch.manual_seed(seed)
    rng = random.Random(seed)
    full = make_batch(samples, tokenizer, int(enc.image_size), tuple(enc.mean), tuple(enc.std),
                      model.eos_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    order: list[int] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc="training captioner", dynamic_ncols=True)
    try:
        for _ in range(steps):
            if len(order) < batch_size:
                order += rng.sample(range(len(samples)), len(samples))
            idx, order = order[:batch_size], order[batch_size:]
            idx_t = torch.tensor(idx)
            out = model(full.images[idx_t], full.captions[idx_t], full.mask[idx_t],
                        [full.targets[i] for i in idx] if use_boxes else None, mode="train")
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(out["loss"].detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lm=f"{float(out['lm_loss'].detach()):.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return losses


def train_captioner_on_data(data: str | Path, out: str | Path, *, preset: str = "tiny", gpt2_weights: str | None = None,
                            tokenizer: str | Path | None = None, limit: int | None = None, steps: int = 300,
                            lr: float = 1e-3, batch_size: int = 4, use_boxes: bool = True) -> tuple[list[float], int]:
    """The one call behind ``vlexport train-captioner``: data -> captioner -> checkpoint at ``out``.

    Returns the loss of every step and the number of training images.
    """
    from vlexport.models.captioner.model import build_captioner, save_captioner
    from vlexport.runtime.tokenizer import resolve_gpt2_tokenizer

    tok = resolve_gpt2_tokenizer(str(tokenizer) if tokenizer else None)[0]
    samples = load_caption_data(data, limit=limit)
    model = build_captioner(preset, **({"gpt2_weights": gpt2_weights} if gpt2_weights else {}))
    losses = train_captioner(model, samples, tok, steps=steps, lr=lr, batch_size=batch_size, use_boxes=use_boxes)
    save_captioner(model, out)
    return losses, len(samples)

