"""Multi-scale CLIP encoder of the captioner: ViT taps, pyramid, freezing, and ONNX export parity."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vlexport.errors import UsageError  # noqa: E402
from vlexport.models.captioner.encoder import MultiScaleCLIPEncoder, tap_indices  # noqa: E402
from vlexport.models.clip.weights import load_clip_model  # noqa: E402


def _tiny(**kwargs) -> MultiScaleCLIPEncoder:
    torch.manual_seed(0)
    kwargs.setdefault("num_heads", 4)
    return MultiScaleCLIPEncoder(64, model_name="tiny", pretrained=None, **kwargs)


def _images(encoder: MultiScaleCLIPEncoder, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, encoder.image_size, encoder.image_size, generator=gen)


def test_tap_indices():
    assert tap_indices(12) == [2, 5, 8, 11]
    assert tap_indices(24) == [5, 11, 17, 23]
    assert tap_indices(2) == [0, 0, 1, 1]
    assert tap_indices(1) == [0, 0, 0, 0]


def test_tiny_output_shape_and_attributes():
    enc = _tiny(num_queries=7, num_layers=2).eval()
    with torch.no_grad():
        out = enc(_images(enc, 2))
    assert out.shape == (2, 7, 64)
    assert torch.isfinite(out).all()
    assert enc.image_size == 64 and enc.num_queries == 7 and enc.embed_size == 64
    assert len(enc.mean) == 3 and len(enc.std) == 3 and all(isinstance(v, float) for v in enc.mean + enc.std)
    loaded = load_clip_model("tiny", None)
    assert enc.clip_info == {
        "model_name": "tiny",
        "pretrained": None,
        "weights_source": loaded.weights_source,
        "weights_sha256": loaded.weights_sha256,
        "is_pretrained": False,
        "activation": "gelu",  # random weights: the tiny config's own activation
        "activation_source": "model config",
    }
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        enc(torch.zeros(1, 3, 32, 32))


def test_vit_run_by_hand_matches_open_clip():
    enc = _tiny().eval()
    images = _images(enc, 2)
    with torch.no_grad():
        grids, pooled = enc.vit_features(images)
        ref = enc.visual.forward_intermediates(images, indices=[0, 1])
    # Tiny CLIP: 2 blocks, 64x64 images, 16-pixel patches -> 4x4 grids; taps repeat blocks 1, 1, 2, 2.
    expected = [ref["image_intermediates"][i] for i in (0, 0, 1, 1)]
    for got, want in zip(grids, expected, strict=True):
        assert got.shape == (2, 64, 4, 4)
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(pooled @ enc.visual.proj, ref["image_features"], atol=1e-5)


def test_pyramid_levels_have_strides_2x_1x_half_quarter():
    enc = _tiny().eval()
    with torch.no_grad():
        levels = enc.pyramid(enc.vit_features(_images(enc, 1))[0])
    assert [tuple(level.shape) for level in levels] == [(1, 64, 8, 8), (1, 64, 4, 4), (1, 64, 2, 2), (1, 64, 1, 1)]


def test_output_depends_on_the_image_and_trains_the_offsets():
    enc = _tiny().train()
    images = _images(enc, 2)
    out = enc(images)
    assert (out[0] - out[1]).abs().max() > 1e-3
    out.square().mean().backward()
    offsets = enc.layers[0].cross_attn.sampling_offsets.weight.grad
    assert offsets is not None and offsets.abs().max() > 0


def test_frozen_tower_is_shared_frozen_and_stays_in_eval():
    enc = _tiny(freeze_vision=True)
    shared = load_clip_model("tiny", None).model.visual
    assert enc.visual is shared
    assert all(not p.requires_grad for p in enc.visual.parameters())
    own = [p for name, p in enc.named_parameters() if not name.startswith("visual.")]
    assert own and all(p.requires_grad for p in own)
    enc.train()
    assert enc.training and not enc.visual.training
    out = enc(_images(enc, 2))
    out.square().mean().backward()
    assert all(p.grad is None for p in enc.visual.parameters())


def test_unfrozen_copy_trains_without_touching_the_shared_clip():
    shared = load_clip_model("tiny", None).model.visual
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    enc = _tiny(freeze_vision=False).train()
    assert enc.visual is not shared
    assert enc.visual.training
    assert all(p.requires_grad for p in enc.visual.parameters())
    optimiser = torch.optim.SGD(enc.parameters(), lr=0.1)
    images = _images(enc, 2)
    target = torch.randn(2, enc.num_queries, enc.embed_size)
    for _ in range(3):
        optimiser.zero_grad()
        ((enc(images) - target) ** 2).mean().backward()
        optimiser.step()
    copy_changed = any(not torch.equal(v, before[k]) for k, v in enc.visual.state_dict().items())
    assert copy_changed
    for key, value in shared.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not p.requires_grad for p in shared.parameters())
    assert not shared.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_heads": 5}, "divisible"),
        ({"num_queries": 0}, "num_queries"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        _tiny(**kwargs)


@pytest.mark.parametrize("change", [{"interpolation": "bilinear"}, {"resize_mode": "squash"}])
def test_a_tower_with_another_reference_preprocessing_is_refused(monkeypatch, change):
    """The runtime's clip_preprocess is open_clip's default transform (bicubic, shortest side, crop)."""
    import open_clip

    real = open_clip.get_model_preprocess_cfg
    monkeypatch.setattr(open_clip, "get_model_preprocess_cfg", lambda model: {**real(model), **change})
    with pytest.raises(UsageError, match="captioner implements open_clip's default"):
        _tiny()


# --------------------------------------------------------------------------------------------------
# ONNX export


def _export_and_compare(enc: MultiScaleCLIPEncoder, path) -> float:
    """Export with a dynamic batch axis; return the max-abs ORT-vs-PyTorch error on 2 images."""
    enc.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: level sizes are constants for a fixed image size
        torch.onnx.export(
            enc,
            (_images(enc, 2, seed=1),),
            str(path),
            input_names=["images"],
            output_names=["prefix"],
            dynamic_axes={"images": {0: "batch"}, "prefix": {0: "batch"}},
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {(node.domain or "ai.onnx", node.op_type) for node in model.graph.node}
    assert ("ai.onnx", "GridSample") in ops
    assert {domain for domain, _ in ops} == {"ai.onnx"}, sorted(ops)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = []
    for batch, seed in ((2, 2), (3, 3)):  # 3 != the traced batch: the batch axis is really dynamic
        images = _images(enc, batch, seed=seed)
        with torch.no_grad():
            expected = enc(images).numpy()
        (got,) = session.run(None, {"images": images.numpy()})
        assert got.shape == (batch, enc.num_queries, enc.embed_size)
        errors.append(float(np.abs(got - expected).max()))
    print(f"max-abs ORT vs PyTorch: {errors}")
    return errors[0]


def test_onnx_export_tiny(tmp_path):
    enc = _tiny(num_layers=2)
    assert _export_and_compare(enc, tmp_path / "encoder.onnx") < 1e-4


@pytest.mark.slow
def test_onnx_export_vit_b32_random(tmp_path):
    torch.manual_seed(0)
    enc = MultiScaleCLIPEncoder(768, model_name="ViT-B-32", pretrained=None)
    assert enc.image_size == 224 and enc.taps == [2, 5, 8, 11]
    with torch.no_grad():
        levels = enc.pyramid(enc.vit_features(_images(enc, 1))[0])
    assert [tuple(level.shape[-2:]) for level in levels] == [(14, 14), (7, 7), (4, 4), (2, 2)]
    assert _export_and_compare(enc, tmp_path / "encoder.onnx") < 1e-4
