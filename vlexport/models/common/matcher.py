"""Bipartite (Hungarian) matching between predicted and ground-truth boxes, as in DETR.

The cost of assigning prediction ``i`` to target ``j`` is

    C[i, j] = cost_bbox * |b_i - b_j|_1  -  cost_class * p_i(label_j)  -  cost_giou * GIoU(b_i, b_j)

with ``p`` the softmax over all classes (no-object included) and boxes in normalised cxcywh
(GIoU on their xyxy form). Each image is solved exactly with
``scipy.optimize.linear_sum_assignment``; queries left over are "no object".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vlexport.errors import UsageError
from vlexport.models.common.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher"]


def _solve(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal assignment of one ``[Q, n]`` cost matrix: (query indices ascending, target indices)."""
    from scipy.optimize import linear_sum_assignment  # scipy is only needed for training

    if cost.shape[1] == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone()
    rows, cols = linear_sum_assignment(cost.numpy())
    # scipy returns rows sorted ascending; convert to int64 tensors for indexing.
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """One-to-one matching of ``Q`` predictions to each image's targets (no gradient).

    Args:
        cost_class: weight of ``-p(label)``.
        cost_bbox: weight of the L1 distance between cxcywh boxes.
        cost_giou: weight of ``-GIoU``.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise UsageError("HungarianMatcher: at least one of cost_class, cost_bbox, cost_giou must be non-zero")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)

    def cost_matrix(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> torch.Tensor:
        """The full ``[B*Q, sum(n_b)]`` cost matrix (all predictions against all targets)."""
        logits = outputs["pred_logits"]
        boxes = outputs["pred_boxes"]
        prob = logits.flatten(0, 1).float().softmax(-1)  # [B*Q, C+1]
        out_boxes = boxes.flatten(0, 1).float()  # [B*Q, 4]
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device=prob.device, dtype=torch.int64)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device=prob.device, dtype=torch.float32)
        tgt_boxes = tgt_boxes.reshape(-1, 4)
        cost = self.cost_bbox * torch.cdist(out_boxes, tgt_boxes, p=1)
        cost = cost - self.cost_class * prob[:, tgt_labels]
        if self.cost_giou:
            cost = cost - self.cost_giou * generalized_box_iou(
                box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt_boxes)
            )
        return cost

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's predictions to its targets.

        Args:
            outputs: ``pred_logits`` ``[B, Q, C+1]`` and ``pred_boxes`` ``[B, Q, 4]`` (cxcywh in [0, 1]).
            targets: ``B`` dicts with ``labels`` ``LongTensor[n]`` and ``boxes`` ``[n, 4]`` cxcywh normalised.

        Returns:
            ``B`` pairs ``(query_idx, target_idx)`` of int64 CPU tensors of length ``min(Q, n)``,
            query indices ascending; an image without targets gets two empty tensors.
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        if len(targets) != batch:
            raise UsageError(f"HungarianMatcher: got {len(targets)} target dicts for a batch of {batch}")
        sizes = [int(t["boxes"].reshape(-1, 4).shape[0]) for t in targets]
        for b, t in enumerate(targets):
            if int(t["labels"].numel()) != sizes[b]:
                raise UsageError(
                    f"HungarianMatcher: image {b} has {t['labels'].numel()} labels but {sizes[b]} boxes"
                )
        if sum(sizes) == 0:
            return [_solve(torch.empty(num_queries, 0)) for _ in targets]
        cost = self.cost_matrix(outputs, targets).view(batch, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():
            raise ValueError("HungarianMatcher: the cost matrix has NaN/Inf entries (non-finite predictions?)")
        # Image b's block: its own queries against its own targets only.
        return [_solve(block[b]) for b, block in enumerate(cost.split(sizes, dim=-1))]
