"""Feature-alignment distillation: train a KDEOV student against a frozen CLIP image tower.

The student's pooled image embedding is pulled towards the teacher's embedding of the same
image (:class:`~vlexport.models.common.losses.FeatureAlignmentLoss`), optionally also aligned with the
text features of the batch's captions, and optionally regularised by DINO self-distillation
against an EMA copy of itself (:class:`~vlexport.models.kdeov.dino.DINODistillation`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlexport.errors import SourceError, UsageError
from vlexport.models.kdeov.dino import DINODistillation
from vlexport.models.kdeov.checkpoint import save_kdeov_checkpoint
from vlexport.models.kdeov.model import KDEOVModel
from vlexport.models.common.losses import FeatureAlignmentLoss
from vlexport.runtime.preprocess import letterbox
from vlexport.runtime.sources import IMAGE_EXTS

__all__ = ["ImageFolderDataset", "train_feature_alignment"]

logger = logging.getLogger(__name__)

# Same ceiling as CLIP: the temperature may not go below 1/100.
_MAX_LOGIT_SCALE = math.log(100.0)


def _letterbox(bgr: np.ndarray, size: int, pad_value: int = 114) -> np.ndarray:
    """The bundle's own pre-processing, so the student trains on what it will see deployed."""
    return letterbox(bgr, (size, size), pad_value=pad_value)[0]


class ImageFolderDataset(Dataset):
    """Images of a folder (not recursive), letterboxed to ``image_size`` as RGB float ``[3, H, W]`` in [0, 1].

    Files whose header no decoder recognises are skipped with a warning when the dataset is built;
    a file that still fails to decode later is skipped with a warning and the next readable image
    is returned in its place.

    Raises:
        SourceError: the folder does not exist.
        UsageError: no readable image with one of ``extensions`` in the folder.
    """

    def __init__(
        self, folder: str | Path, image_size: int = 640, extensions: Iterable[str] = IMAGE_EXTS
    ) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"image folder not found: {self.folder}")
        if int(image_size) <= 0:
            raise UsageError(f"image_size must be > 0, got {image_size}")
        self.image_size = int(image_size)
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        candidates = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in exts)
        self.files: list[Path] = []
        for path in candidates:
            if cv2.haveImageReader(str(path)):
                self.files.append(path)
            else:
                logger.warning("skipping unreadable image %s", path)
        if not self.files:
            raise UsageError(
                f"no readable images in {self.folder} (extensions: {', '.join(sorted(exts))})"
            )

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor | None:
        """The image at ``index`` as a tensor, or None if it cannot be decoded."""
        bgr = cv2.imread(str(self.files[index]), cv2.IMREAD_COLOR)
        if bgr is None:
            return None
        rgb = np.ascontiguousarray(_letterbox(bgr, self.image_size)[..., ::-1])
        return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, index: int) -> torch.Tensor:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            image = self.load(i)
            if image is not None:
                return image
            logger.warning("skipping unreadable image %s", self.files[i])
        raise SourceError(f"none of the {len(self.files)} images in {self.folder} can be decoded")


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch is images, ``(images, text_features)`` or ``{"images": ..., "text_features": ...}``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping) and "images" in batch:
        return batch["images"], batch.get("text_features")
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1]
    raise UsageError(
        "each batch must be an image tensor, (images, text_features) or a dict with 'images'; "
        f"got {type(batch).__name__}"
    )


def train_feature_alignment(
    model: KDEOVModel,
    dataloader: Iterable[Any],
    teacher: nn.Module,
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    device: str | torch.device = "cpu",
    checkpoint_out: str | Path | None = None,
    log_every: int = 1,
    progress: bool = True,
    loss_fn: FeatureAlignmentLoss | None = None,
    dino: DINODistillation | None = None,
    record: Mapping[str, Any] | None = None,
) -> list[float]:
    """Distil a frozen CLIP image tower into the student's image embedding.

    Each step: ``s = model.encode_image(images)``, ``t = teacher(images)`` (no gradient), then
    ``loss_fn(s, t, text_features, exp(logit_scale))`` (default
    ``FeatureAlignmentLoss(1.0, 0.5, "cosine")``), AdamW over the student's trainable
    parameters. The data loader is cycled until ``steps`` steps have run. The logit scale is
    clamped to at most ``log(100)`` as in CLIP.

    Args:
        model: the student; left in eval mode afterwards.
        dataloader: yields image tensors ``[B, 3, H, W]``, ``(images, text_features)`` pairs or
            dicts with ``images`` and optional ``text_features`` ``[B, D]`` (paired captions).
        teacher: e.g. :class:`~vlexport.models.clip.towers.FrozenCLIPImageEncoder`, with
            ``embed_dim`` equal to the student's.
        steps: optimisation steps (>= 1).
        checkpoint_out: where to save the trained student (``vlexport.kdeov/1``), if given.
        log_every: progress-bar postfix update period, in steps.
        progress: show a tqdm progress bar.
        dino: optional DINO self-distillation: its loss, times ``dino.weight``, is added to the
            total; its student head is trained with the model and its EMA teacher is updated
            after every optimiser step. It is a training aid only: not saved in the checkpoint.
        record: more entries for the checkpoint's ``extra`` (e.g. the text tower's identity).

    Returns:
        the loss of every step.
    """
    if int(steps) < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    if lr <= 0:
        raise UsageError(f"lr must be > 0, got {lr}")
    if int(log_every) < 1:
        raise UsageError(f"log_every must be >= 1, got {log_every}")
    teacher_dim = getattr(teacher, "embed_dim", None)
    if teacher_dim is not None and int(teacher_dim) != model.config.embed_dim:
        raise UsageError(
            f"teacher embed_dim {teacher_dim} does not match the student embed_dim {model.config.embed_dim}"
        )
    device = torch.device(device)
    model.to(device).train()
    teacher.to(device).eval()
    loss_fn = loss_fn or FeatureAlignmentLoss()
    params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("text_encoder.")]
    if dino is not None:
        dino.to(device).train()
        params += dino.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    history: list[float] = []
    batches = _cycle(dataloader)
    bar = tqdm(total=int(steps), desc="distil", unit="step", disable=not progress)
    try:
        for step in range(int(steps)):
            images, text = _split_batch(next(batches))
            images = images.to(device, non_blocking=True)
            with torch.no_grad():
                target = teacher(images)
            student = model.encode_image(images)
            if text is not None:
                text = text.to(device)
            loss, parts = loss_fn(student, target, text, model.logit_scale.exp())
            if dino is not None:
                dino_loss = dino(model, images)
                loss = loss + dino.weight * dino_loss
                parts = {**parts, "dino": dino_loss.detach(), "total": loss.detach()}
            if not torch.isfinite(loss):
                raise UsageError(f"training diverged at step {step + 1} (loss {loss.item()}); lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, _MAX_LOGIT_SCALE)
            if dino is not None:
                dino.update_teacher(model, step, int(steps))
            history.append(float(loss.item()))
            bar.update(1)
            if (step + 1) % int(log_every) == 0 or step + 1 == steps:
                bar.set_postfix({k: f"{v.item():.4f}" for k, v in parts.items()})
    finally:
        bar.close()
        model.eval()
        if dino is not None:
            dino.eval()

    if checkpoint_out is not None:
        extra = {**dict(record or {}), "steps": int(steps), "lr": float(lr), "loss_history": history}
        if dino is not None:
            extra["dino_weight"] = dino.weight
        save_kdeov_checkpoint(model, checkpoint_out, extra=extra)
        logger.info("saved KDEOV checkpoint to %s", checkpoint_out)
    return history


def _cycle(dataloader: Iterable[Any]):
    """Iterate the loader again and again (a fresh epoch each time); an empty loader is an error."""
    for epoch in itertools.count():
        empty = True
        for batch in dataloader:
            empty = False
            yield batch
        if empty:
            raise UsageError("the data loader yields no batches" + (f" (epoch {epoch + 1})" if epoch else ""))


def train_kdeov_on_folder(
    images: str | Path,
    out: str | Path,
    *,
    preset: str = "yolov8n-vitb32",
    backbone_weights: str | Path | None = None,
    trust_checkpoint: bool = False,
    steps: int = 100,
    batch_size: int = 8,
    lr: float = 1e-3,
    image_size: int | None = None,
    seed: int = 0,
    dino_weight: float = 0.0,
) -> list[float]:
    """Build the preset's student and CLIP teacher, distil on a folder of images, save ``out``.

    The one-call path behind ``vlexport train-kdeov``; returns the per-step loss history.
    ``dino_weight > 0`` adds DINO self-distillation with that weight (default heads and views).
    """
    import dataclasses

    from vlexport.models.clip.towers import FrozenCLIPImageEncoder, FrozenCLIPTextEncoder
    from vlexport.models.kdeov.config import KDEOV_PRESETS
    from vlexport.models.kdeov.model import build_kdeov

    if dino_weight < 0:
        raise UsageError(f"dino_weight must be >= 0, got {dino_weight}")
    if preset not in KDEOV_PRESETS:
        raise UsageError(f"unknown kdeov preset {preset!r}; choose one of {', '.join(KDEOV_PRESETS)}")
    config = KDEOV_PRESETS[preset]
    if image_size is not None:
        if image_size < 32 or image_size % 32:
            raise UsageError(f"--imgsz must be a multiple of 32 and at least 32, got {image_size}")
        config = dataclasses.replace(config, image_size=image_size)
    torch.manual_seed(seed)
    dataset = ImageFolderDataset(images, config.image_size)
    text = FrozenCLIPTextEncoder(config.clip_model, config.clip_pretrained, activation=config.clip_activation,
                                 allow_random=True)
    teacher = FrozenCLIPImageEncoder.from_loaded(text.loaded)
    model = build_kdeov(config, backbone_weights=backbone_weights, trust_checkpoint=trust_checkpoint,
                        text_encoder=text)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                                         drop_last=True, generator=torch.Generator().manual_seed(seed))
    dino = DINODistillation(model, weight=dino_weight) if dino_weight > 0 else None
    from vlexport.models.kdeov.detection_train import text_tower_identity

    return train_feature_alignment(model, loader, teacher, steps=steps, lr=lr, checkpoint_out=out, dino=dino,
                                   record={"text_tower": text_tower_identity(text.loaded)})
