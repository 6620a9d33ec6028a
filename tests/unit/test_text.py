"""Frozen CLIP towers, prompt templates, vocabularies and the text-embedding bake (tiny preset: fast)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from vlexport.errors import CheckpointError, UsageError, WeightsUnavailableError
from vlexport.models.clip import weights as clip_towers
from vlexport.models.clip.towers import FrozenCLIPImageEncoder, FrozenCLIPTextEncoder
from vlexport.models.clip.weights import RandomWeightsWarning, clear_clip_cache, load_clip_model
from vlexport.models.clip.text import (
    COCO80_CLASSES,
    IMAGENET_TEMPLATES,
    SINGLE_TEMPLATE,
    TextEmbeddingCache,
    build_text_embeddings,
    parse_vocabulary,
    resolve_templates,
)

CLASSES = ["person", "red car", "dog"]
TEMPLATES = ("a photo of a {}.", "a drawing of the {}.", "itap of my {}.")


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIPTextEncoder:
    return FrozenCLIPTextEncoder("tiny", None)


@pytest.fixture
def hermetic_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Offline, with an empty weights cache whatever this machine has downloaded before."""
    monkeypatch.setenv("VLEXPORT_OFFLINE", "1")
    monkeypatch.setattr(clip_towers, "_cached_weights", lambda pcfg: None)
    clear_clip_cache()
    yield
    clear_clip_cache()


def count_forward_calls(encoder: torch.nn.Module) -> list[int]:
    """Number of prompts of each call into the text tower (``encode``), recorded by a wrapper."""
    calls: list[int] = []
    original = encoder.encode

    def counting(texts, batch_size=256):
        calls.append(len(texts))
        return original(texts, batch_size=batch_size)

    encoder.encode = counting
    return calls


# ------------------------------------------------------------------ templates and vocabularies


def test_imagenet_templates_are_openais_80() -> None:
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    for template in IMAGENET_TEMPLATES:
        assert template.count("{}") == 1
        assert template.format("dog").count("dog") == 1
    # Same list, same order as the one open_clip ships (as lambdas).
    assert tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES) == IMAGENET_TEMPLATES
    assert SINGLE_TEMPLATE == ("a photo of a {}.",)


def test_coco80_classes() -> None:
    assert len(COCO80_CLASSES) == 80 and len(set(COCO80_CLASSES)) == 80
    assert COCO80_CLASSES[:3] == ("person", "bicycle", "car")
    assert COCO80_CLASSES[-3:] == ("teddy bear", "hair drier", "toothbrush")


def test_resolve_builtin_templates() -> None:
    assert resolve_templates("imagenet80") == ("imagenet80", IMAGENET_TEMPLATES)
    assert resolve_templates("single") == ("single", SINGLE_TEMPLATE)


def test_resolve_templates_from_file(tmp_path: Path) -> None:
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\n   \n  a sketch of the {}.  \n", encoding="utf-8")
    templates_id, templates = resolve_templates(str(path))
    assert templates == ("a photo of a {}.", "a sketch of the {}.")
    assert templates_id.startswith("file:") and len(templates_id) == len("file:") + 16
    # The id follows the content, not the path.
    copy = tmp_path / "copy.txt"
    copy.write_text("a photo of a {}.\na sketch of the {}.\n", encoding="utf-8")
    assert resolve_templates(str(copy))[0] == templates_id
    copy.write_text("a photo of a {}.\n", encoding="utf-8")
    assert resolve_templates(str(copy))[0] != templates_id


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("a photo of a {}.\na photo without placeholder\n", "has no '{}' placeholder"),
        ("\n  \n", "is empty"),
        ("a {} and a {}.\n", "exactly once"),
        ("a {{}} photo.\n", "exactly once"),
        ("a {name} photo.\n", "no '{}' placeholder"),
    ],
)
def test_resolve_templates_file_errors(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "templates.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=match):
        resolve_templates(str(path))


def test_resolve_templates_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="imagenet80"):
        resolve_templates("imagenet81")
    with pytest.raises(UsageError, match="directory"):
        resolve_templates(str(tmp_path))


def test_parse_vocabulary_default_and_string() -> None:
    assert parse_vocabulary(None, None) == list(COCO80_CLASSES)
    assert parse_vocabulary(" person , traffic light,,car ,", None) == ["person", "traffic light", "car"]


def test_parse_vocabulary_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("\ufeff# my classes\nperson\n\n  fire hydrant  \n   # indented comment\ncar\n", encoding="utf-8")
    assert parse_vocabulary(None, str(path)) == ["person", "fire hydrant", "car"]


def test_parse_vocabulary_errors(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("person\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not both"):
        parse_vocabulary("person", str(vocab))
    for empty in ("", " , ,"):
        with pytest.raises(UsageError, match="the vocabulary is empty"):
            parse_vocabulary(empty, None)
    only_comments = tmp_path / "comments.txt"
    only_comments.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UsageError, match="the vocabulary is empty"):
        parse_vocabulary(None, str(only_comments))
    with pytest.raises(UsageError, match="duplicate class names.*'car'.*'dog'"):
        parse_vocabulary("car,dog,person,car,dog", None)
    missing = tmp_path / "missing.txt"
    with pytest.raises(UsageError, match="missing.txt"):
        parse_vocabulary(None, str(missing))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80garbage")
    with pytest.raises(UsageError, match="binary.txt"):
        parse_vocabulary(None, str(binary))


# ------------------------------------------------------------------ CLIP towers (tiny preset)


def test_tiny_text_encoder_is_frozen_and_stays_eval(tiny: FrozenCLIPTextEncoder) -> None:
    assert tiny.embed_dim == 64 and tiny.context_length == 77
    assert tiny.model_name == "tiny" and tiny.pretrained is None and not tiny.is_pretrained
    assert tiny.weights_source == "random(seed=0)" and len(tiny.weights_sha256) == 64
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())
    tokens = tiny.tokenize(CLASSES)
    assert tokens.dtype == torch.long and tokens.shape == (3, 77)
    out = tiny(tokens)
    assert out.shape == (3, 64) and not out.requires_grad
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    encoded = tiny.encode(CLASSES, batch_size=2)
    assert torch.allclose(encoded, out, atol=1e-6)


def test_tiny_load_is_deterministic_and_leaves_global_rng_alone() -> None:
    clear_clip_cache()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = FrozenCLIPTextEncoder("tiny", None)
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the global RNG
    clear_clip_cache()
    second = FrozenCLIPTextEncoder("tiny", None)
    assert first.clip is not second.clip
    assert first.weights_sha256 == second.weights_sha256
    a = build_text_embeddings(first, CLASSES, TEMPLATES, "t", cache=None).embeddings
    b = build_text_embeddings(second, CLASSES, TEMPLATES, "t", cache=None).embeddings
    np.testing.assert_array_equal(a, b)
    # In-process cache: same object for the same request.
    assert load_clip_model("tiny", None) is second.loaded


def test_embeddings_shape_norm_and_match_open_clip(tiny: FrozenCLIPTextEncoder) -> None:
    result = build_text_embeddings(tiny, CLASSES, TEMPLATES, "t", cache=None, batch_size=4)
    assert result.embeddings.shape == (3, 64) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    assert (result.encoded, result.cached) == (3, 0)
    assert result.class_names == tuple(CLASSES)
    # The bake is open_clip's zero-shot classifier (which returns [D, C]).
    reference = open_clip.build_zero_shot_classifier(tiny.clip, tiny.tokenizer, CLASSES, TEMPLATES, device="cpu")
    np.testing.assert_allclose(result.embeddings, reference.T.numpy(), atol=1e-5)


def test_cache_second_call_encodes_nothing(tmp_path: Path) -> None:
    encoder = FrozenCLIPTextEncoder.from_loaded(load_clip_model("tiny", None))
    calls = count_forward_calls(encoder)
    cache = TextEmbeddingCache(tmp_path)
    first = build_text_embeddings(encoder, CLASSES, TEMPLATES, "t", cache, batch_size=4)
    assert (first.encoded, first.cached) == (3, 0)
    assert sum(calls) == len(CLASSES) * len(TEMPLATES) and len(calls) == 3  # 9 prompts in chunks of 4
    assert len(list((tmp_path / "text").rglob("*.npy"))) == 3
    assert not list((tmp_path / "text").rglob(".tmp-*"))

    calls.clear()
    second = build_text_embeddings(encoder, CLASSES, TEMPLATES, "t", TextEmbeddingCache(tmp_path))
    assert (second.encoded, second.cached) == (0, 3) and calls == []
    np.testing.assert_array_equal(first.embeddings, second.embeddings)

    # One new class: only it goes through the tower; order follows the vocabulary.
    third = build_text_embeddings(encoder, ["cat", *CLASSES], TEMPLATES, "t", cache)
    assert (third.encoded, third.cached) == (1, 3) and sum(calls) == len(TEMPLATES)
    np.testing.assert_array_equal(third.embeddings[1:], first.embeddings)


def test_cache_key_depends_on_model_weights_activation_templates_and_class() -> None:
    def key(model="ViT-B-32", sha="a" * 64, templates="imagenet80", name="dog", activation="quickgelu"):
        return TextEmbeddingCache.key(model, sha, templates, name, activation=activation)

    base = key()
    assert base == key()
    assert base != key(sha="b" * 64)
    assert base != key(templates="single")
    assert base != key(model="ViT-B-16")
    assert base != key(name="cat")
    # Embeddings cached under the wrong activation are never served for the other one.
    assert base != key(activation="gelu")


def test_other_templates_or_weights_miss_the_cache(tmp_path: Path, tiny: FrozenCLIPTextEncoder) -> None:
    cache = TextEmbeddingCache(tmp_path)
    build_text_embeddings(tiny, CLASSES, TEMPLATES, "t", cache)
    assert build_text_embeddings(tiny, CLASSES, SINGLE_TEMPLATE, "single", cache).encoded == 3

    # Same model name, other weights: a different weights hash, so nothing is reused.
    loaded = load_clip_model("tiny", None)
    with torch.no_grad():
        state = {k: v + 0.01 for k, v in loaded.model.state_dict().items()}
    weights = tmp_path / "tiny-shifted.pt"
    torch.save(state, weights)
    other = FrozenCLIPTextEncoder("tiny", str(weights))
    assert other.is_pretrained and other.weights_source == f"file:{weights.resolve()}"
    assert other.weights_sha256 != tiny.weights_sha256
    assert build_text_embeddings(other, CLASSES, TEMPLATES, "t", cache).encoded == 3


def test_unwritable_cache_warns_and_continues(
    tmp_path: Path, tiny: FrozenCLIPTextEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    cache = TextEmbeddingCache(blocker)
    with caplog.at_level(logging.WARNING, logger="vlexport"):
        result = build_text_embeddings(tiny, CLASSES, TEMPLATES, "t", cache)
    assert result.embeddings.shape == (3, 64) and result.encoded == 3
    assert sum("not writable" in r.getMessage() for r in caplog.records) == 1  # one warning, not one per class


def test_cache_ignores_corrupt_files(tmp_path: Path, tiny: FrozenCLIPTextEncoder) -> None:
    cache = TextEmbeddingCache(tmp_path)
    first = build_text_embeddings(tiny, CLASSES, TEMPLATES, "t", cache)
    victim = cache.path(cache.key(tiny.model_name, tiny.weights_sha256, "t", "dog", activation=tiny.activation))
    victim.write_bytes(b"truncated")
    again = build_text_embeddings(tiny, CLASSES, TEMPLATES, "t", cache)
    assert (again.encoded, again.cached) == (1, 2)
    np.testing.assert_allclose(again.embeddings, first.embeddings, atol=1e-6)


def test_cache_root_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLEXPORT_CACHE", str(tmp_path))
    assert TextEmbeddingCache().dir == tmp_path / "text"


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
# EOT pooling gathers at argmax indices, never negative: the exporter's generic caveat does not apply.
@pytest.mark.filterwarnings("ignore:Exporting aten.{2}index operator:UserWarning")
def test_text_encoder_onnx_matches_onnxruntime(tmp_path: Path, tiny: FrozenCLIPTextEncoder) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "text_encoder.onnx"
    example = tiny.tokenize(["a photo of a dog.", "a car"])
    torch.onnx.export(
        tiny,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["tokens"],
        output_names=["embeddings"],
        dynamic_axes={"tokens": {0: "batch"}, "embeddings": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens = tiny.tokenize(["x", "a much longer prompt about a red car on a road", "itap of my dog", "b"])
    (got,) = session.run(None, {"tokens": tokens.numpy()})
    with torch.no_grad():
        expected = tiny(tokens).numpy()
    assert got.shape == (4, 64)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_image_encoder_any_size_and_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    encoder = FrozenCLIPImageEncoder("tiny", None)
    assert encoder.image_size == (64, 64) and encoder.embed_dim == 64
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training
    images = torch.rand(2, 3, 90, 120)
    with torch.no_grad():
        out = encoder(images)
    assert out.shape == (2, 64)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)

    path = tmp_path / "image_encoder.onnx"
    torch.onnx.export(
        encoder,
        (images,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["embeddings"],
        dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "embeddings": {0: "batch"}},
    )
    other = torch.rand(3, 3, 64, 70)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": other.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, encoder(other).numpy(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ loading errors


def test_unknown_model_name() -> None:
    with pytest.raises(UsageError, match="unknown CLIP model 'ViT-Q-99'.*ViT-B-32"):
        load_clip_model("ViT-Q-99", None)


def test_unknown_pretrained_tag() -> None:
    with pytest.raises(UsageError, match="unknown pretrained weights 'not-a-tag'.*openai"):
        load_clip_model("ViT-B-32", "not-a-tag")


def test_missing_and_corrupt_weights_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="missing.pt' does not exist"):
        load_clip_model("tiny", str(missing))
    with pytest.raises(CheckpointError, match="not a file"):
        load_clip_model("tiny", str(tmp_path))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_clip_model("tiny", str(corrupt))
    wrong = tmp_path / "wrong.pt"
    torch.save({"something": torch.zeros(3)}, wrong)
    with pytest.raises(CheckpointError, match="wrong.pt"):
        load_clip_model("tiny", str(wrong))


def test_tiny_weights_file_round_trip(tmp_path: Path) -> None:
    random_init = load_clip_model("tiny", None)
    path = tmp_path / "tiny.pt"
    torch.save(random_init.model.state_dict(), path)
    loaded = load_clip_model("tiny", str(path))
    assert loaded.is_pretrained and loaded.weights_source == f"file:{path.resolve()}"
    assert loaded.weights_sha256 == random_init.weights_sha256
    assert all(not p.requires_grad for p in loaded.model.parameters())


def test_unreachable_tag_without_allow_random_raises_fast(hermetic_offline: None) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="ViT-B-32/openai.*--clip-pretrained"):
        load_clip_model("ViT-B-32", "openai", allow_random=False)
    with pytest.raises(WeightsUnavailableError):
        FrozenCLIPTextEncoder("ViT-B-32", "openai", allow_random=False)
    # A hang guard, not a benchmark: the offline path must not wait on the network.
    assert time.monotonic() - start < 5


@pytest.mark.slow
def test_vit_b32_offline_falls_back_to_random_with_loud_warning(
    hermetic_offline: None, caplog: pytest.LogCaptureFixture
) -> None:
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vlexport"):
        with pytest.warns(RandomWeightsWarning, match="RANDOMLY INITIALISED"):
            encoder = FrozenCLIPTextEncoder("ViT-B-32", "openai", allow_random=True)
    assert time.monotonic() - start < 30  # hang guard (builds ViT-B-32 on CPU)
    assert any("!!! CLIP weights 'ViT-B-32/openai'" in r.getMessage() for r in caplog.records)
    assert not encoder.is_pretrained and encoder.weights_source == "random(seed=0)"
    assert encoder.pretrained == "openai" and encoder.embed_dim == 512
    result = build_text_embeddings(encoder, CLASSES, SINGLE_TEMPLATE, "single", cache=None)
    assert result.embeddings.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    # The cached random fallback still obeys allow_random=False.
    with pytest.raises(WeightsUnavailableError):
        load_clip_model("ViT-B-32", "openai", allow_random=False)


def test_trimmed_encoding_equals_the_full_forward():
    """encode() stops at the longest prompt's end-of-text token; that must not change anything."""
    from vlexport.models.clip.towers import FrozenCLIPTextEncoder

    enc = FrozenCLIPTextEncoder("tiny", None)
    texts = ["a photo of a dog.", "a bad photo of the traffic light with many words in it.", "x"]
    full = enc(enc.tokenize(texts))
    fast = enc.encode(texts)
    assert torch.allclose(full, fast, atol=1e-5)
