"""DETR's set criterion: Hungarian matching, then classification, box and mask losses.

For each decoder output (the last one and, with auxiliary decoding, every earlier one) the
predictions are matched to the targets independently, then:

* ``loss_ce``: cross-entropy over all queries; unmatched queries are targeted at the
  "no object" class (index ``num_classes``) whose weight is ``eos_coef``; weighted mean.
* ``loss_bbox``: L1 between matched cxcywh boxes, summed and divided by the number of targets.
* ``loss_giou``: ``1 - GIoU`` over matched pairs, same normalisation.
* ``loss_mask`` / ``loss_dice`` (``"masks"``, last layer only): sigmoid focal and dice losses
  between the matched predicted masks (bilinearly upsampled) and the target masks.

Auxiliary losses carry the suffix ``_i`` for decoder layer ``i``. :meth:`SetCriterion.total`
turns the dict into the weighted scalar to back-propagate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import UsageError
from vlexport.models.common.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from vlexport.models.common.matcher import HungarianMatcher

__all__ = ["SetCriterion", "detr_weight_dict", "sigmoid_focal_loss", "dice_loss"]

_KNOWN_LOSSES = ("labels", "boxes", "masks")


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) on ``[N, P]`` pixel logits: mean over pixels, sum over masks / num_boxes."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float) -> torch.Tensor:
    """``1 - (2|X∩Y| + 1) / (|X| + |Y| + 1)`` on ``[N, P]`` sigmoid masks, summed / num_boxes."""
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def detr_weight_dict(
    dec_layers: int = 6,
    *,
    aux_loss: bool = True,
    masks: bool = False,
    ce: float = 1.0,
    bbox: float = 5.0,
    giou: float = 2.0,
    mask: float = 1.0,
    dice: float = 1.0,
) -> dict[str, float]:
    """DETR's loss weights (ce 1, bbox 5, giou 2; mask 1, dice 1), with the ``_i`` aux copies."""
    weights = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}
    if masks:
        weights.update(loss_mask=mask, loss_dice=dice)
    if aux_loss:
        base = {k: v for k, v in weights.items() if k in ("loss_ce", "loss_bbox", "loss_giou")}
        for i in range(dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def _pad_masks(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image ``[n_b, H_b, W_b]`` target masks zero-padded to the batch maximum: ``[sum n_b, H, W]``."""
    height = max(int(m.shape[-2]) for m in masks)
    width = max(int(m.shape[-1]) for m in masks)
    padded = [F.pad(m.float(), (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in masks]
    return torch.cat(padded, dim=0)


class SetCriterion(nn.Module):
    """DETR's training loss.

    Args:
        num_classes: object classes, without no-object (logits have ``num_classes + 1`` entries).
        matcher: a :class:`HungarianMatcher` (or anything with the same call signature).
        weight_dict: loss name -> weight, used by :meth:`total` (see :func:`detr_weight_dict`).
        eos_coef: cross-entropy weight of the no-object class.
        losses: any of ``"labels"``, ``"boxes"``, ``"masks"``.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        eos_coef: float = 0.1,
        losses: Sequence[str] = ("labels", "boxes"),
    ) -> None:
        super().__init__()
        unknown = [name for name in losses if name not in _KNOWN_LOSSES]
        if unknown:
            raise UsageError(f"SetCriterion: unknown loss(es) {unknown}; choose from {list(_KNOWN_LOSSES)}")
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = float(eos_coef)
        self.losses = tuple(losses)
        class_weight = torch.ones(self.num_classes + 1)
        class_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", class_weight, persistent=False)

    # -- individual losses -------------------------------------------------------------------

    def loss_labels(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """Weighted cross-entropy over every query (unmatched -> no-object)."""
        logits = outputs["pred_logits"]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        batch_idx, query_idx = self._prediction_index(indices)
        matched = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(logits.device)
        target_classes[batch_idx, query_idx] = matched.long()
        loss = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight.to(logits.device))
        return {"loss_ce": loss}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """L1 and 1 - GIoU between matched cxcywh boxes, each summed and divided by ``num_boxes``."""
        batch_idx, query_idx = self._prediction_index(indices)
        src = outputs["pred_boxes"][batch_idx, query_idx].float()
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def loss_masks(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """Focal and dice losses between matched predicted masks and the (padded) target masks."""
        if "pred_masks" not in outputs:
            raise UsageError("SetCriterion: the 'masks' loss needs 'pred_masks' (use the segmentation model)")
        if any("masks" not in t for t in targets):
            raise UsageError("SetCriterion: the 'masks' loss needs a 'masks' entry in every target")
        batch_idx, query_idx = self._prediction_index(indices)
        pred = outputs["pred_masks"][batch_idx, query_idx]  # [N, h, w]
        # Target masks of all images padded to one size, indexed by image offset + target index.
        target_masks = _pad_masks([t["masks"] for t in targets]).to(pred.device)
        offsets = torch.tensor([0] + [int(t["masks"].shape[0]) for t in targets[:-1]]).cumsum(0)
        tgt_idx = torch.cat([offsets[b] + tgt for b, (_, tgt) in enumerate(indices)]).to(pred.device)
        target = target_masks[tgt_idx]
        pred = F.interpolate(pred[:, None].float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        pred = pred[:, 0].flatten(1)
        target = target.flatten(1)
        return {
            "loss_mask": sigmoid_focal_loss(pred, target, num_boxes),
            "loss_dice": dice_loss(pred, target, num_boxes),
        }

    # -- driver ------------------------------------------------------------------------------

    @staticmethod
    def _prediction_index(indices) -> tuple[torch.Tensor, torch.Tensor]:
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx, query_idx

    def _get_loss(self, name: str, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        fn = {"labels": self.loss_labels, "boxes": self.loss_boxes, "masks": self.loss_masks}[name]
        return fn(outputs, targets, indices, num_boxes)

    @staticmethod
    def num_boxes(targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device | None = None) -> float:
        """Targets in the batch (averaged over processes when distributed), at least 1."""
        count = torch.tensor(float(sum(int(t["labels"].numel()) for t in targets)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            count = count / torch.distributed.get_world_size()
        return max(float(count.item()), 1.0)

    def forward(
        self, outputs: Mapping[str, object], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """All losses of the last decoder layer and (if present) of each ``aux_outputs`` entry.

        ``targets``: per image ``labels`` ``[n]`` (0..num_classes-1), ``boxes`` ``[n, 4]`` normalised
        cxcywh, and ``masks`` ``[n, H, W]`` for the mask losses.
        """
        for b, t in enumerate(targets):
            labels = t["labels"]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise UsageError(
                    f"SetCriterion: image {b} has labels outside 0..{self.num_classes - 1}: {labels.tolist()}"
                )
        device = outputs["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        last = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(last, targets)
        losses: dict[str, torch.Tensor] = {}
        for name in self.losses:
            losses.update(self._get_loss(name, last, targets, indices, num_boxes))
        for i, aux in enumerate(outputs.get("aux_outputs", ()) or ()):
            aux_indices = self.matcher(aux, targets)
            for name in self.losses:
                if name == "masks":
                    continue  # intermediate masks are not computed (too costly), as in DETR
                for key, value in self._get_loss(name, aux, targets, aux_indices, num_boxes).items():
                    losses[f"{key}_{i}"] = value
        return losses

    def total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the losses that have a weight in ``weight_dict``."""
        terms = [losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict]
        if not terms:
            raise UsageError(f"SetCriterion.total: no loss in {sorted(losses)} has a weight in weight_dict")
        return torch.stack(terms).sum()
