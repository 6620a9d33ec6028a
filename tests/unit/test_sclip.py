"""SCLIP: correlative self-attention, PAMR, sliding windows, export parity (tiny preset, random weights)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from vlexport.errors import UsageError  # noqa: E402
from vlexport.models.sclip.pamr import PAMR  # noqa: E402
from vlexport.models.sclip.model import SCLIPSegmenter, csa_attention  # noqa: E402
from vlexport.models.sclip.vocabulary import split_synonyms  # noqa: E402
from vlexport.models.sclip.windows import short_side_size as resize_short_side, window_grid  # noqa: E402

SINGLE = ("a photo of a {}.",)


@pytest.fixture(scope="module")
def seg() -> SCLIPSegmenter:
    return SCLIPSegmenter.from_preset("tiny", ["cat", "sky, wall, tree", "dog"], templates=SINGLE)


def _naive_csa(x: torch.Tensor, attn: nn.MultiheadAttention) -> torch.Tensor:
    dim = x.shape[-1]
    heads = attn.num_heads
    d = dim // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = x @ w[:dim].T + b[:dim]
    k = x @ w[dim : 2 * dim].T + b[dim : 2 * dim]
    v = x @ w[2 * dim :].T + b[2 * dim :]
    outs = []
    for batch in range(x.shape[0]):
        per_head = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            qh, kh, vh = q[batch, :, sl], k[batch, :, sl], v[batch, :, sl]
            a = torch.softmax(qh @ qh.T / d**0.5, dim=-1) + torch.softmax(kh @ kh.T / d**0.5, dim=-1)
            per_head.append(a @ vh)
        outs.append(torch.cat(per_head, dim=-1))
    return attn.out_proj(torch.stack(outs))


def test_csa_matches_naive_and_differs_from_vanilla():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        x = torch.randn(2, 7, 32)
        got = csa_attention(x, attn)
        assert torch.allclose(got, _naive_csa(x, attn), atol=1e-5)
        vanilla = attn(x, x, x, need_weights=False)[0]
        assert (got - vanilla).abs().max() > 1e-2


def test_vanilla_blocks_reproduce_open_clip(seg):
    """Our block wiring (no CSA) gives open_clip's own image embedding: catches attribute mistakes."""
    v = seg.visual
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = v.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.expand(2, 1, -1), t], 1) + v.positional_embedding
        t = v.ln_pre(t)
        for block in v.transformer.resblocks:
            t = seg._block(block, t, csa=False)
        ours = v.ln_post(t[:, 0]) @ v.proj
        assert torch.allclose(ours, v(x), atol=1e-5)


def test_pamr_identity_and_export(tmp_path):
    image, mask = torch.rand(1, 3, 40, 48), torch.randn(1, 5, 40, 48)
    assert torch.equal(PAMR(num_iter=0)(image, mask), mask)
    pamr = PAMR(num_iter=3, dilations=(2, 4)).eval()
    with torch.no_grad():
        ref = pamr(image, mask)
    assert not torch.allclose(ref, mask)
    path = tmp_path / "pamr.onnx"
    torch.onnx.export(pamr, (image, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["image", "mask"], output_names=["refined"],
                      dynamic_axes={"image": {2: "h", 3: "w"}, "mask": {1: "c", 2: "h", 3: "w"}})
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image2, mask2 = torch.rand(1, 3, 33, 57), torch.randn(1, 3, 33, 57)
    for im, mk in ((image, mask), (image2, mask2)):
        (out,) = sess.run(None, {"image": im.numpy(), "mask": mk.numpy()})
        with torch.no_grad():
            assert np.abs(out - pamr(im, mk).numpy()).max() < 1e-4


def test_pamr_affinity_is_a_distribution():
    aff = PAMR(1, (1, 2)).affinity(torch.rand(2, 3, 9, 11))
    assert aff.shape == (2, 1, 16, 9, 11)
    assert torch.allclose(aff.sum(2), torch.ones(2, 1, 9, 11), atol=1e-5)


def test_window_grid():
    windows = window_grid(336, 448, 224, 112)
    assert len(windows) == 6
    assert all(y2 - y1 == 224 and x2 - x1 == 224 for y1, y2, x1, x2 in windows)
    assert windows[-1] == (112, 336, 224, 448)
    assert window_grid(100, 150, 224, 112) == [(0, 100, 0, 150)]
    assert resize_short_side(375, 500, 336) == (336, 448)


def test_slide_batched_equals_loop(seg):
    x = torch.randn(1, 3, 80, 112)
    batched, loop = seg.slide_logits(x), seg.slide_logits_loop(x)
    assert batched.shape == (1, 5, 80, 112)
    assert (batched - loop).abs().max() < 1e-5


def test_crop_logits_export_parity(seg, tmp_path):
    path = tmp_path / "segmenter.onnx"
    torch.onnx.export(seg.crop_part(), (torch.randn(2, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["crops"], output_names=["logits"],
                      dynamic_axes={"crops": {0: "crops"}, "logits": {0: "crops"}})
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    crops = torch.randn(5, 3, 64, 64)
    (out,) = sess.run(None, {"crops": crops.numpy()})
    with torch.no_grad():
        ref = seg.crop_logits(crops).numpy()
    assert out.shape == (5, 5, 64, 64)
    assert np.abs(out - ref).max() < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.999


def test_dense_similarity_and_segment(seg):
    sim = seg.compute_dense_similarity(torch.randn(1, 3, 96, 128))
    assert sim.shape == (3, 6, 8)
    assert sim.abs().max() <= 1 + 1e-5
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    labels = seg.segment(image)
    assert labels.shape == (50, 70) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 3
    rgb = torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1).float()
    assert seg.segment(rgb).shape == (50, 70)


def test_synonyms_max(seg):
    queries, owner = split_synonyms(["cat", "sky, wall, tree", "dog"])
    assert queries == ["cat", "sky", "wall", "tree", "dog"] and owner == [0, 1, 1, 1, 2]
    assert seg.text_embeddings.shape[0] == 5 and seg.query_to_class.tolist() == owner
    scores = torch.tensor([[0.1, 0.2, 0.7, 0.3, 0.4]]).T[:, :, None]  # [Q, 1, 1]
    assert seg.queries_to_classes(scores, dim=0).flatten().tolist() == pytest.approx([0.1, 0.7, 0.4])
    with pytest.raises(UsageError):
        split_synonyms(["cat", " , "])


def test_classify_proposals(seg):
    image = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    a = np.zeros((60, 80), bool)
    a[:30, :40] = True
    masks = [a, ~a, np.zeros_like(a)]
    labels, scores = seg.classify_proposals(image, masks)
    assert labels.shape == (3,) and scores.shape == (3,)
    assert all(0 <= label < 3 for label in labels[:2]) and labels[2] == -1
    assert np.all((scores[:2] > 0) & (scores[:2] <= 1))
    labels2, _ = seg.classify_proposals(image, lambda img: masks[:2])
    assert labels2.tolist() == labels[:2].tolist()
    with pytest.raises(UsageError):
        seg.classify_proposals(image, [np.zeros((10, 10), bool)])


@pytest.mark.slow
def test_vit_b16_crop_logits_parity(tmp_path):
    with pytest.warns(Warning):
        seg = SCLIPSegmenter.from_preset("vit-b16", ["cat", "dog"], templates=SINGLE, offline=True)
    path = tmp_path / "segmenter.onnx"
    crops = torch.randn(2, 3, 224, 224)
    torch.onnx.export(seg.crop_part(), (crops,), str(path), dynamo=False, opset_version=17,
                      input_names=["crops"], output_names=["logits"],
                      dynamic_axes={"crops": {0: "crops"}, "logits": {0: "crops"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"crops": crops.numpy()})
    with torch.no_grad():
        ref = seg.crop_logits(crops).numpy()
    assert np.abs(out - ref).max() < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.999


def test_segment_with_pamr_and_threshold():
    seg = SCLIPSegmenter.from_preset("tiny", ["cat", "dog"], templates=SINGLE, pamr_steps=2, prob_threshold=0.9)
    assert seg.pamr is not None and seg.pamr.dilations == (8, 16)
    image = np.random.default_rng(2).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    labels = seg.segment(image)
    assert labels.shape == (40, 52) and set(np.unique(labels)) <= {0, 1}


def test_traced_positional_interpolation_matches_the_reference(seg):
    """The in-graph (traced) DINO-style interpolation equals F.interpolate's, quirk included."""
    for gh, gw in [(4, 4), (3, 4), (2, 7), (5, 5), (1, 3), (2, 8), (8, 2)]:  # 2x8 / 8x2: 16 tokens keep the table
        eager = seg._pos_embed(gh, gw)
        traced = seg._pos_embed_traced(torch.tensor(gh), torch.tensor(gw))
        assert traced.shape == eager.shape == (1 + gh * gw, eager.shape[1])
        assert (traced - eager).abs().max() < 1e-5
    assert torch.equal(seg._pos_embed_traced(torch.tensor(2), torch.tensor(8)), seg.visual.positional_embedding)


def test_exported_crop_size_is_dynamic(seg, tmp_path):
    """One graph takes full crops and the smaller windows of a thin frame (positional interpolation in-graph)."""
    path = tmp_path / "segmenter.onnx"
    axes = {0: "crops", 2: "crop_height", 3: "crop_width"}
    torch.onnx.export(seg.crop_part(), (torch.randn(2, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["crops"], output_names=["logits"], dynamic_axes={"crops": axes, "logits": axes})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in [(64, 64), (48, 64), (64, 40), (32, 32), (17, 64)]:
        crops = torch.randn(3, 3, h, w)
        (out,) = sess.run(None, {"crops": crops.numpy()})
        with torch.no_grad():
            ref = seg.crop_logits(crops).numpy()
        assert out.shape == (3, 5, h, w)
        assert np.abs(out - ref).max() < 1e-4


def test_probabilities_area_threshold_and_segment(seg):
    from vlexport.models.sclip.model import SCLIPSegmenter

    image = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    area = SCLIPSegmenter(seg.loaded, dataclasses.replace(seg.config, area_threshold=0.4, prob_threshold=0.5),
                          seg.class_names, templates=SINGLE)
    plain = seg.probabilities(image)
    probs = area.probabilities(image)
    assert probs.shape == (3, 50, 70)
    counts = torch.bincount(plain.argmax(0).flatten(), minlength=3)[1:].float()
    dropped = (counts <= 0.4 * counts.sum()).nonzero().flatten() + 1
    assert len(dropped) > 0 and (probs[dropped] == 0).all()
    kept = [c for c in range(3) if c not in dropped.tolist()]
    assert torch.equal(probs[kept], plain[kept])
    best, want = probs.max(0)
    want[best < 0.5] = 0
    np.testing.assert_array_equal(area.segment(image), want.numpy())


def test_classes_option_synonyms():
    from vlexport.models.sclip.vocabulary import classes_from_option

    assert classes_from_option("background|sky| wall ,cat,dog") == ["background, sky, wall", "cat", "dog"]
    assert classes_from_option("a,b,c") == ["a", "b", "c"]
    assert split_synonyms(classes_from_option("road|street,car")) == (["road", "street", "car"], [0, 0, 1])
    with pytest.raises(UsageError, match="more than once"):
        classes_from_option("road|street,street")
    with pytest.raises(UsageError, match="empty"):
        classes_from_option(" | ,")
