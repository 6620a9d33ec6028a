"""Multi-scale input processor, its two fusions, the scale-aware loss, the segmenter and its ONNX export."""

from __future__ import annotations

import io
import math
import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.multiscale.loss import ScaleAwareLoss, binary_segmentation_loss
from vlexport.models.multiscale.model import (
    MULTISCALE_PRESETS,
    AttentionScaleIntegration,
    HierarchicalScaleIntegration,
    MultiScaleInputProcessor,
    SpatialAttention,
    build_multiscale,
    scaled_size,
)

PERSON = 1  # COCO panoptic category id
# Two COCO128 images whose semantic masks contain people (28 % and 43 % of the pixels).
PERSON_IMAGES = ("000000000036", "000000000389")


# -- sizes and shapes ------------------------------------------------------------------------


def test_scale_sizes_are_multiples_of_32():
    assert [scaled_size(320, s) for s in (0.5, 1.0, 1.5)] == [160, 320, 480]
    for size in (100, 1, 33, 47, 641):
        for s in (0.25, 0.5, 1.0, 1.5, 2.0):
            out = scaled_size(size, s)
            assert out >= 32 and out % 32 == 0
            assert abs(out - size * s) <= 16 or out == 32
    processor = MultiScaleInputProcessor("resnet18", scales=(1.5, 0.5, 1.0))
    assert processor.scales == (0.5, 1.0, 1.5) and processor.reference == 1
    assert processor.scale_sizes(100, 100) == [(64, 64), (96, 96), (160, 160)]


@pytest.mark.parametrize("fusion", ["absi", "hierarchical"])
def test_fused_pyramid_has_the_reference_pyramid_shapes(fusion):
    torch.manual_seed(0)
    processor = MultiScaleInputProcessor("resnet18", fusion=fusion).eval()
    images = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        pyramids = processor.scale_pyramids(images)
        fused = processor(images)
    # Level 1 has stride 4 at every scale.
    assert [tuple(p[0].shape[-2:]) for p in pyramids] == [(h // 4, w // 4) for h, w in processor.scale_sizes(96, 160)]
    reference = [tuple(f.shape) for f in pyramids[1]]  # the 1.0x scale (96x160 is already a multiple of 32)
    assert [tuple(f.shape) for f in fused] == reference == [
        (2, 64, 24, 40), (2, 128, 12, 20), (2, 256, 6, 10), (2, 512, 3, 5)
    ]
    assert all(torch.isfinite(f).all() for f in fused)


def test_processor_argument_errors():
    with pytest.raises(UsageError, match="include 1.0"):
        MultiScaleInputProcessor(scales=(0.5, 1.5))
    with pytest.raises(UsageError, match="distinct positive"):
        MultiScaleInputProcessor(scales=(1.0, 1.0))
    with pytest.raises(UsageError, match="unknown fusion"):
        MultiScaleInputProcessor(fusion="sum")
    with pytest.raises(UsageError, match="unknown backbone"):
        MultiScaleInputProcessor("vgg16")
    with pytest.raises(UsageError, match="unknown multiscale preset"):
        build_multiscale("huge")
    with pytest.raises(UsageError, match="unknown multiscale option"):
        build_multiscale("tiny", depth=3)
    assert set(MULTISCALE_PRESETS) == {"tiny", "r50"}


def test_pretrained_backbone_loads_a_torchvision_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    processor = MultiScaleInputProcessor("resnet18", pretrained_backbone=path)
    torch.testing.assert_close(processor.backbone.stem[0].weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(processor.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight,
                               rtol=0, atol=0)
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("layer4.")}, path)
    with pytest.raises(CheckpointError, match="layer4"):
        MultiScaleInputProcessor("resnet18", pretrained_backbone=path)
    with pytest.raises(CheckpointError, match="not found"):
        MultiScaleInputProcessor("resnet18", pretrained_backbone=tmp_path / "missing.pt")


# -- fusion modules ----------------------------------------------------------------------------


def test_absi_weights_sum_to_one_and_attention_matches_a_per_pixel_loop():
    torch.manual_seed(0)
    absi = AttentionScaleIntegration(32, num_scales=3, reference=1, reduction=2, heads=2).double().eval()
    feats = [torch.randn(2, 32, 2, 3, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        weights = absi.importance(feats)
        out = absi(feats)
    assert weights.shape == (2, 3) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, dtype=torch.float64))

    # Independent reference: for every image, pixel and head, softmax attention over the 3 scales.
    d, heads = absi.dim, absi.heads
    dh = d // heads

    def proj(conv, x, b, i, j):  # a 1x1 convolution at one pixel
        return conv.weight[:, :, 0, 0] @ x[b, :, i, j] + conv.bias

    expected = torch.empty_like(out)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                q = [proj(absi.q[s], feats[s], b, i, j) for s in range(3)]
                k = [proj(absi.k[s], feats[s], b, i, j) for s in range(3)]
                v = [proj(absi.v[s], feats[s], b, i, j) for s in range(3)]
                fused = torch.zeros(d, dtype=torch.float64)
                for s in range(3):
                    for h in range(heads):
                        sl = slice(h * dh, (h + 1) * dh)
                        scores = torch.stack([q[s][sl] @ k[t][sl] / math.sqrt(dh) for t in range(3)])
                        attn = scores.softmax(0)
                        fused[sl] += weights[b, s] * sum(attn[t] * v[t][sl] for t in range(3))
                expected[b, :, i, j] = feats[1][b, :, i, j] + absi.out.weight[:, :, 0, 0] @ fused + absi.out.bias
    torch.testing.assert_close(out, expected)


def test_hierarchical_fusion_merges_coarse_to_fine_with_a_residual():
    torch.manual_seed(0)
    block = HierarchicalScaleIntegration(16, num_scales=3, reference=1).eval()
    feats = [torch.randn(1, 16, 5, 5) for _ in range(3)]
    with torch.no_grad():
        out = block(feats)
        expected = feats[1] + block.merges[1](block.merges[0](feats[0], feats[1]), feats[2])
    torch.testing.assert_close(out, expected)

    sa = SpatialAttention(3)
    x = torch.randn(1, 4, 5, 5)
    desc = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True).values], 1)
    manual = x * torch.sigmoid(F.conv2d(desc, sa.conv.weight, sa.conv.bias, padding=1))
    torch.testing.assert_close(sa(x), manual)


# -- losses ------------------------------------------------------------------------------------


def test_scale_aware_loss_equals_the_hand_weighted_sum():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 37, 53))
    preds = [torch.randn(2, 4, h, w) for h, w in ((18, 26), (37, 53), (55, 80))]
    loss = ScaleAwareLoss(F.cross_entropy)
    total, terms = loss(preds, labels)
    expected_terms = []
    for p in preds:
        h, w = p.shape[-2:]
        resized = np.stack([cv2.resize(m.numpy().astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
                            for m in labels])
        expected_terms.append(F.cross_entropy(p, torch.from_numpy(resized).long()))
    for t, e in zip(terms, expected_terms):
        torch.testing.assert_close(t, e)
    torch.testing.assert_close(total, 0.5 * expected_terms[0] + 1.0 * expected_terms[1] + 0.5 * expected_terms[2])

    # A dense float target is resized bilinearly.
    dense = torch.rand(2, 1, 37, 53)
    preds = [torch.randn(2, 1, 18, 26), torch.randn(2, 1, 37, 53), torch.randn(2, 1, 55, 80)]
    total, terms = ScaleAwareLoss(F.mse_loss)(preds, dense)
    expected = 0.0
    for weight, p in zip((0.5, 1.0, 0.5), preds):
        h, w = p.shape[-2:]
        resized = np.stack([cv2.resize(d[0].numpy(), (w, h), interpolation=cv2.INTER_LINEAR) for d in dense])
        expected += weight * F.mse_loss(p, torch.from_numpy(resized)[:, None])
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="2 predictions for 3 weights"):
        ScaleAwareLoss(F.mse_loss)(preds[:2], dense)


def test_binary_segmentation_loss_by_hand():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-3))]
    t = [1, 1, 0, 0]
    bce = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p, t)) / 4
    dice = (2 * sum(pi * ti for pi, ti in zip(p, t)) + 1) / (sum(p) + sum(t) + 1)
    assert binary_segmentation_loss(logits, target).item() == pytest.approx(bce + 1 - dice, rel=1e-6)
    assert binary_segmentation_loss(logits, target, 0.5, 0.0).item() == pytest.approx(0.5 * bce, rel=1e-6)


# -- segmenter ---------------------------------------------------------------------------------


def test_segmenter_outputs_at_input_resolution_and_deep_supervision_trains_every_part():
    torch.manual_seed(0)
    model = build_multiscale("tiny", "hierarchical").train()
    images = torch.rand(2, 3, 100, 130)
    logits, per_scale = model.forward_with_scales(images)
    assert logits.shape == (2, 1, 100, 130)
    assert [tuple(p.shape[-2:]) for p in per_scale] == model.processor.scale_sizes(100, 130)
    target = (torch.rand(2, 1, 100, 130) > 0.5).float()
    aux, _ = ScaleAwareLoss(binary_segmentation_loss)(per_scale, target)
    (binary_segmentation_loss(logits, target) + aux).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    with torch.no_grad():
        assert model.eval()(images).shape == (2, 1, 100, 130)


def _person_batch(assets, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for image_id in PERSON_IMAGES:
        bgr = cv2.imread(str(assets / f"coco128/images/train2017/{image_id}.jpg"), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(assets / f"coco128/masks/train2017/{image_id}.png"), cv2.IMREAD_UNCHANGED)
        assert bgr is not None and mask is not None and (mask == PERSON).any()
        rgb = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)[..., ::-1]
        images.append(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255)
        binary = cv2.resize((mask == PERSON).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        masks.append(torch.from_numpy(binary).float()[None])
    return torch.stack(images), torch.stack(masks)


def _iou(logits: torch.Tensor, mask: torch.Tensor) -> float:
    pred, truth = logits > 0, mask > 0.5
    return ((pred & truth).sum() / (pred | truth).sum()).item()


def test_tiny_segmenter_overfits_two_coco_person_masks(assets):
    images, masks = _person_batch(assets, 192)
    torch.manual_seed(0)
    model = build_multiscale("tiny", "absi")
    with torch.no_grad():
        iou_before = _iou(model.eval()(images), masks)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(25):
        loss = binary_segmentation_loss(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    with torch.no_grad():
        iou_after = _iou(model.eval()(images), masks)
    assert history[-1] < 0.5 * history[0], history
    assert iou_after > 0.7 and iou_after > iou_before + 0.25, (iou_before, iou_after)


def test_hierarchical_segmenter_learns_in_a_few_steps(assets):
    images, masks = _person_batch(assets, 128)
    torch.manual_seed(0)
    model = build_multiscale("tiny", "hierarchical").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(4):
        loss = binary_segmentation_loss(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0], history


# -- ONNX export -------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["absi", "hierarchical"])
def test_onnx_export_is_one_graph_and_matches_pytorch(fusion):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_multiscale("tiny", fusion)
    # A few training-mode passes give the BatchNorm layers non-trivial running statistics.
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.rand(2, 3, 128, 128))
    model.eval()
    images = torch.rand(1, 3, 320, 320)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on the fixed export size
        torch.onnx.export(model, (images,), buf, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["logits"])
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    # One graph holding all three scales: the 0.5x and 1.5x input resizes, the two non-reference
    # scales' resizes at each of the 4 levels, then the decoder's 3 top-down steps and final upsample.
    assert [i.name for i in proto.graph.input] == ["images"]
    assert sum(n.op_type == "Resize" for n in proto.graph.node) == 2 + 2 * 4 + 3 + 1
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch_logits = model(images).numpy()
    assert onnx_logits.shape == (1, 1, 320, 320)
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4
