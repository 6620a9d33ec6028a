"""A tiny DETR really learns: it overfits two COCO128 images; the mask head trains end to end."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from vlexport.errors import UsageError
from vlexport.models.detr.model import build_detr
from vlexport.models.detr.loss import SetCriterion, detr_weight_dict
from vlexport.models.common.matcher import HungarianMatcher
from vlexport.runtime.detr_preprocess import detr_pad_batch, detr_preprocess

# Two images with two objects each (giraffes; a vase and a plant), different aspect ratios, so
# the batch is padded and the padding mask is exercised.
_STEMS = ("000000000025", "000000000030")


def _batch(assets, size=256):
    images, targets = [], []
    for stem in _STEMS:
        frame = cv2.imread(str(assets / "coco128/images/train2017" / f"{stem}.jpg"))
        assert frame is not None, stem
        tensor, _ = detr_preprocess(frame, size=size, max_size=400)
        images.append(tensor)
        # YOLO labels: class cx cy w h, normalised to the image, i.e. DETR's target format;
        # YOLO class ids 0..79 are already contiguous labels.
        rows = np.loadtxt(assets / "coco128/labels/train2017" / f"{stem}.txt", ndmin=2)
        targets.append({"labels": torch.as_tensor(rows[:, 0], dtype=torch.int64),
                        "boxes": torch.as_tensor(rows[:, 1:], dtype=torch.float32)})
    batch, mask = detr_pad_batch(images)
    return torch.from_numpy(batch), torch.from_numpy(mask), targets


def test_tiny_detr_overfits_two_images(assets):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, mask, targets = _batch(assets)
    assert mask.any()  # the two images differ in size
    model = build_detr("tiny", num_classes=80, dropout=0.0).train()
    criterion = SetCriterion(80, HungarianMatcher(), detr_weight_dict(model.config.dec_layers))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(40):
        losses = criterion(model(images, mask), targets)
        total = criterion.total(losses)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        history.append((total.item(), losses["loss_bbox"].item()))
    (first_total, first_l1), (last_total, last_l1) = history[0], history[-1]
    assert last_total < 0.5 * first_total, history
    assert last_l1 < first_l1, history


def test_segmentation_variant_trains_with_mask_losses(assets):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, mask, targets = _batch(assets, size=128)
    height, width = images.shape[-2:]
    for b, target in enumerate(targets):
        # Box-shaped instance masks at each image's (unpadded) resolution.
        h, w = int((~mask[b]).any(1).sum()), int((~mask[b]).any(0).sum())
        masks = torch.zeros(len(target["boxes"]), h, w)
        for i, (cx, cy, bw, bh) in enumerate(target["boxes"].tolist()):
            masks[i, int((cy - bh / 2) * h):int((cy + bh / 2) * h), int((cx - bw / 2) * w):int((cx + bw / 2) * w)] = 1
        target["masks"] = masks
    model = build_detr("tiny-segm", num_classes=80).train()
    out = model(images, mask)
    assert out["pred_masks"].shape == (2, 10, height // 4, width // 4)
    criterion = SetCriterion(80, HungarianMatcher(), detr_weight_dict(2, masks=True),
                             losses=("labels", "boxes", "masks"))
    losses = criterion(out, targets)
    assert {"loss_mask", "loss_dice", "loss_ce_0"} <= set(losses) and "loss_mask_0" not in losses
    assert all(torch.isfinite(v) for v in losses.values())
    criterion.total(losses).backward()
    grad = model.mask_head.out_lay.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(UsageError, match="pred_masks"):
        SetCriterion(80, HungarianMatcher(), {}, losses=("labels", "masks"))(
            {k: v for k, v in out.items() if k != "pred_masks"}, targets)
