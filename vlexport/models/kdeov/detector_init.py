"""Closed-form initialisation of KDEOV's region-text head from the source detector's classifier.

See :func:`init_region_head_from_detector`; the bound on the region logit scale it sets
(:func:`max_region_logit_scale`) also clamps the scale while training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlexport.models.kdeov.detection_data import DetectionSample
from vlexport.models.kdeov.model import KDEOVModel

__all__ = ["REGION_MAX_LOGIT_SCALE", "max_region_logit_scale", "init_region_head_from_detector"]

logger = logging.getLogger(__name__)

#: Largest region logit scale: the detector-initialised head needs ~1e3 (its cosines are compressed,
#: by the norm floor: the bound grows with it).
REGION_MAX_LOGIT_SCALE = 2000.0
# Detector-classifier initialisation: the norm floor (relative to the largest projected norm seen,
# and at least the absolute value), and the logit it centres on.
_INIT_NORM_FLOOR = 1000.0
_INIT_FLOOR_MARGIN = 10.0
# ... and the size of the GroupNorm-steadying pattern, relative to the projected features' spread:
# large enough that every image's spread is the pattern's (within 1/(2*30^2)), small enough that
# GroupNorm taking it out again stays exact in float32 (PyTorch's eager path, the parity reference).
_INIT_STABILISER = 30.0
_INIT_LOGIT_OFFSET = -8.0


def max_region_logit_scale(model: KDEOVModel) -> float:
    """The bound on ``exp(region_logit_scale)``: cosines under a norm floor ν are ~1/ν, so it scales with ν."""
    return max(REGION_MAX_LOGIT_SCALE, 2.0 * float(model.region_norm_floor))


@torch.no_grad()
def init_region_head_from_detector(
    model: KDEOVModel,
    text: torch.Tensor,
    vocabulary: Sequence[str],
    samples: Sequence[DetectionSample],
    *,
    regions: bool,
    max_samples: int = 32,
) -> list[str]:
    """Distil the source detector's closed-set classifier into the region-text head, in closed form.

    For the training classes the detector knows (by name), its final 1x1 classifier ``z = W f + c``
    is mapped into the text space with the pseudo-inverse of their text embeddings ``T``: the
    projection becomes ``e = T⁺ (W f + c - m)`` (so ``T e = z - m`` exactly), and the norm
    floor ``ν`` of :meth:`KDEOVModel.scoring_embeddings` is set far above ``|e|``, so that
    ``t·e / sqrt(|e|² + ν²)`` is an affine function of the detector's logit. (A constant direction
    added to ``e`` would steady the norm as well, but every text not orthogonal to it, as unseen
    class names are, would then score at every location.) Its GroupNorm is steadied by a large
    zero-mean pattern in the conv bias (so it divides every image by the same spread) and starts by
    undoing the statistics measured on the training images, pattern included; the logit
    scale and bias are a weighted least-squares fit of the detector's logits on the resulting
    cosines. Classes the detector does not know (the novel classes of an open-vocabulary split)
    get nothing from it: train those with region distillation and pretrained CLIP. Returns the
    classes used.
    """
    backbone = model.backbone
    names = backbone.source_names or []
    if not backbone.has_box_head or not names:
        return []
    known = [(i, names.index(v)) for i, v in enumerate(vocabulary) if v in names]
    if not known:
        return []
    voc_idx = torch.tensor([k for k, _ in known])
    src_idx = torch.tensor([s for _, s in known])
    device = text.device
    t = F.normalize(text[voc_idx].double(), dim=-1)
    t_pinv = torch.linalg.pinv(t)  # [D, K]
    subset = list(samples[:max_samples])
    logits, projected = [], []
    for level, proj in enumerate(model.spatial_projections):
        classifier = backbone.detect.cv3[level][-1]
        w = classifier.weight[src_idx, :, 0, 0].double()
        c = classifier.bias[src_idx].double() - _INIT_LOGIT_OFFSET
        proj.conv.weight.copy_((t_pinv @ w).to(proj.conv.weight)[:, :, None, None])
        proj.conv.bias.copy_((t_pinv @ c).to(proj.conv.bias))
        feats = _level_regions(model, subset, level, regions, device)  # [S, C3, H, W]
        groups, dim = proj.norm.num_groups, proj.conv.out_channels
        # GroupNorm divides by each image's own spread, which would rescale the detector's logits
        # image by image. A large per-channel pattern (zero mean in every group) added to the conv
        # bias dominates that spread, so the division is the same for every image; GroupNorm's
        # bias takes the pattern out again, so the embedding carries no constant direction.
        spread = float(proj.conv(feats).std())
        pattern = torch.randn(groups, dim // groups, generator=torch.Generator().manual_seed(level), dtype=torch.float64)
        pattern = pattern - pattern.mean(1, keepdim=True)
        pattern = (pattern / pattern.pow(2).mean(1, keepdim=True).sqrt()).flatten() * _INIT_STABILISER * spread
        proj.conv.bias.add_(pattern.to(proj.conv.bias))
        y = proj.conv(feats)
        g = y.reshape(y.shape[0], groups, -1)
        mean = g.mean(-1).mean(0)  # per group, averaged over images
        std = (g.var(-1, unbiased=False) + proj.norm.eps).sqrt().mean(0)
        proj.norm.weight.copy_(std.repeat_interleave(dim // groups))
        proj.norm.bias.copy_(mean.repeat_interleave(dim // groups) - pattern.to(proj.norm.bias))
        projected.append(proj(feats).flatten(2))  # [S, D, HW]
        logits.append(classifier(feats)[:, src_idx].flatten())
    largest = float(max(p.norm(dim=1).max() for p in projected))
    floor = max(_INIT_NORM_FLOOR, _INIT_FLOOR_MARGIN * largest)
    model.region_norm_floor.fill_(floor)
    unit_text = F.normalize(text[voc_idx], dim=-1)
    cos = torch.cat([torch.einsum("kd,sdn->skn", unit_text, model.scoring_embeddings(p)).flatten()
                     for p in projected]).double()
    z = torch.cat(logits).double()
    weight = torch.sigmoid(z) + 0.01  # the positives decide the ranking: weigh them in
    a = torch.stack([cos, torch.ones_like(cos)], 1) * weight.sqrt()[:, None]
    scale, bias = torch.linalg.lstsq(a, z * weight.sqrt()).solution.tolist()
    scale = min(max(scale, 1.0), max_region_logit_scale(model))
    model.region_logit_scale.fill_(math.log(scale))
    model.region_bias.fill_(bias)
    used = [vocabulary[k] for k, _ in known]
    logger.info("region head initialised from the detector's classifier on %d class(es): scale %.1f, bias %.2f, "
                "norm floor %.1f (largest projected norm %.1f)", len(used), scale, bias, floor, largest)
    return used


def _level_regions(model: KDEOVModel, samples: Sequence[DetectionSample], level: int, regions: bool,
                   device: torch.device) -> torch.Tensor:
    """Region features of one level for a few samples (cached when the heads are frozen)."""
    if regions:
        return torch.stack([s.feats[level] for s in samples]).to(device)
    out = []
    for s in samples:
        feats = [f[None].to(device) for f in s.feats] if s.feats is not None else model.backbone(s.image[None].to(device))
        out.append(model.region_features(feats)[level][0])
    return torch.stack(out)
