"""Training samples for KDEOV's detection path: letterboxed images, boxes in input pixels, crop embeddings."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from vlexport.errors import SourceError, UsageError
from vlexport.runtime.preprocess import letterbox

__all__ = ["DetectionSample", "prepare_samples"]


@dataclasses.dataclass
class DetectionSample:
    """One training image: the network input and its boxes in input pixels (xyxy) and class indices."""

    image: torch.Tensor  # [3, S, S] RGB in [0, 1], letterboxed as the bundle's runtime does
    boxes: torch.Tensor  # [K, 4] float32, input pixels
    labels: torch.Tensor  # [K] int64, indices into the training vocabulary
    source: str
    crops: torch.Tensor | None = None  # [K, D] CLIP image embeddings of the boxes (region distillation)
    feats: list[torch.Tensor] | None = None  # cached outputs of the frozen part, per level
    raw_boxes: torch.Tensor | None = None  # cached box-branch outputs [4 * reg_max, N] (freeze="heads")


def _to_tensor(bgr: np.ndarray, size: int) -> tuple[torch.Tensor, Any]:
    img, info = letterbox(bgr, (size, size))
    rgb = np.ascontiguousarray(img[:, :, ::-1])
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0), info


def prepare_samples(
    dataset: Any,
    vocabulary: Sequence[str],
    image_size: int,
    *,
    flip: bool = True,
    crop_encoder: Any = None,
) -> list[DetectionSample]:
    """Letterboxed images with their boxes mapped to input pixels (and mirrored copies with ``flip``).

    Boxes whose class name is not in ``vocabulary`` are dropped (training on base classes only);
    their images stay, as negatives. ``crop_encoder`` (a CLIP image tower) embeds every box's crop
    of the source image for region distillation.
    """
    index = {name: i for i, name in enumerate(vocabulary)}
    unknown = sorted(set(vocabulary) - set(dataset.names))
    if unknown:
        raise UsageError(f"class name(s) {unknown} are not in the dataset's names; choose among {dataset.names}")
    samples: list[DetectionSample] = []
    for item in tqdm(dataset.items, desc="reading images", unit="image", leave=False):
        bgr = cv2.imread(str(item.image_path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SourceError(f"cannot decode training image {item.image_path}")
        keep = [k for k, c in enumerate(item.class_ids) if dataset.names[int(c)] in index]
        src_boxes = item.boxes[keep].astype(np.float32)
        labels = torch.tensor([index[dataset.names[int(item.class_ids[k])]] for k in keep], dtype=torch.long)
        image, info = _to_tensor(bgr, image_size)
        gx, gy = info.gain_xy
        boxes = torch.from_numpy(src_boxes.copy()).reshape(-1, 4)
        boxes[:, [0, 2]] = boxes[:, [0, 2]] * gx + info.pad_x
        boxes[:, [1, 3]] = boxes[:, [1, 3]] * gy + info.pad_y
        crops = _crop_embeddings(crop_encoder, bgr, src_boxes) if crop_encoder is not None else None
        samples.append(DetectionSample(image, boxes, labels, str(item.image_path), crops))
        if flip:
            mirrored = boxes.clone()
            mirrored[:, [0, 2]] = image_size - boxes[:, [2, 0]]
            samples.append(DetectionSample(image.flip(-1).contiguous(), mirrored, labels.clone(),
                                           f"{item.image_path} (mirrored)", crops))
    return samples


@torch.no_grad()
def _crop_embeddings(encoder: Any, bgr: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    """The CLIP image tower's embedding of each box's crop (at least 4 px a side)."""
    h, w = bgr.shape[:2]
    crops = []
    for x1, y1, x2, y2 in boxes:
        x1, y1 = int(max(0, math.floor(x1))), int(max(0, math.floor(y1)))
        x2, y2 = int(min(w, max(x1 + 4, math.ceil(x2)))), int(min(h, max(y1 + 4, math.ceil(y2))))
        rgb = np.ascontiguousarray(bgr[y1:y2, x1:x2, ::-1])
        crops.append(torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0))
    if not crops:
        return torch.zeros(0, encoder.embed_dim)
    device = encoder.device
    return torch.cat([encoder(c[None].to(device)).cpu() for c in crops])
