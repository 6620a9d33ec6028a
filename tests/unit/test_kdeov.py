"""KDEOV model, building blocks, checkpoints and losses."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.kdeov.checkpoint import CHECKPOINT_FORMAT, load_kdeov_checkpoint, save_kdeov_checkpoint
from vlexport.models.kdeov.config import KDEOV_PRESETS, KDEOVConfig
from vlexport.models.kdeov.heads import CrossModalFusionModule, ProjectionNetwork, SpatialProjection
from vlexport.models.kdeov.model import KDEOVModel, build_kdeov
from vlexport.models.common.losses import (
    CrossModalAlignmentLoss,
    DistillationLoss,
    FeatureAlignmentLoss,
    clip_contrastive_loss,
)

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", "/work/shared/assets"))
STATE_DICT = ASSETS / "weights" / "yolov8n_coco_state_dict.pt"
TINY = KDEOV_PRESETS["tiny"]
CLASSES = ["a photo of a cat", "a photo of a dog", "a photo of a bus"]


@pytest.fixture(scope="module")
def text_encoder():
    from vlexport.models.clip.towers import FrozenCLIPTextEncoder

    return FrozenCLIPTextEncoder(TINY.clip_model, TINY.clip_pretrained)


@pytest.fixture()
def model(text_encoder):
    torch.manual_seed(0)
    return build_kdeov("tiny", text_encoder=text_encoder)


@pytest.fixture()
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 128, 128)


N_TINY = 16 * 16 + 8 * 8 + 4 * 4  # cells at strides 8, 16, 32 of a 128x128 input


# --------------------------------------------------------------------------------------------
# model


def test_forward_keys_and_shapes(model, images):
    out = model(images, texts=CLASSES)
    assert set(out) == {"visual_features", "text_features", "logits", "visual_map", "fused_map", "predictions"}
    assert out["visual_features"].shape == (2, 64)
    assert out["text_features"].shape == (3, 64)
    assert out["logits"].shape == (2, 3)
    assert out["visual_map"].shape == (2, 64, 4, 4)
    assert out["fused_map"].shape == (2, 64, 4, 4)
    assert out["predictions"].shape == (2, N_TINY, 3)
    # The same through precomputed text features.
    again = model(images, text_features=out["text_features"])
    torch.testing.assert_close(again["logits"], out["logits"])
    # Without text only the visual entries are filled.
    bare = model(images)
    assert bare["text_features"] is None and bare["logits"] is None and bare["predictions"] is None
    with pytest.raises(UsageError, match="either text_features or texts"):
        model(images, text_features=out["text_features"], texts=CLASSES)


def test_logit_scale_init(model):
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.logit_scale.requires_grad


def test_embeddings_are_normalised(model, images):
    img = model.encode_image(images)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    txt = model.encode_text(CLASSES)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    tokens = model.text_encoder.tokenize(CLASSES)
    torch.testing.assert_close(model.encode_text(tokens), txt)
    spatial = model.get_spatial_embeddings(images)
    assert [tuple(s.shape) for s in spatial] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]
    for s in spatial:
        torch.testing.assert_close(s.norm(dim=1), torch.ones(s.shape[0], *s.shape[2:]))


def test_zero_shot_classify(model, images):
    probs = model.zero_shot_classify(images, CLASSES)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    text = model.encode_text(CLASSES)
    expected = (model.logit_scale.exp() * model.encode_image(images) @ text.t()).softmax(-1)
    torch.testing.assert_close(model.zero_shot_classify(images, text), expected)


def test_text_errors(images):
    bare = build_kdeov("tiny")
    with pytest.raises(UsageError, match="no text encoder"):
        bare.encode_text(["cat"])
    with pytest.raises(UsageError, match=r"expected \[C, 64\]"):
        bare.zero_shot_classify(images, torch.rand(3, 32))


def test_empty_vocabulary(model, images):
    with pytest.raises(UsageError, match="empty vocabulary"):
        model.open_vocabulary_detect(images, [])


def test_detect_raw_grid(model, images):
    text = model.encode_text(CLASSES)
    boxes, probs = model.detect_raw(images, text)
    assert boxes.shape == (2, N_TINY, 4) and probs.shape == (2, N_TINY, 3)
    assert ((probs > 0) & (probs < 1)).all()
    # Cell (0, 0) of P3: centre (4, 4), side grid_box_scale * 8 = 32; the next cell is 8 px right.
    torch.testing.assert_close(boxes[0, 0], torch.tensor([-12.0, -12.0, 20.0, 20.0]))
    torch.testing.assert_close(boxes[0, 1], torch.tensor([-4.0, -12.0, 28.0, 20.0]))
    # First P4 cell: centre (8, 8), side 64.
    torch.testing.assert_close(boxes[1, 256], torch.tensor([-24.0, -24.0, 40.0, 40.0]))
    # Scores follow the region embeddings, levels in order, row-major: one sigmoid per class.
    spatial = model.get_spatial_embeddings(images)
    emb = torch.cat([s.flatten(2) for s in spatial], 2).transpose(1, 2)
    expected = torch.sigmoid(model.region_logit_scale.exp() * emb @ F.normalize(text, dim=-1).t() + model.region_bias)
    torch.testing.assert_close(probs, expected)
    # A class's score does not depend on the other names, and one class alone is not 1 everywhere.
    with torch.no_grad():
        _, alone = model.detect_raw(images, text[1:2])
    torch.testing.assert_close(alone[..., 0], probs[..., 1])
    assert alone.max() < 1 and alone.min() > 0


def test_detect_raw_yolo_uses_box_head(text_encoder, images):
    pytest.importorskip("ultralytics")
    cfg = dataclasses.replace(TINY, backbone="yolov8n", box_source="yolo")
    m = KDEOVModel(cfg, text_encoder=text_encoder).eval()
    text = m.encode_text(CLASSES)
    with torch.no_grad():
        boxes, probs = m.detect_raw(images, text)
        expected = m.backbone.box_regression(m.backbone(images))
    assert boxes.shape == (2, N_TINY, 4) and probs.shape == (2, N_TINY, 3)
    torch.testing.assert_close(boxes, expected)


def test_yolo_box_source_needs_box_head():
    with pytest.raises(UsageError, match="box_source 'yolo'"):
        KDEOVModel(dataclasses.replace(TINY, box_source="yolo"))


def test_open_vocabulary_detect(model, images):
    model.eval()
    with torch.no_grad():  # a bias that puts random-weight scores around 0.5, so thresholds bite
        model.region_bias.fill_(0.0)
    results = model.open_vocabulary_detect(images, CLASSES, score_threshold=0.34, iou_threshold=0.5)
    assert len(results) == 2
    counts = []
    for r in results:
        boxes, scores, labels = r["boxes"], r["scores"], r["labels"]
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) == len(scores) == len(labels)
        assert (scores >= 0.34).all() and (scores <= 1).all()
        assert ((labels >= 0) & (labels < 3)).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes <= 128).all()
        assert (scores[:-1] >= scores[1:]).all()
        counts.append(len(boxes))
    assert sum(counts) > 0
    stricter = model.open_vocabulary_detect(images, CLASSES, score_threshold=0.9999)
    assert all(len(r["scores"]) <= c for r, c in zip(stricter, counts))
    capped = model.open_vocabulary_detect(images, CLASSES, score_threshold=0.0, max_detections=5)
    assert all(len(r["scores"]) == 5 for r in capped)
    with pytest.raises(UsageError, match="score_threshold"):
        model.open_vocabulary_detect(images, CLASSES, score_threshold=1.5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("box_source", ["grid", "yolo"])
def test_detect_raw_exports_to_onnx_with_dynamic_batch(box_source, text_encoder, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if box_source == "yolo":
        pytest.importorskip("ultralytics")
        cfg = dataclasses.replace(TINY, backbone="yolov8n", box_source="yolo")
    else:
        cfg = TINY
    torch.manual_seed(0)
    model = KDEOVModel(cfg, text_encoder=text_encoder).eval()

    class Detector(torch.nn.Module):
        def __init__(self, m, text):
            super().__init__()
            self.m, self.text = m, text

        def forward(self, x):
            return self.m.detect_raw(x, self.text)

    text = model.encode_text(CLASSES)
    path = tmp_path / "detector.onnx"
    # eval() on the wrapper: export restores the wrapper's mode recursively afterwards.
    torch.onnx.export(
        Detector(model, text).eval(), (torch.rand(1, 3, 128, 128),), str(path), dynamo=False, opset_version=17,
        input_names=["images"], output_names=["boxes", "probs"],
        dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "probs": {0: "batch"}},
    )
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 128, 128)
    boxes, probs = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref_boxes, ref_probs = model.detect_raw(x, text)
    assert boxes.shape == (3, N_TINY, 4) and probs.shape == (3, N_TINY, 3)
    torch.testing.assert_close(torch.from_numpy(boxes), ref_boxes, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(probs), ref_probs, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# building blocks and config


@pytest.mark.parametrize("mode", ["film", "cross_attention"])
@pytest.mark.parametrize("text_shape", [(5, 64), (2, 5, 64)])
def test_fusion_keeps_shape(mode, text_shape):
    fusion = CrossModalFusionModule(64, num_heads=8, mode=mode)
    visual = torch.rand(2, 64, 6, 7)
    out = fusion(visual, torch.rand(*text_shape))
    assert out.shape == visual.shape


def test_film_starts_as_identity_and_bad_mode():
    fusion = CrossModalFusionModule(64, mode="film")
    visual = torch.rand(1, 64, 3, 3)
    torch.testing.assert_close(fusion(visual, torch.rand(4, 64)), visual)
    with pytest.raises(UsageError, match="film, cross_attention"):
        CrossModalFusionModule(64, mode="concat")


def test_projection_blocks():
    proj = ProjectionNetwork(32, 16)
    out = proj(torch.rand(3, 32, 5, 5))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    sp = SpatialProjection(32, 48, groups=32)  # gcd(32, 48) = 16 groups
    assert sp.norm.num_groups == 16
    assert sp(torch.rand(2, 32, 4, 6)).shape == (2, 48, 4, 6)


def test_config_round_trip_and_validation():
    for cfg in KDEOV_PRESETS.values():
        assert KDEOVConfig.from_dict(cfg.to_dict()) == cfg
    assert KDEOV_PRESETS["yolov8n-vitb32"] == KDEOVConfig(box_source="yolo")
    assert TINY.backbone == "simple" and TINY.embed_dim == 64 and TINY.image_size == 128
    with pytest.raises(UsageError, match="unknown KDEOV config key"):
        KDEOVConfig.from_dict({"embed_dim": 64, "colour": "red"})
    with pytest.raises(UsageError, match="fusion"):
        KDEOVConfig(fusion="sum")
    with pytest.raises(UsageError, match="multiple of 32"):
        KDEOVConfig(image_size=100)
    with pytest.raises(UsageError, match="unknown KDEOV preset"):
        build_kdeov("huge")


# --------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(model, images, tmp_path):
    model.eval()
    path = save_kdeov_checkpoint(model, tmp_path / "sub" / "kdeov.pt", extra={"note": "test", "step": 3})
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["extra"] == {"note": "test", "step": 3}
    config, state = load_kdeov_checkpoint(path)
    assert config == TINY
    assert not any(k.startswith("text_encoder.") for k in state) and "logit_scale" in state
    loaded = build_kdeov(checkpoint=path)
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
    # An explicit config must agree with the checkpoint's architecture.
    with pytest.raises(CheckpointError, match="embed_dim=64"):
        build_kdeov(dataclasses.replace(TINY, embed_dim=32), checkpoint=path)
    with pytest.raises(UsageError, match="either a KDEOV checkpoint or backbone weights"):
        build_kdeov("tiny", checkpoint=path, backbone_weights=path)
    with pytest.raises(UsageError, match="only builtins and tensors"):
        save_kdeov_checkpoint(model, tmp_path / "x.pt", extra={"obj": object()})


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_kdeov_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable PyTorch file") as info:
        load_kdeov_checkpoint(corrupt)
    assert "\n" not in str(info.value) and str(corrupt) in str(info.value)
    other = tmp_path / "other.pt"
    torch.save({"format": "something/2", "config": {}, "state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="format 'something/2'"):
        load_kdeov_checkpoint(other)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(CheckpointError, match="not a KDEOV checkpoint"):
        load_kdeov_checkpoint(plain)
    bad_cfg = tmp_path / "bad_cfg.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": {"fusion": "nope"}, "state_dict": {}}, bad_cfg)
    with pytest.raises(CheckpointError, match="invalid config"):
        load_kdeov_checkpoint(bad_cfg)


def test_checkpoint_with_mismatching_state_dict(model, tmp_path):
    path = save_kdeov_checkpoint(model, tmp_path / "k.pt")
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["projection.fc1.weight"] = torch.zeros(1, 1)
    del raw["state_dict"]["logit_scale"]
    torch.save(raw, path)
    with pytest.raises(CheckpointError) as info:
        build_kdeov(checkpoint=path)
    msg = str(info.value)
    assert "missing key(s): logit_scale" in msg and "projection.fc1.weight (checkpoint [1, 1]" in msg


def test_checkpoint_with_fused_coco_backbone(tmp_path):
    pytest.importorskip("ultralytics")
    if not STATE_DICT.is_file():
        pytest.skip(f"shared asset missing (set VLEXPORT_ASSETS): {STATE_DICT}")
    cfg = dataclasses.replace(TINY, backbone="yolov8n", box_source="yolo")
    model = build_kdeov(cfg, backbone_weights=STATE_DICT)
    assert model.backbone.is_fused() and model.backbone.source_names[5] == "bus"
    path = save_kdeov_checkpoint(model, tmp_path / "k.pt")
    loaded = build_kdeov(checkpoint=path)  # a fresh (unfused) backbone is fused to take the weights
    assert loaded.backbone.is_fused() and loaded.backbone.source_names == model.backbone.source_names
    x, text = torch.rand(1, 3, 128, 128), torch.eye(64)[:3]
    with torch.no_grad():
        for ours, theirs in zip(loaded.detect_raw(x, text), model.detect_raw(x, text)):
            torch.testing.assert_close(ours, theirs)


@pytest.mark.slow
def test_real_size_preset_on_coco_backbone():
    pytest.importorskip("ultralytics")
    if not STATE_DICT.is_file():
        pytest.skip(f"shared asset missing (set VLEXPORT_ASSETS): {STATE_DICT}")
    model = build_kdeov("yolov8n-vitb32", backbone_weights=STATE_DICT)
    assert model.config.embed_dim == 512 and model.config.box_source == "yolo"
    x = torch.rand(2, 3, 640, 640)
    text = F.normalize(torch.randn(4, 512), dim=-1)
    with torch.no_grad():
        boxes, probs = model.detect_raw(x, text)
        expected = model.backbone.box_regression(model.backbone(x))
    assert boxes.shape == (2, 8400, 4) and probs.shape == (2, 8400, 4)
    torch.testing.assert_close(boxes, expected)
    results = model.open_vocabulary_detect(x, text, score_threshold=0.3)
    for r in results:
        assert (r["scores"] >= 0.3).all() and len(r["boxes"]) <= 300


# --------------------------------------------------------------------------------------------
# losses


def test_distillation_loss_known_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert DistillationLoss("cosine")(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert DistillationLoss("cosine")(a, -a).item() == pytest.approx(2.0)
    orth = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    assert DistillationLoss("cosine")(a, orth).item() == pytest.approx(1.0)
    # l2: mean over rows of the squared distance: (|1-0|^2 + |0-1|^2 + |0-3|^2 + |2-0|^2) / 2
    assert DistillationLoss("l2")(a, orth).item() == pytest.approx((2 + 13) / 2)
    with pytest.raises(UsageError, match="cosine, l2"):
        DistillationLoss("kl")
    with pytest.raises(UsageError, match="same shape"):
        DistillationLoss()(a, torch.rand(3, 2))


def test_distillation_does_not_train_the_teacher():
    s = torch.rand(4, 8, requires_grad=True)
    t = torch.rand(4, 8, requires_grad=True)
    DistillationLoss()(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_infonce_known_value_symmetry_and_matching():
    eye = torch.eye(3)
    # logits = I: each row's CE = -log(e / (e + 2)), in both directions.
    expected = -math.log(math.e / (math.e + 2))
    assert clip_contrastive_loss(eye, eye, 1.0).item() == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    a, b = torch.randn(6, 16), torch.randn(6, 16)
    assert clip_contrastive_loss(a, b, 10.0).item() == pytest.approx(clip_contrastive_loss(b, a, 10.0).item(), rel=1e-6)
    matched = clip_contrastive_loss(a, a + 0.05 * torch.randn(6, 16), 10.0)
    shuffled = clip_contrastive_loss(a, a.roll(1, 0), 10.0)
    assert matched < shuffled
    assert CrossModalAlignmentLoss()(a, b, 10.0).item() == pytest.approx(clip_contrastive_loss(a, b, 10.0).item())


def test_feature_alignment_loss_is_the_weighted_sum():
    torch.manual_seed(0)
    s, t, txt = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    loss = FeatureAlignmentLoss(distill_weight=2.0, align_weight=0.25)
    total, parts = loss(s, t, txt, 5.0)
    assert parts["distill"].item() == pytest.approx(DistillationLoss()(s, t).item())
    assert parts["align"].item() == pytest.approx(clip_contrastive_loss(s, txt, 5.0).item())
    assert total.item() == pytest.approx(2.0 * parts["distill"].item() + 0.25 * parts["align"].item())
    # Without text the alignment is against the teacher embeddings.
    _, parts = loss(s, t, None, 5.0)
    assert parts["align"].item() == pytest.approx(clip_contrastive_loss(s, t, 5.0).item())
    # Identical student and teacher: no distillation loss left.
    _, parts = loss(t, t, None, 5.0)
    assert parts["distill"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UsageError, match=">= 0"):
        FeatureAlignmentLoss(distill_weight=-1)


def test_config_records_the_backbone_actually_built():
    from vlexport.models.common.backbones import LightweightVisualBackbone

    cfg = dataclasses.replace(TINY, backbone="yolov8n")
    model = KDEOVModel(cfg, backbone=LightweightVisualBackbone("yolov8n", fallback=True))
    assert model.config.backbone == "simple"
