"""Train KDEOV's detection path on a labelled dataset (YOLO data.yaml/folder or COCO JSON).

The classifier is the frozen CLIP text tower: each class name's template-averaged embedding is
a fixed row, and a region scores ``sigmoid(s * cos(region, text) + b)`` per class (YOLO-World /
ViLD-text region-text contrastive, independent per class). Assignment and the box losses are
Ultralytics' own (``TaskAlignedAssigner``, the v8 detection loss with its BCE, CIoU and DFL
terms) applied to the student's region logits and its YOLO box branch.

Knowledge distillation for the open vocabulary (ViLD-style, ``region_distill_weight > 0``): the
mean region embedding of the anchors assigned to each ground-truth box is pulled towards the
CLIP image tower's embedding of that box's crop, so that classes never labelled in training
land near their text. It is only meaningful with pretrained CLIP weights.

What trains is chosen by ``freeze`` (what stays fixed is computed once per image and its mirror
image before training, which is what makes CPU training practical):

* ``"heads"`` (default): backbone, neck and the detector's class and box branches stay fixed; the
  region projections, the logit scale and the bias train (seconds per hundred steps on a CPU);
* ``"backbone"``: backbone and neck stay fixed; the class and box branches train too, at
  ``pretrained_lr_scale`` times the learning rate;
* ``"none"``: everything trains, every step runs the whole network.
Checkpoints (``vlexport.kdeov/2``) are written every ``checkpoint_every`` steps and at the end,
atomically, with the optimiser state, so ``resume=`` continues where a run stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.kdeov.checkpoint import save_kdeov_checkpoint
from vlexport.models.kdeov.detection_data import DetectionSample, prepare_samples
from vlexport.models.kdeov.detector_init import init_region_head_from_detector, max_region_logit_scale
from vlexport.models.kdeov.heads import folded_similarity
from vlexport.models.kdeov.model import KDEOVModel

__all__ = ["DetectionTrainOptions", "train_kdeov_detection", "train_kdeov_on_dataset", "text_tower_identity",
           "check_text_tower"]

logger = logging.getLogger(__name__)

#: What stays fixed while the detection path trains.
FREEZE_MODES = ("heads", "backbone", "none")
# Ultralytics' default loss gains (box CIoU, class BCE, distribution focal loss).
_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


@dataclasses.dataclass(frozen=True)
class DetectionTrainOptions:
    """How the detection path is trained.

    Attributes:
        steps: optimiser steps.
        batch_size: images per step.
        lr: AdamW learning rate of the new parts (region projections, logit scale, bias).
        pretrained_lr_scale: factor on ``lr`` for the parts that start from the detector's
            weights (the class and box branches of a YOLO head), so a small dataset does not
            wash them out.
        weight_decay: AdamW weight decay.
        freeze: ``"heads"``, ``"backbone"`` or ``"none"`` (see the module docstring).
        flip: also train on mirrored images.
        region_distill_weight: weight of the ViLD-style region distillation (0: off).
        init_from_detector: start the region projections from the source detector's own classifier
            on the training classes it knows (see :func:`~vlexport.models.kdeov.detector_init.init_region_head_from_detector`).
        checkpoint_every: write the checkpoint every this many steps (0: only at the end).
        seed: sampling and initialisation seed.
        device: ``"cuda"``, ``"cpu"`` or None (a GPU when there is one).
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 5e-4
    pretrained_lr_scale: float = 0.1
    weight_decay: float = 0.01
    freeze: str = "heads"
    flip: bool = True
    region_distill_weight: float = 0.0
    init_from_detector: bool = True
    checkpoint_every: int = 100
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UsageError(f"steps and batch size must be at least 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0 or not self.pretrained_lr_scale >= 0:
            raise UsageError(f"the learning rate must be > 0 and its pretrained scale >= 0, got {self.lr}, "
                             f"{self.pretrained_lr_scale}")
        if self.freeze not in FREEZE_MODES:
            raise UsageError(f"unknown --freeze {self.freeze!r}; choose one of {', '.join(FREEZE_MODES)}")
        if self.region_distill_weight < 0 or self.checkpoint_every < 0:
            raise UsageError("--distill-regions and --checkpoint-every must be zero or positive")


def text_tower_identity(loaded: Any) -> dict[str, Any]:
    """What identifies a text tower's embeddings: model, weights sha256 and activation."""
    return {"model": loaded.model_name, "weights_sha256": loaded.weights_sha256, "activation": loaded.activation,
            "weights_source": loaded.weights_source}


def check_text_tower(trained: dict[str, Any] | None, loaded: Any, checkpoint: str | Path) -> None:
    """Refuse to pair a checkpoint with a text tower other than the one it was trained against."""
    if not trained:
        return
    now = text_tower_identity(loaded)
    diff = [f"{k} {trained.get(k)!r} (now {now[k]!r})" for k in ("model", "weights_sha256", "activation")
            if trained.get(k) != now[k]]
    if diff:
        raise CheckpointError(
            f"{checkpoint} was trained against another CLIP text tower: " + ", ".join(diff)
            + "; pass the same --clip-model/--clip-pretrained/--clip-activation it was trained with"
        )


# -- loss -----------------------------------------------------------------------------------------


class _LossModelView(nn.Module):
    """The attributes Ultralytics' ``v8DetectionLoss`` reads from a model, for KDEOV's heads."""

    def __init__(self, strides: Sequence[int], num_classes: int, reg_max: int, device: torch.device) -> None:
        super().__init__()
        self.args = SimpleNamespace(**_GAINS)
        self.model = [SimpleNamespace(stride=torch.tensor([float(s) for s in strides]), nc=num_classes,
                                      reg_max=reg_max)]
        self._device_probe = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)


def _ultralytics_loss(strides: Sequence[int], num_classes: int, reg_max: int, device: torch.device):
    from ultralytics.utils.loss import v8DetectionLoss

    return v8DetectionLoss(_LossModelView(strides, num_classes, reg_max, device))


def _targets(samples: Sequence[DetectionSample], image_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Ultralytics' batch layout: image index, class, normalised xywh per box."""
    idx, cls, boxes = [], [], []
    for i, s in enumerate(samples):
        if len(s.labels):
            b = s.boxes.clamp(0, image_size)
            xywh = torch.stack(((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), 1)
            idx.append(torch.full((len(s.labels),), float(i)))
            cls.append(s.labels.float())
            boxes.append(xywh / image_size)
    if not idx:
        return {"batch_idx": torch.zeros(0, device=device), "cls": torch.zeros(0, device=device),
                "bboxes": torch.zeros(0, 4, device=device)}
    return {"batch_idx": torch.cat(idx).to(device), "cls": torch.cat(cls).to(device),
            "bboxes": torch.cat(boxes).to(device)}


def _region_distill_loss(embeddings: torch.Tensor, fg_mask: torch.Tensor, gt_idx: torch.Tensor,
                         samples: Sequence[DetectionSample]) -> torch.Tensor:
    """1 - cos(mean region embedding of each box's assigned anchors, CLIP's embedding of its crop)."""
    losses = []
    for b, sample in enumerate(samples):
        if sample.crops is None or not len(sample.crops):
            continue
        for j in range(len(sample.crops)):
            chosen = fg_mask[b] & (gt_idx[b] == j)
            if chosen.any():
                student = F.normalize(embeddings[b, chosen].mean(0), dim=-1)
                teacher = F.normalize(sample.crops[j].to(student), dim=-1)
                losses.append(1.0 - (student * teacher).sum())
    return torch.stack(losses).mean() if losses else embeddings.sum() * 0.0


# -- training -------------------------------------------------------------------------------------


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return torch.device(name)


def _param_groups(model: KDEOVModel, opts: DetectionTrainOptions) -> list[dict[str, Any]]:
    new, pretrained = [], []
    for name, p in model.named_parameters():
        if name.startswith("text_encoder.") or not p.requires_grad:
            continue
        if name.startswith("backbone."):
            # The detector's own weights: its head branches train only with freeze="backbone".
            in_head = ".cv2." in name or ".cv3." in name
            if opts.freeze == "heads" or (opts.freeze == "backbone" and not in_head):
                continue
            pretrained.append(p)
        else:
            new.append(p)
    groups = [{"params": new, "lr": opts.lr}]
    if pretrained and opts.pretrained_lr_scale > 0:
        groups.append({"params": pretrained, "lr": opts.lr * opts.pretrained_lr_scale})
    return groups


def _raw_boxes(model: KDEOVModel, feats: list[torch.Tensor]) -> torch.Tensor | None:
    """The box branch's distributions ``[B, 4 * reg_max, N]`` (None without a YOLO head)."""
    if not model.backbone.has_box_head:
        return None
    head, b = model.backbone.detect, feats[0].shape[0]
    return torch.cat([head.cv2[i](f).reshape(b, 4 * model.backbone.reg_max, -1) for i, f in enumerate(feats)], 2)


def _head_outputs(model: KDEOVModel, feats: list[torch.Tensor], text: torch.Tensor, *, regions: bool,
                  embeddings: bool):
    """Class logits ``[B, C, N]`` and, with ``embeddings``, the region embeddings ``[B, N, D]``.

    ``feats`` are neck features, or the class branch's outputs when ``regions``. Without
    embeddings the cosines come from :func:`folded_similarity` (the exported graph's own
    arithmetic), several times cheaper than building the D-channel maps.
    """
    regional = feats if regions else model.region_features(feats)
    if embeddings:
        projected = [proj(f).flatten(2) for proj, f in zip(model.spatial_projections, regional)]
        projected = torch.cat(projected, 2).transpose(1, 2)  # [B, N, D]
        logits = model.region_logits(model.scoring_embeddings(projected, dim=-1), text).transpose(1, 2)
        return logits, F.normalize(projected, dim=-1)
    floor = model.region_norm_floor
    cos = torch.cat([folded_similarity(f, p.conv, p.norm, text, floor)
                     for p, f in zip(model.spatial_projections, regional)], 2)
    return model.region_logit_scale.exp() * cos + model.region_bias, None


def _grid_loss(model: KDEOVModel, loss_fn: Any, feats: list[torch.Tensor], logits: torch.Tensor,
               targets: dict[str, torch.Tensor], image_size: int):
    """Class loss only, for a backbone without a box head: fixed grid boxes are the 'predictions'."""
    from ultralytics.utils.tal import make_anchors

    b = logits.shape[0]
    anchors, strides = make_anchors(feats, loss_fn.stride, 0.5)
    boxes = model.grid_boxes(feats).unsqueeze(0).expand(b, -1, -1)
    size = torch.tensor([image_size] * 4, device=logits.device, dtype=logits.dtype)
    t = loss_fn.preprocess(torch.cat((targets["batch_idx"].view(-1, 1), targets["cls"].view(-1, 1),
                                      targets["bboxes"]), 1), b, scale_tensor=size)
    labels, gt = t.split((1, 4), 2)
    mask = gt.sum(2, keepdim=True).gt_(0.0)
    scores = logits.transpose(1, 2)
    _, _, target_scores, fg, gt_idx = loss_fn.assigner(scores.detach().sigmoid(), boxes.detach(),
                                                       anchors * strides, labels, gt, mask)
    cls = loss_fn.bce(scores, target_scores.to(scores.dtype)).sum() / target_scores.sum().clamp(min=1)
    return (fg, gt_idx), cls * _GAINS["cls"], {"cls_loss": cls.detach()}


def train_kdeov_detection(
    model: KDEOVModel,
    samples: list[DetectionSample],
    text_embeddings: torch.Tensor,
    out: str | Path,
    *,
    options: DetectionTrainOptions = DetectionTrainOptions(),
    extra: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train the detection path; write ``out`` every ``checkpoint_every`` steps and at the end.

    Args:
        model: the student (its text tower is not needed: ``text_embeddings`` is the classifier).
        samples: from :func:`prepare_samples`, all at the model's input size.
        text_embeddings: ``[C, D]`` class embeddings, rows in training-vocabulary order.
        out: checkpoint path.
        extra: recorded in the checkpoint (vocabulary, text tower identity, data).
        resume: a previous checkpoint's ``extra["train"]`` (step and optimiser state) to continue from.

    Returns:
        per-step loss figures.
    """
    if not samples:
        raise UsageError("no training images")
    device = _device(options.device)
    size = int(samples[0].image.shape[-1])
    text = F.normalize(text_embeddings.float(), dim=-1).to(device)
    model.to(device)
    rng = random.Random(options.seed)
    torch.manual_seed(options.seed)
    if options.freeze != "none":
        _cache_features(model, samples, device, heads=options.freeze == "heads")
    if options.init_from_detector and not resume:
        vocabulary = (extra or {}).get("vocabulary")
        if vocabulary:
            init_region_head_from_detector(model, text, vocabulary, samples, regions=options.freeze == "heads")
    strides = model.backbone.strides
    reg_max = getattr(model.backbone, "reg_max", 1)
    loss_fn = _ultralytics_loss(strides, text.shape[0], reg_max, device)
    optimizer = torch.optim.AdamW(_param_groups(model, options), lr=options.lr, weight_decay=options.weight_decay)
    start = 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        start = int(resume["step"])
        if start >= options.steps:
            raise UsageError(f"the checkpoint already ran {start} steps; ask for more than {start} with --steps")
    # Cosine decay to a tenth, so the last steps settle instead of jumping around.
    # A resumed run starts the schedule where it stopped (step k of the scheduler is step start + k).
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda k: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k + start, options.steps) / options.steps)))
    history: list[dict[str, float]] = []
    order: list[int] = []
    bar = tqdm(total=options.steps, initial=start, desc="train detection", unit="step", disable=not progress)
    model.train()
    if options.freeze != "none":
        model.backbone.eval()  # frozen statistics and no dropout in the part that does not train
    try:
        for step in range(start, options.steps):
            if len(order) < options.batch_size:
                order += rng.sample(range(len(samples)), len(samples))
            batch = [samples[i] for i in order[: options.batch_size]]
            del order[: options.batch_size]
            if options.freeze != "none":
                feats = [torch.stack([s.feats[level] for s in batch]).to(device) for level in range(len(strides))]
            else:
                feats = model.backbone(torch.stack([s.image for s in batch]).to(device))
            logits, emb = _head_outputs(model, feats, text, regions=options.freeze == "heads",
                                        embeddings=options.region_distill_weight > 0)
            if options.freeze == "heads":
                raw_boxes = None if batch[0].raw_boxes is None else torch.stack([s.raw_boxes for s in batch]).to(device)
            else:
                raw_boxes = _raw_boxes(model, feats)
            targets = _targets(batch, size, device)
            if raw_boxes is not None:
                assigned, loss, items = loss_fn.get_assigned_targets_and_loss(
                    {"boxes": raw_boxes, "scores": logits, "feats": feats}, targets)
                loss = loss.sum()
                fg, gt_idx = assigned[0], assigned[1]
            else:
                (fg, gt_idx), loss, items = _grid_loss(model, loss_fn, feats, logits, targets, size)
            figures = {k: float(v) for k, v in items.items()}
            if options.region_distill_weight > 0:
                distill = _region_distill_loss(emb, fg, gt_idx, batch)
                loss = loss + options.region_distill_weight * distill
                figures["distill"] = float(distill)
            if not torch.isfinite(loss):
                raise UsageError(f"training diverged at step {step + 1} (loss {float(loss)}); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.region_logit_scale.clamp_(0.0, math.log(max_region_logit_scale(model)))
            figures["loss"] = float(loss.detach())
            history.append(figures)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in figures.items()})
            done = step + 1
            if options.checkpoint_every and done % options.checkpoint_every == 0 and done < options.steps:
                _save(model, out, extra, optimizer, done, options, history)
    finally:
        bar.close()
        model.eval()
    _save(model, out, extra, optimizer, options.steps, options, history)
    return history


@torch.no_grad()
def _cache_features(model: KDEOVModel, samples: list[DetectionSample], device: torch.device, *, heads: bool) -> None:
    """Run the frozen part once per sample: neck features, or (``heads``) region features and box outputs."""
    model.backbone.eval()
    t0 = time.perf_counter()
    what = "region features (frozen heads)" if heads else "backbone features (frozen)"
    for s in tqdm(samples, desc=what, unit="image", leave=False):
        feats = model.backbone(s.image[None].to(device))
        if heads:
            raw = _raw_boxes(model, feats)
            s.raw_boxes = None if raw is None else raw[0].cpu()
            feats = model.region_features(feats)
        s.feats = [f[0].cpu() for f in feats]
    logger.info("cached %s of %d images in %.1f s", what, len(samples), time.perf_counter() - t0)


def _save(model: KDEOVModel, out: str | Path, extra: dict[str, Any] | None, optimizer: torch.optim.Optimizer,
          step: int, options: DetectionTrainOptions, history: list[dict[str, float]]) -> None:
    train = {"step": int(step), "options": dataclasses.asdict(options), "optimizer": optimizer.state_dict(),
             "last_loss": history[-1] if history else None}
    save_kdeov_checkpoint(model, out, extra={**(extra or {}), "train": train})
    logger.info("checkpoint written: %s (step %d)", out, step)


def train_kdeov_on_dataset(
    data: str | Path,
    out: str | Path,
    *,
    preset: str = "yolov8n-vitb32",
    backbone_weights: str | Path | None = None,
    trust_checkpoint: bool = False,
    classes: Sequence[str] | None = None,
    templates: str = "imagenet80",
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    clip_activation: str | None = None,
    image_size: int | None = None,
    split: str = "train",
    options: DetectionTrainOptions = DetectionTrainOptions(),
    resume: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """The one-call path behind ``vlexport train-kdeov --data``: dataset → student → checkpoint.

    ``classes`` restricts training to those names (e.g. the base classes of an open-vocabulary
    split); by default every class of the dataset is trained. ``resume`` continues a checkpoint
    written by this function (its vocabulary, text tower and options are kept).
    """
    from vlexport.data.detection import load_detection_dataset
    from vlexport.models.clip.towers import FrozenCLIPImageEncoder, FrozenCLIPTextEncoder
    from vlexport.models.kdeov.checkpoint import KDEOVCheckpoint
    from vlexport.models.kdeov.config import KDEOV_PRESETS
    from vlexport.models.kdeov.model import build_kdeov
    from vlexport.models.clip.text import TextEmbeddingCache, build_text_embeddings, resolve_templates

    if image_size is not None and (image_size < 32 or image_size % 32):
        raise UsageError(f"--imgsz must be a multiple of 32 and at least 32, got {image_size}")
    dataset = load_detection_dataset(data, split=split)
    state = None
    if resume is not None:
        record = KDEOVCheckpoint.read(resume)  # read once: the training state and the student
        state = record.extra
        if "train" not in state:
            raise CheckpointError(f"{resume} has no training state to resume (it was not written by train-kdeov --data)")
        classes, templates = state["vocabulary"], state["templates"]
        model = build_kdeov(checkpoint=record)
        config = model.config
    else:
        if preset not in KDEOV_PRESETS:
            raise UsageError(f"unknown kdeov preset {preset!r}; choose one of {', '.join(KDEOV_PRESETS)}")
        config = KDEOV_PRESETS[preset]
        overrides = {"clip_model": clip_model, "clip_pretrained": clip_pretrained, "clip_activation": clip_activation,
                     "image_size": image_size}
        config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
        model = build_kdeov(config, backbone_weights=backbone_weights, trust_checkpoint=trust_checkpoint)
        if config.box_source == "grid" and model.backbone.has_box_head:
            raise UsageError("train-kdeov --data trains the YOLO box head: use a preset with --boxes yolo")
    vocabulary = list(classes) if classes is not None else list(dataset.names)
    if not vocabulary:
        raise UsageError("the training vocabulary is empty")
    text_encoder = FrozenCLIPTextEncoder(config.clip_model, config.clip_pretrained, activation=config.clip_activation,
                                         allow_random=True)
    if state is not None:
        check_text_tower(state.get("text_tower"), text_encoder.loaded, resume)
    templates_id, template_list = resolve_templates(templates)
    embeddings = build_text_embeddings(text_encoder, vocabulary, template_list, templates_id,
                                       TextEmbeddingCache()).embeddings
    crop_encoder = None
    if options.region_distill_weight > 0:
        crop_encoder = FrozenCLIPImageEncoder.from_loaded(text_encoder.loaded)
    samples = prepare_samples(dataset, vocabulary, config.image_size, flip=options.flip, crop_encoder=crop_encoder)
    logger.info("training KDEOV detection on %d image(s) (%d with mirrors), %d class(es), %d box(es)",
                len(dataset), len(samples), len(vocabulary), sum(len(s.labels) for s in samples))
    extra = {"vocabulary": vocabulary, "templates": templates, "templates_id": templates_id,
             "text_tower": text_tower_identity(text_encoder.loaded), "data": str(data), "split": split,
             "images": len(dataset)}
    return train_kdeov_detection(model, samples, torch.from_numpy(embeddings), out, options=options, extra=extra,
                                 resume=None if state is None else state["train"], progress=progress)
