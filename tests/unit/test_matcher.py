"""Box ops and the Hungarian matcher: hand-solved cases, brute force, edge cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from vlexport.errors import UsageError
from vlexport.models.common.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)
from vlexport.models.common.matcher import HungarianMatcher


def _giou_scalar(a, b):
    """GIoU of two xyxy boxes written out from the definition (independent of box_ops)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclosing - union) / enclosing


# -- box ops ---------------------------------------------------------------------------------


def test_box_conversions_hand_values_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert torch.allclose(box_area(xyxy), torch.tensor([0.2 * 0.6]))


def test_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # Identical boxes: IoU = GIoU = 1.
    assert generalized_box_iou(a, a).item() == pytest.approx(1.0)
    # Disjoint 1x1 boxes one unit apart: IoU 0, union 2, enclosing 3x1 -> -(3 - 2)/3.
    left, right = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert generalized_box_iou(left, right).item() == pytest.approx(-1.0 / 3.0)
    # Overlap 1, union 7, enclosing 9: 1/7 - 2/9 = -5/63.
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert generalized_box_iou(a, b).item() == pytest.approx(-5.0 / 63.0)
    iou, union = box_iou(a, b)
    assert iou.item() == pytest.approx(1.0 / 7.0) and union.item() == pytest.approx(7.0)


def test_giou_pairwise_shape_and_values():
    g = torch.Generator().manual_seed(0)
    boxes1 = box_cxcywh_to_xyxy(torch.rand(5, 4, generator=g) * 0.5 + 0.25)
    boxes2 = box_cxcywh_to_xyxy(torch.rand(3, 4, generator=g) * 0.5 + 0.25)
    giou = generalized_box_iou(boxes1, boxes2)
    assert giou.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            assert giou[i, j].item() == pytest.approx(_giou_scalar(boxes1[i].tolist(), boxes2[j].tolist()), abs=1e-6)


# -- matcher ---------------------------------------------------------------------------------


def _outputs(logits, boxes):
    return {"pred_logits": torch.as_tensor(logits, dtype=torch.float32)[None],
            "pred_boxes": torch.as_tensor(boxes, dtype=torch.float32)[None]}


def test_matcher_box_cost_where_greedy_is_not_optimal():
    # Only cx differs. L1 costs: q0-t0 .09, q0-t1 .20, q1-t0 .01, q1-t1 .10.
    # Greedy takes q1-t0 (.01) then q0-t1 (.20) = .21; the optimum is q0-t0 + q1-t1 = .19.
    boxes = [[0.40, 0.5, 0.2, 0.2], [0.50, 0.5, 0.2, 0.2]]
    targets = [{"labels": torch.tensor([0, 0]), "boxes": torch.tensor([[0.49, 0.5, 0.2, 0.2], [0.60, 0.5, 0.2, 0.2]])}]
    matcher = HungarianMatcher(cost_class=0, cost_bbox=5, cost_giou=0)
    (queries, tgts), = matcher(_outputs(torch.zeros(2, 3), boxes), targets)
    assert queries.tolist() == [0, 1] and tgts.tolist() == [0, 1]


def test_matcher_class_cost_where_greedy_is_not_optimal_and_queries_ascending():
    # 3 classes + no-object; targets have labels (1, 2). Probabilities by query:
    #   q0: p(1)=.50 p(2)=.40   q1: p(1)=.10 p(2)=.10   q2: p(1)=.45 p(2)=.05
    # Greedy: q0->label1 (.50), then q1->label2 (.10) = .60. Optimum: q0->label2 + q2->label1 = .85.
    probs = torch.tensor([[0.05, 0.50, 0.40, 0.05], [0.70, 0.10, 0.10, 0.10], [0.30, 0.45, 0.05, 0.20]])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.full((2, 4), 0.5)}]
    matcher = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0)
    (queries, tgts), = matcher(_outputs(probs.log(), torch.full((3, 4), 0.5)), targets)
    assert queries.tolist() == [0, 2]  # ascending query order
    assert tgts.tolist() == [1, 0]
    assert queries.dtype == torch.int64 and tgts.dtype == torch.int64


@pytest.mark.parametrize("seed", range(4))
def test_matcher_agrees_with_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_classes = 5, 4
    sizes = [3, 4] if seed % 2 else [2, 5]
    logits = torch.randn(2, num_queries, num_classes + 1, generator=g)
    boxes = torch.rand(2, num_queries, 2, generator=g) * 0.5 + 0.25
    boxes = torch.cat([boxes, torch.rand(2, num_queries, 2, generator=g) * 0.3 + 0.1], -1)
    targets = []
    for n in sizes:
        tb = torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.1], -1)
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": tb})
    matcher = HungarianMatcher()
    result = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for b, (queries, tgts) in enumerate(result):
        n = sizes[b]
        prob = logits[b].softmax(-1)

        def cost(q, t):
            pb, tb = boxes[b, q].tolist(), targets[b]["boxes"][t].tolist()
            l1 = sum(abs(x - y) for x, y in zip(pb, tb))
            xyxy = lambda c: [c[0] - c[2] / 2, c[1] - c[3] / 2, c[0] + c[2] / 2, c[1] + c[3] / 2]  # noqa: E731
            return 5 * l1 - prob[q, targets[b]["labels"][t]].item() - 2 * _giou_scalar(xyxy(pb), xyxy(tb))

        best = min(sum(cost(q, t) for t, q in enumerate(perm)) for perm in itertools.permutations(range(num_queries), n))
        got = sum(cost(q, t) for q, t in zip(queries.tolist(), tgts.tolist()))
        assert len(queries) == n and sorted(tgts.tolist()) == list(range(n))
        assert len(set(queries.tolist())) == n and queries.tolist() == sorted(queries.tolist())
        assert got == pytest.approx(best, abs=1e-5)


def test_matcher_empty_targets():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    matcher = HungarianMatcher()
    (q0, t0), (q1, t1) = matcher(outputs, [empty, one])
    assert q0.numel() == 0 and t0.numel() == 0 and q0.dtype == torch.int64
    assert len(q1) == 1 and t1.tolist() == [0]
    for q, t in matcher(outputs, [empty, empty]):
        assert q.numel() == 0 and t.numel() == 0


def test_matcher_rejects_inconsistent_targets():
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4)}
    with pytest.raises(UsageError, match="2 labels but 1 boxes"):
        HungarianMatcher()(outputs, [{"labels": torch.tensor([0, 1]), "boxes": torch.rand(1, 4)}])
    with pytest.raises(UsageError, match="2 target dicts"):
        HungarianMatcher()(outputs, [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}] * 2)
    with pytest.raises(UsageError):
        HungarianMatcher(0, 0, 0)
