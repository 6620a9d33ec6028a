"""DETR: official key layout, position encoding, transformer order, checkpoints, losses, ONNX."""

from __future__ import annotations

import argparse
import datetime
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.detr.model import (
    DETRConfig,
    FrozenBatchNorm2d,
    PositionEmbeddingSine,
    build_detr,
    detr_postprocess,
)
from vlexport.models.detr.transformer import MultiheadAttention
from vlexport.models.detr.checkpoint import (
    detr_config_from_state_dict,
    detr_state_dict_summary,
    load_detr_checkpoint,
)
from vlexport.models.detr.loss import SetCriterion, detr_weight_dict, dice_loss, sigmoid_focal_loss
from vlexport.models.common.matcher import HungarianMatcher
from vlexport.runtime.detr_preprocess import IMAGENET_MEAN, IMAGENET_STD, detr_preprocess, detr_resize_size

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def r50_state():
    torch.manual_seed(0)
    model = build_detr("r50")
    return model.state_dict(), detr_state_dict_summary(model)


def _tiny(preset="tiny", **overrides):
    torch.manual_seed(0)
    return build_detr(preset, **overrides).eval()


# -- key layout ------------------------------------------------------------------------------


def test_r50_state_dict_matches_the_official_layout(r50_state):
    state, summary = r50_state
    assert summary["entries"] == len(state) == 458
    assert summary["parameters"] == 41_524_768  # FrozenBN statistics are buffers, not counted
    expected = {
        "transformer.encoder.layers.0.self_attn.in_proj_weight": (768, 256),
        "transformer.encoder.layers.5.self_attn.in_proj_bias": (768,),
        "transformer.encoder.layers.3.self_attn.out_proj.weight": (256, 256),
        "transformer.encoder.layers.2.linear1.weight": (2048, 256),
        "transformer.encoder.layers.2.linear2.weight": (256, 2048),
        "transformer.encoder.layers.4.norm2.bias": (256,),
        "transformer.decoder.layers.5.multihead_attn.in_proj_weight": (768, 256),
        "transformer.decoder.layers.0.multihead_attn.out_proj.bias": (256,),
        "transformer.decoder.layers.1.norm3.weight": (256,),
        "transformer.decoder.norm.weight": (256,),
        "class_embed.weight": (92, 256),
        "class_embed.bias": (92,),
        "bbox_embed.layers.0.weight": (256, 256),
        "bbox_embed.layers.2.weight": (4, 256),
        "query_embed.weight": (100, 256),
        "input_proj.weight": (256, 2048, 1, 1),
        "backbone.0.body.conv1.weight": (64, 3, 7, 7),
        "backbone.0.body.bn1.running_var": (64,),
        "backbone.0.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.0.body.layer2.0.conv2.weight": (128, 128, 3, 3),
        "backbone.0.body.layer4.2.bn3.running_mean": (2048,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    keys = list(state)
    assert keys[0].startswith("transformer.encoder.layers.0.") and keys[-1].startswith("backbone.0.body.")
    assert "transformer.encoder.norm.weight" not in state  # post-norm: no final encoder LayerNorm
    assert not any(k.endswith("num_batches_tracked") or ".fc." in k or k.startswith("backbone.1") for k in keys)


def test_r50_panoptic_has_the_detr_prefix(r50_state):
    torch.manual_seed(0)
    segm = build_detr("r50-panoptic")
    state = segm.state_dict()
    assert len(state) == 490
    det_keys = set(r50_state[0])
    assert {k[len("detr."):] for k in state if k.startswith("detr.")} == det_keys
    assert tuple(state["detr.class_embed.weight"].shape) == (251, 256)
    assert tuple(state["bbox_attention.q_linear.weight"].shape) == (256, 256)
    assert tuple(state["mask_head.lay1.weight"].shape) == (264, 264, 3, 3)
    assert tuple(state["mask_head.adapter1.weight"].shape) == (128, 1024, 1, 1)
    assert tuple(state["mask_head.adapter3.weight"].shape) == (32, 256, 1, 1)
    assert tuple(state["mask_head.out_lay.weight"].shape) == (1, 16, 3, 3)
    config, _, assumed, _ = detr_config_from_state_dict(state)
    assert config == DETRConfig(num_classes=250, masks=True) and "nheads" in assumed


def test_config_inferred_from_r50_weights(r50_state):
    config, from_args, assumed, warnings = detr_config_from_state_dict(r50_state[0])
    assert config == DETRConfig()
    assert from_args == () and set(assumed) == {"nheads", "dilation", "dropout", "aux_loss"} and warnings == ()
    args = {"nheads": 8, "dilation": True, "backbone": "resnet101"}
    config, from_args, _, warnings = detr_config_from_state_dict(r50_state[0], args)
    assert config.dilation and config.backbone == "resnet50" and "dilation" in from_args
    assert any("backbone" in w for w in warnings)  # the weights win, the conflict is reported


def test_pre_norm_adds_the_encoder_norm():
    state = _tiny(pre_norm=True).state_dict()
    assert "transformer.encoder.norm.weight" in state
    assert detr_config_from_state_dict(state, {"nheads": 4})[0].pre_norm


def test_build_errors():
    with pytest.raises(UsageError, match="unknown DETR preset"):
        build_detr("r77")
    with pytest.raises(UsageError, match="dilation"):
        build_detr("tiny", dilation=True)
    with pytest.raises(UsageError, match="unknown DETR option"):
        build_detr("tiny", hidden=3)
    with pytest.raises(UsageError, match="divisible"):
        build_detr("tiny", nheads=3)


# -- building blocks -------------------------------------------------------------------------


def test_position_encoding_hand_values():
    pe = PositionEmbeddingSine(num_pos_feats=4)  # dim_t = [1, 1, 100, 100]
    out = pe(torch.zeros(1, 8, 2, 3))
    assert out.shape == (1, 8, 2, 3)
    for i in range(2):
        for j in range(3):
            y = (i + 1) / (2 + 1e-6) * 2 * math.pi
            x = (j + 1) / (3 + 1e-6) * 2 * math.pi
            want = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                    math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
            assert out[0, :, i, j].tolist() == pytest.approx(want, abs=1e-6)
    # Default 128 features: odd channel 37 of the y half is cos(y / 10000 ** (36 / 128)).
    big = PositionEmbeddingSine()(torch.zeros(1, 1, 4, 5))
    y = 3 / (4 + 1e-6) * 2 * math.pi
    assert big[0, 37, 2, 1].item() == pytest.approx(math.cos(y / 10000 ** (36 / 128)), abs=1e-6)
    x = 5 / (5 + 1e-6) * 2 * math.pi
    assert big[0, 128 + 36, 0, 4].item() == pytest.approx(math.sin(x / 10000 ** (36 / 128)), abs=1e-6)


def test_position_encoding_with_padding():
    mask = torch.tensor([[[False, False, True], [False, False, True]]])  # last column padded
    out = PositionEmbeddingSine(num_pos_feats=4)(torch.zeros(1, 8, 2, 3), mask)
    two_pi = 2 * math.pi
    # x counts valid cells along the row: 1, 2, 2 normalised by 2; the padded column's y stays 0.
    assert out[0, 4, 0, :].tolist() == pytest.approx([math.sin(0.5 * two_pi / (1 + 5e-7)), math.sin(two_pi / (1 + 5e-7)),
                                                      math.sin(two_pi / (1 + 5e-7))], abs=1e-5)
    assert out[0, 0, :, 2].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    assert out[0, 1, :, 2].tolist() == pytest.approx([1.0, 1.0], abs=1e-7)
    assert torch.allclose(PositionEmbeddingSine()(torch.zeros(2, 1, 3, 4), torch.zeros(2, 3, 4, dtype=torch.bool)),
                          PositionEmbeddingSine()(torch.zeros(2, 1, 3, 4)))


def test_frozen_batch_norm_matches_torchvision_and_drops_num_batches_tracked():
    from torchvision.ops import FrozenBatchNorm2d as TVFrozen

    g = torch.Generator().manual_seed(0)
    stats = {"weight": torch.rand(6, generator=g) + 0.5, "bias": torch.randn(6, generator=g),
             "running_mean": torch.randn(6, generator=g), "running_var": torch.rand(6, generator=g) + 0.1}
    ours, theirs = FrozenBatchNorm2d(6), TVFrozen(6, eps=1e-5)
    ours.load_state_dict({**stats, "num_batches_tracked": torch.tensor(7)})
    theirs.load_state_dict(stats)
    x = torch.randn(2, 6, 5, 5, generator=g)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    assert torch.allclose(ours(x)[:, 2], (x[:, 2] - stats["running_mean"][2]) / torch.sqrt(stats["running_var"][2] + 1e-5)
                          * stats["weight"][2] + stats["bias"][2], atol=1e-5)
    assert set(ours.state_dict()) == set(stats) and not list(ours.parameters())


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiheadAttention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4).eval()
    ref.load_state_dict(ours.state_dict())
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    want = ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), key_padding_mask=pad)[0].transpose(0, 1)
    assert torch.allclose(ours(q, k, v, pad), want, atol=1e-5)
    want = ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))[0].transpose(0, 1)
    assert torch.allclose(ours(q, k, v), want, atol=1e-5)


def _torch_mha(attn: MultiheadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(attn.embed_dim, attn.num_heads).eval()
    ref.load_state_dict(attn.state_dict())
    return ref


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_layer_order(pre_norm):
    model = _tiny(pre_norm=pre_norm)
    layer = model.transformer.encoder.layers[0]
    src, pos = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    mha = _torch_mha(layer.self_attn)
    ffn = lambda t: layer.linear2(F.relu(layer.linear1(t)))  # noqa: E731
    attn = lambda q, v: mha(q.transpose(0, 1), q.transpose(0, 1), v.transpose(0, 1))[0].transpose(0, 1)  # noqa: E731
    if pre_norm:
        x = layer.norm1(src)
        s = src + attn(x + pos, x)
        want = s + ffn(layer.norm2(s))
    else:
        s = layer.norm1(src + attn(src + pos, src))  # positions on q and k only
        want = layer.norm2(s + ffn(s))
    assert torch.allclose(layer(src, pos, None), want, atol=1e-5)


def test_decoder_layer_order_and_intermediate_norm():
    model = _tiny(dec_layers=3)
    decoder = model.transformer.decoder
    memory, pos = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    query_pos = torch.randn(2, 10, 64)
    layer = decoder.layers[0]
    sa, ca = _torch_mha(layer.self_attn), _torch_mha(layer.multihead_attn)
    sq = lambda t: t.transpose(0, 1)  # noqa: E731
    tgt = torch.zeros(2, 10, 64)
    t = layer.norm1(tgt + sq(sa(sq(tgt + query_pos), sq(tgt + query_pos), sq(tgt))[0]))
    t = layer.norm2(t + sq(ca(sq(t + query_pos), sq(memory + pos), sq(memory))[0]))
    t = layer.norm3(t + layer.linear2(F.relu(layer.linear1(t))))
    assert torch.allclose(layer(tgt, memory, pos, query_pos, None), t, atol=1e-5)
    # The stack holds norm(output) of each layer; each layer consumes the un-normalised output.
    hs = decoder(tgt, memory, pos, query_pos, None)
    out = tgt
    for i, lay in enumerate(decoder.layers):
        out = lay(out, memory, pos, query_pos, None)
        assert torch.allclose(hs[i], decoder.norm(out), atol=1e-6)
    assert len(hs) == 3


def test_backbone_weights_match_torchvision_resnet(tmp_path):
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    for m in resnet.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_detr("tiny", backbone_weights=tmp_path / "resnet18.pth").eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        r = resnet
        want = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
        got = model.backbone[0](x)[-1]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    state = resnet.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"backbone\.0\.body\.layer1\.0\.conv1\.weight"):
        build_detr("tiny", backbone_weights=tmp_path / "bad.pth")


# -- forward, outputs, post-processing -------------------------------------------------------


def test_forward_outputs_and_aux():
    model = _tiny(dec_layers=3)
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        out = model(x)
    assert out["pred_logits"].shape == (2, 10, 92) and out["pred_boxes"].shape == (2, 10, 4)
    assert "aux_outputs" not in out and ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    with torch.no_grad():
        masked = model(x, torch.zeros(2, 128, 96, dtype=torch.bool))
    assert torch.allclose(masked["pred_logits"], out["pred_logits"], atol=1e-5)  # no padding == mask None
    model.train()
    out = model(x)
    assert len(out["aux_outputs"]) == 2 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 10, 4)


def test_segmentation_forward_shapes():
    model = _tiny("tiny-segm")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool))
    assert out["pred_masks"].shape == (1, 10, 24, 32) and torch.isfinite(out["pred_masks"]).all()


def test_postprocess_hand_values():
    logits = torch.tensor([[[0.0, 1.0, 5.0], [3.0, 0.0, 0.0]]])  # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0]]])
    scores, labels, xyxy = detr_postprocess(logits, boxes, [(100, 200)])
    denom = 1 + math.e + math.e**5
    assert scores[0, 0].item() == pytest.approx(math.e / denom) and labels[0, 0].item() == 1  # no-object excluded
    assert scores[0, 1].item() == pytest.approx(math.e**3 / (math.e**3 + 2)) and labels[0, 1].item() == 0
    assert xyxy[0, 0].tolist() == pytest.approx([80, 30, 120, 70])
    assert xyxy[0, 1].tolist() == pytest.approx([0, 0, 100, 100])
    with pytest.raises(UsageError):
        detr_postprocess(logits, boxes, [(1, 2), (3, 4)])


def test_resize_rule_and_preprocess():
    assert detr_resize_size(810, 1080) == (800, 1066)
    assert detr_resize_size(1280, 720) == (1333, 750)
    assert detr_resize_size(640, 480) == (1066, 800)
    assert detr_resize_size(1000, 800) == (1000, 800)  # short side already 800
    assert detr_resize_size(640, 480, size=256, max_size=None) == (341, 256)
    image = np.zeros((40, 60, 3), np.uint8)
    image[:] = (10, 20, 30)  # BGR
    tensor, size = detr_preprocess(image, size=32)
    assert size == (48, 32) and tensor.shape == (3, 32, 48) and tensor.dtype == np.float32
    for c, value in enumerate((30, 20, 10)):  # RGB order after pre-processing
        assert tensor[c, 5, 7] == pytest.approx((value / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-5)


# -- checkpoints -----------------------------------------------------------------------------


def _official_file(path, model, legacy=False, **args):
    # legacy=True: the pre-1.6 (non-zip) format the 2020 release files were written in.
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(**args), "epoch": 3}, path,
               _use_new_zipfile_serialization=not legacy)


def _same_outputs(a, b, x):
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    return all(torch.equal(out_a[k], out_b[k]) for k in out_a)


@pytest.mark.parametrize("preset,overrides,legacy", [("tiny", {}, False), ("tiny", {"pre_norm": True}, False),
                                                     ("tiny-segm", {}, False), ("tiny", {}, True)])
def test_checkpoint_round_trip(tmp_path, preset, overrides, legacy):
    model = _tiny(preset, **overrides)
    path = tmp_path / "detr.pth"
    _official_file(path, model, legacy, nheads=4, dilation=False, dropout=0.1, aux_loss=True, backbone="resnet18",
                   position_embedding="sine", lr=1e-4, output_dir="", frozen_weights=None)
    loaded, config, report = load_detr_checkpoint(path)
    assert config == model.config and not loaded.training
    assert report.entries == len(model.state_dict()) and report.from_args == ("nheads", "dilation", "dropout", "aux_loss")
    assert _same_outputs(model, loaded, torch.randn(1, 3, 96, 64))


def test_bare_state_dict_needs_overrides_for_heads(tmp_path):
    model = _tiny()
    state = model.state_dict()
    state["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    torch.save(state, tmp_path / "bare.pth")
    loaded, config, report = load_detr_checkpoint(tmp_path / "bare.pth", nheads=4)
    assert report.dropped == ("backbone.0.body.bn1.num_batches_tracked",)
    assert "nheads" not in report.assumed and "dilation" in report.assumed
    assert _same_outputs(model, loaded, torch.randn(1, 3, 64, 64))


def test_corrupted_checkpoints_raise_checkpoint_error(tmp_path):
    model = _tiny()
    state = model.state_dict()
    renamed = dict(state)
    renamed["transformer.decoder.layers.0.norm3.wieght"] = renamed.pop("transformer.decoder.layers.0.norm3.weight")
    renamed["transformer.encoder.layers.1.linear1.weight"] = torch.zeros(3, 64)
    torch.save({"model": renamed}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_detr_checkpoint(tmp_path / "bad.pth", nheads=4)
    message = str(err.value)
    assert "transformer.decoder.layers.0.norm3.weight" in message and "norm3.wieght" in message
    assert "transformer.encoder.layers.1.linear1.weight (checkpoint [3, 64] vs model [128, 64])" in message
    no_head = {k: v for k, v in state.items() if not k.startswith("class_embed")}
    torch.save({"model": no_head}, tmp_path / "nohead.pth")
    with pytest.raises(CheckpointError, match="class_embed.weight"):
        load_detr_checkpoint(tmp_path / "nohead.pth")
    torch.save({"optimizer": {}}, tmp_path / "nomodel.pth")
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        load_detr_checkpoint(tmp_path / "nomodel.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_detr_checkpoint(tmp_path / "missing.pth")


def test_untrusted_pickle_needs_trust(tmp_path):
    model = _tiny()
    torch.save({"model": model.state_dict(), "args": {"nheads": 4}, "when": datetime.timedelta(days=1)}, tmp_path / "p.pth")
    with pytest.raises(CheckpointError, match="trust"):
        load_detr_checkpoint(tmp_path / "p.pth")
    loaded, _, _ = load_detr_checkpoint(tmp_path / "p.pth", trust=True)
    assert _same_outputs(model, loaded, torch.randn(1, 3, 64, 64))


# -- criterion -------------------------------------------------------------------------------


def test_criterion_no_object_weighting_and_box_losses():
    torch.manual_seed(0)
    num_classes, eos = 3, 0.1
    logits = torch.randn(1, 4, num_classes + 1)
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.05, 0.05], [0.9, 0.1, 0.1, 0.1]]])
    # Targets sit next to queries 1 and 3 (cx off by 0.01), far from the others: the matching is obvious.
    targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.71, 0.7, 0.2, 0.2], [0.91, 0.1, 0.1, 0.1]])}]
    criterion = SetCriterion(num_classes, HungarianMatcher(), detr_weight_dict(1, aux_loss=False), eos_coef=eos)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    target_class = [3, 2, 3, 0]  # unmatched -> no-object (index 3)
    weights = [eos, 1.0, eos, 1.0]
    logp = logits[0].log_softmax(-1)
    want = sum(-w * logp[q, c] for q, (c, w) in enumerate(zip(target_class, weights))) / sum(weights)
    assert losses["loss_ce"].item() == pytest.approx(want.item(), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.02 / 2, abs=1e-6)
    giou_1 = 1 - (0.19 * 0.2) / (0.21 * 0.2)  # IoU 0.19/0.21, enclosing == union
    giou_3 = 1 - (0.09 * 0.1) / (0.11 * 0.1)
    assert losses["loss_giou"].item() == pytest.approx((giou_1 + giou_3) / 2, abs=1e-5)
    assert criterion.total(losses).item() == pytest.approx(
        losses["loss_ce"].item() + 5 * losses["loss_bbox"].item() + 2 * losses["loss_giou"].item(), rel=1e-6)


def test_criterion_aux_losses_per_decoder_layer():
    model = _tiny(dec_layers=3).train()
    out = model(torch.randn(2, 3, 64, 64))
    targets = [{"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    weight_dict = detr_weight_dict(3)
    criterion = SetCriterion(91, HungarianMatcher(), weight_dict)
    losses = criterion(out, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_1")} == set(weight_dict)
    total = criterion.total(losses)
    assert total.item() == pytest.approx(sum(weight_dict[k] * v.item() for k, v in losses.items()), rel=1e-6)
    total.backward()
    assert model.class_embed.weight.grad is not None
    with pytest.raises(UsageError, match="labels outside"):
        criterion(out, [{"labels": torch.tensor([91]), "boxes": torch.rand(1, 4)}, targets[1]])


def test_mask_losses_hand_values():
    logits = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice_loss(logits, targets, 1).item() == pytest.approx(1 - 3 / 5)  # (2*1 + 1) / (2 + 2 + 1)
    # p = 0.5 everywhere: ce = ln 2, (1 - p_t)^2 = 1/4, alpha_t = .25 / .75 -> mean = ln2 / 8.
    assert sigmoid_focal_loss(logits, targets, 1).item() == pytest.approx(math.log(2) / 8)


# -- ONNX ------------------------------------------------------------------------------------


class _ExportWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        out = self.model(images)
        return tuple(out[k] for k in ("pred_logits", "pred_boxes", "pred_masks") if k in out)


@pytest.mark.parametrize("preset", ["tiny", "tiny-segm"])
def test_tiny_onnx_export_dynamic_size(tmp_path, preset):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    # eval() on the wrapper too: the exporter restores the wrapper's mode (recursively) afterwards.
    wrapper = _ExportWrapper(_tiny(preset)).eval()
    path = tmp_path / "detr.onnx"
    names = ["pred_logits", "pred_boxes"] + (["pred_masks"] if preset == "tiny-segm" else [])
    torch.onnx.export(wrapper, (torch.randn(1, 3, 128, 160),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=names,
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}})
    graph = onnx.load(str(path)).graph
    constants = [numpy_helper.to_array(t) for t in graph.initializer]
    constants += [numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    assert all(np.isfinite(c).all() for c in constants if c.dtype.kind == "f")  # no -inf masks baked in
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 160, 224), (2, 3, 192, 128)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = wrapper(x)
        got = session.run(None, {"images": x.numpy()})
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape)
            assert np.abs(g - w.numpy()).max() < 1e-4
