"""Training losses of the multi-scale segmenter: per-scale deep supervision and the binary mask loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import UsageError

__all__ = ["ScaleAwareLoss", "binary_segmentation_loss"]


_TARGET_MODES = ("auto", "nearest", "bilinear")


class ScaleAwareLoss(nn.Module):
    """``total = Σ_s w_s · base_loss(pred_s, resize(target, size(pred_s)))``.

    The target is resized to each prediction's spatial size: with ``target_mode="auto"``,
    integer and boolean targets (masks, label maps) use nearest neighbour — values must stay
    labels — and floating-point targets are treated as dense quantities and resized bilinearly
    (``align_corners=False``); ``"nearest"`` or ``"bilinear"`` force one. Nearest uses
    PyTorch's ``"nearest-exact"`` (pixel centres aligned, as OpenCV's ``INTER_NEAREST_EXACT``).
    Targets are ``[B, H, W]`` or ``[B, C, H, W]``; the resized target gets the prediction's dtype
    for float targets and keeps its own dtype for label targets.

    ``forward`` returns ``(total, [term_s, ...])`` with the unweighted per-scale terms.
    """

    def __init__(
        self,
        base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        weights: Sequence[float] = (0.5, 1.0, 0.5),
        target_mode: str = "auto",
    ) -> None:
        super().__init__()
        weights = tuple(float(w) for w in weights)
        if not weights or any(w < 0 for w in weights):
            raise UsageError(f"scale weights must be a non-empty list of values >= 0, got {weights}")
        if target_mode not in _TARGET_MODES:
            raise UsageError(f"unknown target_mode {target_mode!r}; choose one of: {', '.join(_TARGET_MODES)}")
        self.base_loss = base_loss
        self.weights = weights
        self.target_mode = target_mode

    def resize_target(self, target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``target`` at spatial ``size`` (see the class docstring for the interpolation)."""
        if target.ndim not in (3, 4):
            raise UsageError(f"target must be [B, H, W] or [B, C, H, W], got {tuple(target.shape)}")
        if tuple(target.shape[-2:]) == tuple(size):
            return target
        labels = not target.is_floating_point()
        mode = self.target_mode if self.target_mode != "auto" else ("nearest" if labels else "bilinear")
        x = target if target.ndim == 4 else target.unsqueeze(1)
        x = x.float() if labels else x
        if mode == "nearest":
            x = F.interpolate(x, size=size, mode="nearest-exact")
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = x if target.ndim == 4 else x.squeeze(1)
        return x.to(target.dtype) if labels and mode == "nearest" else x

    def forward(
        self, predictions: Sequence[torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(predictions) != len(self.weights):
            raise UsageError(f"ScaleAwareLoss: got {len(predictions)} predictions for {len(self.weights)} weights")
        terms = [
            self.base_loss(p, self.resize_target(target, (int(p.shape[-2]), int(p.shape[-1])))) for p in predictions
        ]
        total = sum(w * t for w, t in zip(self.weights, terms))
        return total, terms

    def extra_repr(self) -> str:
        return f"weights={self.weights}, target_mode={self.target_mode!r}"


def binary_segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0
) -> torch.Tensor:
    """``bce_weight · BCE(logits, t) + dice_weight · (1 − Dice(σ(logits), t))``.

    ``Dice = (2 Σ p·t + smooth) / (Σ p + Σ t + smooth)`` per image, averaged over the batch.
    ``logits`` ``[B, 1, H, W]``; ``target`` ``[B, 1, H, W]`` or ``[B, H, W]`` in [0, 1].
    """
    target = target.to(logits.dtype)
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise UsageError(f"binary_segmentation_loss: target {tuple(target.shape)} vs logits {tuple(logits.shape)}")
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (probs * t).sum(1) + smooth) / (probs.sum(1) + t.sum(1) + smooth)
    return bce_weight * bce + dice_weight * (1.0 - dice.mean())
