"""Training losses for feature-alignment distillation (KDEOV and other CLIP-aligned students).

Notation: ``s_i`` student embeddings, ``t_i`` teacher embeddings, ``x̂ = x / ||x||_2``,
``τ`` the logit scale (the multiplier ``exp(log_scale)``, as in open_clip, not its log).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import UsageError

__all__ = [
    "clip_contrastive_loss",
    "DistillationLoss",
    "CrossModalAlignmentLoss",
    "FeatureAlignmentLoss",
]


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise UsageError(
            f"{what}: expected two [N, D] tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def clip_contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss between paired rows of ``a`` and ``b``.

    ``L_ij = τ · â_i · b̂_j``;  ``loss = ½ [CE(L, diag) + CE(Lᵀ, diag)]``, where ``CE(L, diag)``
    is the mean over rows ``i`` of ``-log softmax_j(L_ij)`` at ``j = i``. Row ``i`` of ``a`` is
    the positive of row ``i`` of ``b``; every other row in the batch is a negative.

    Args:
        a, b: ``[N, D]`` features (normalised here).
        logit_scale: the multiplier ``τ`` (e.g. ``model.logit_scale.exp()``).
    """
    _check_pair(a, b, "clip_contrastive_loss")
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class DistillationLoss(nn.Module):
    """Feature distillation from a frozen teacher; the teacher side gets no gradient.

    * ``"cosine"``: ``mean_i (1 - ŝ_i · t̂_i)`` — 0 for parallel features, 2 for opposite ones.
    * ``"l2"``: ``mean_i ||s_i - t_i||²`` on the features as given (for L2-normalised inputs
      this is ``2 · cosine``).
    """

    modes = ("cosine", "l2")

    def __init__(self, mode: str = "cosine") -> None:
        super().__init__()
        if mode not in self.modes:
            raise UsageError(f"unknown distillation mode {mode!r}; choose one of: {', '.join(self.modes)}")
        self.mode = mode

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        _check_pair(student, teacher, "DistillationLoss")
        teacher = teacher.detach()
        if self.mode == "cosine":
            return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        return (student - teacher).pow(2).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class CrossModalAlignmentLoss(nn.Module):
    """Symmetric InfoNCE between paired image and text features (see :func:`clip_contrastive_loss`)."""

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        return clip_contrastive_loss(image_features, text_features, logit_scale)


class FeatureAlignmentLoss(nn.Module):
    """Distillation plus contrastive alignment, weighted:

    ``total = distill_weight · D(s, t) + align_weight · A``

    where ``D`` is :class:`DistillationLoss` and ``A`` is the symmetric InfoNCE of the student
    embeddings against the batch's paired text features when given, otherwise against the
    teacher embeddings (each student embedding must pick out its own image's teacher embedding
    among the batch — relational distillation). With a batch of one image ``A`` is 0.

    ``forward`` returns ``(total, {"distill": ..., "align": ..., "total": ...})`` with the parts
    detached, for logging.
    """

    def __init__(self, distill_weight: float = 1.0, align_weight: float = 0.5, mode: str = "cosine") -> None:
        super().__init__()
        if distill_weight < 0 or align_weight < 0:
            raise UsageError(f"loss weights must be >= 0, got distill={distill_weight}, align={align_weight}")
        self.distill_weight = float(distill_weight)
        self.align_weight = float(align_weight)
        self.distill = DistillationLoss(mode)
        self.align = CrossModalAlignmentLoss()

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        text_features: torch.Tensor | None = None,
        logit_scale: torch.Tensor | float = 1.0 / 0.07,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        distill = self.distill(student, teacher)
        partner = teacher.detach() if text_features is None else text_features
        align = self.align(student, partner, logit_scale)
        total = self.distill_weight * distill + self.align_weight * align
        return total, {"distill": distill.detach(), "align": align.detach(), "total": total.detach()}

    def extra_repr(self) -> str:
        return f"distill_weight={self.distill_weight}, align_weight={self.align_weight}"
