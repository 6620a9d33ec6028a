"""CLIP weights from a file run with the activation they were trained with (OpenAI layout: QuickGELU).

Every family's tower is compared with open_clip itself built with QuickGELU on the same file:
that is what OpenAI's CLIP computes, and what the official SCLIP code runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from vlexport.errors import UsageError
from vlexport.models.clip import weights as clip_towers
from vlexport.models.clip.activation import resolve_activation
from vlexport.models.clip.towers import FrozenCLIPImageEncoder, FrozenCLIPTextEncoder
from vlexport.models.clip.weights import load_clip_model
from vlexport.models.clip.text import TextEmbeddingCache, build_text_embeddings

CLASSES = ["person", "red car", "dog"]
TEMPLATES = ("a photo of a {}.", "itap of my {}.")


def _tiny_clip(quick_gelu: bool) -> torch.nn.Module:
    return open_clip.CLIP(**clip_towers._TINY_CONFIG, quick_gelu=quick_gelu).eval()


@pytest.fixture(scope="module")
def openai_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random weights of the tiny CLIP in OpenAI's state-dict layout, stored in fp16 as OpenAI's are."""
    torch.manual_seed(1234)
    model = _tiny_clip(quick_gelu=True)
    with torch.no_grad():  # large enough pre-activations that QuickGELU and GELU really differ
        for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
            block.mlp.c_fc.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("clip") / "ViT-tiny-openai.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path


def _reference(path: Path, quick_gelu: bool = True) -> torch.nn.Module:
    """open_clip with QuickGELU forced, loaded with open_clip's own checkpoint loader."""
    model = _tiny_clip(quick_gelu)
    open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    return model.eval()


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_openai_layout_file_loads_with_quickgelu(openai_file: Path) -> None:
    loaded = load_clip_model("tiny", str(openai_file))
    assert loaded.activation == "quickgelu" and "OpenAI" in loaded.activation_source
    assert loaded.provenance["activation"] == "quickgelu"
    ref = _reference(openai_file)
    tokens = loaded.tokenizer(["a photo of a dog.", "a red car"])
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_text(tokens), ref.encode_text(tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.model.encode_image(x), ref.encode_image(x), atol=1e-5, rtol=0)
        # The activation matters on these weights: GELU would be far off.
        gelu = _reference(openai_file, quick_gelu=False)
        assert (gelu.encode_text(tokens) - ref.encode_text(tokens)).abs().max() > 1e-3


def test_kdeov_towers_text_embeddings_and_teacher(openai_file: Path) -> None:
    text = FrozenCLIPTextEncoder("tiny", str(openai_file))
    assert text.activation == "quickgelu"
    ref = _reference(openai_file)
    built = build_text_embeddings(text, CLASSES, TEMPLATES, "t", cache=None).embeddings
    with torch.no_grad():
        per_template = [ref.encode_text(text.tokenize([t.format(c) for t in TEMPLATES]), normalize=True)
                        for c in CLASSES]
        expected = torch.nn.functional.normalize(torch.stack([e.mean(0) for e in per_template]), dim=-1).numpy()
    np.testing.assert_allclose(built, expected, atol=1e-5, rtol=0)

    teacher = FrozenCLIPImageEncoder.from_loaded(text.loaded)
    x = _images()
    with torch.no_grad():
        expected_img = ref.encode_image((x - teacher.mean) / teacher.std, normalize=True)
        torch.testing.assert_close(teacher(x), expected_img, atol=1e-5, rtol=0)


def test_kdeov_export_records_and_bakes_quickgelu(openai_file: Path, tmp_path: Path) -> None:
    from vlexport.export.kdeov import KDEOVExportOptions, export_kdeov
    from vlexport.runtime.bundle import Bundle

    report = export_kdeov(KDEOVExportOptions(out=tmp_path / "b", preset="tiny", classes=CLASSES, templates="single",
                                             clip_pretrained=str(openai_file)))
    bundle = Bundle.open(report.path)
    tower = bundle.manifest["provenance"]["text_encoder"]
    assert tower["activation"] == "quickgelu" and tower["weights_source"] == f"file:{openai_file.resolve()}"
    ref = _reference(openai_file)
    with torch.no_grad():
        tokens = open_clip.get_tokenizer("ViT-B-32")([f"a photo of a {c}." for c in CLASSES])
        expected = ref.encode_text(tokens, normalize=True).numpy()
    np.testing.assert_allclose(bundle.load_vocab()["embeddings"], expected, atol=1e-5, rtol=0)


def test_sclip_image_and_text_paths_use_quickgelu(openai_file: Path) -> None:
    from vlexport.models.sclip.model import SCLIPSegmenter

    seg = SCLIPSegmenter.from_preset("tiny", CLASSES, pretrained=str(openai_file), templates=TEMPLATES)
    assert seg.loaded.activation == "quickgelu"
    ref = _reference(openai_file)
    tokens = seg.loaded.tokenizer([f"a photo of a {c}." for c in CLASSES])
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(seg.loaded.model.encode_text(tokens), ref.encode_text(tokens), atol=1e-5, rtol=0)
        # The dense path runs the same blocks: with CSA off in the last block it is CLIP's own image tower.
        torch.testing.assert_close(seg.visual(x), ref.visual(x), atol=1e-5, rtol=0)


def test_captioner_vision_tower_uses_quickgelu(openai_file: Path) -> None:
    from vlexport.models.captioner.model import build_captioner

    model = build_captioner("tiny", clip_pretrained=str(openai_file)).eval()
    assert model.encoder.clip_info["activation"] == "quickgelu"
    ref = _reference(openai_file)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.visual(x), ref.visual(x), atol=1e-5, rtol=0)


def test_explicit_gelu_matches_open_clip_gelu(openai_file: Path) -> None:
    loaded = load_clip_model("tiny", str(openai_file), activation="gelu")
    assert (loaded.activation, loaded.activation_source) == ("gelu", "asked for")
    ref = _reference(openai_file, quick_gelu=False)
    tokens = loaded.tokenizer(["a photo of a dog."])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_text(tokens), ref.encode_text(tokens), atol=1e-5, rtol=0)


def test_embeddings_cached_under_gelu_are_not_served_for_quickgelu(openai_file: Path, tmp_path: Path) -> None:
    cache = TextEmbeddingCache(tmp_path)
    gelu = FrozenCLIPTextEncoder("tiny", str(openai_file), activation="gelu")
    first = build_text_embeddings(gelu, CLASSES, TEMPLATES, "t", cache)
    assert first.encoded == len(CLASSES)
    quick = FrozenCLIPTextEncoder("tiny", str(openai_file))
    assert quick.weights_sha256 == gelu.weights_sha256  # same weights: only the activation differs
    second = build_text_embeddings(quick, CLASSES, TEMPLATES, "t", cache)
    assert second.encoded == len(CLASSES) and second.cached == 0
    assert np.abs(second.embeddings - first.embeddings).max() > 1e-3
    assert build_text_embeddings(quick, CLASSES, TEMPLATES, "t", cache).cached == len(CLASSES)


def test_open_clip_config_beside_the_weights_decides(openai_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hf-snapshot"
    folder.mkdir()
    weights = folder / "open_clip_pytorch_model.bin"
    weights.write_bytes(openai_file.read_bytes())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 64, "quick_gelu": False}}))
    loaded = load_clip_model("tiny", str(weights))
    assert loaded.activation == "gelu" and "open_clip_config.json" in loaded.activation_source


def test_openai_torchscript_archive_loads_with_quickgelu(openai_file: Path, tmp_path: Path) -> None:
    """OpenAI's release files are TorchScript archives; their tensors load without unpickling Python objects."""
    state = torch.load(openai_file, weights_only=True)

    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for name, value in state.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, Holder())
            module = getattr(module, part)
        module.register_buffer(leaf, value.clone())
    root.register_buffer("input_resolution", torch.tensor(64))  # extras OpenAI's archives carry
    archive = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(root), str(archive))
    assert clip_towers._is_torchscript(archive) and not clip_towers._is_torchscript(openai_file)

    loaded = load_clip_model("tiny", str(archive))
    assert loaded.activation == "quickgelu"
    ref = _reference(openai_file)
    tokens = loaded.tokenizer(["a photo of a dog."])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_text(tokens), ref.encode_text(tokens), atol=1e-5, rtol=0)


def test_activation_rules() -> None:
    assert resolve_activation("ViT-B-16", pretrained="openai",
                              pcfg=dict(open_clip.get_pretrained_cfg("ViT-B-16", "openai")))[0] == "quickgelu"
    assert resolve_activation("ViT-B-16-quickgelu")[0] == "quickgelu"
    assert resolve_activation("ViT-B-16") == ("gelu", "model config")  # random weights: the config's own
    with pytest.raises(UsageError, match="QuickGELU config"):
        resolve_activation("ViT-B-16-quickgelu", "gelu")
    with pytest.raises(UsageError, match="unknown CLIP activation"):
        load_clip_model("tiny", None, activation="relu")
