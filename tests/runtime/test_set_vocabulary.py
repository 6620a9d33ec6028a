"""Changing a KDEOV bundle's vocabulary by class names alone, without torch.

The bundles are exported here with ``vlexport kdeov --preset tiny --vocab-mode input
--with-text-encoder`` (one with the ``single`` template, one with a 3-template file), all from one
saved student so that a bundle baked with the new vocabulary can be compared detection for detection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_bundle

from vlexport.errors import BundleError, UsageError
from vlexport.runtime import load
from vlexport.runtime.text_cache import TextEmbeddingCache
from vlexport.runtime.text_encoder import TextEncoder, templates_file_id

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
from click.testing import CliRunner  # noqa: E402

from vlexport.cli import cli  # noqa: E402

NEW = ["forklift", "pallet", "traffic cone"]
# Names a user may type: LVIS-style, punctuation, non-ASCII, one longer than the 77-token context.
HARD = ["aerosol can", "Band Aid", "bulletproof vest", "o'clock", "fish &amp; chips", "café crème",
        "Straßenbahn", "自行车", "🚲", "cafÃ© crÃ¨me", " ".join(["wooden", "pallet"] * 45)]
THREE_TEMPLATES = "a photo of a {}.\nthe {} in the picture\nitap of my {}.\n"


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """``single`` and ``three`` (--vocab-mode input --with-text-encoder), ``baked`` (NEW baked in), one student."""
    from vlexport.models.kdeov.checkpoint import save_kdeov_checkpoint
    from vlexport.models.kdeov.model import build_kdeov

    root = tmp_path_factory.mktemp("setvocab")
    torch.manual_seed(0)
    ckpt = save_kdeov_checkpoint(build_kdeov("tiny"), root / "student.pt")
    (root / "three.txt").write_text(THREE_TEMPLATES, encoding="utf-8")
    common = ["kdeov", "--preset", "tiny", "--checkpoint", str(ckpt)]
    old = os.environ.get("VLEXPORT_CACHE")
    os.environ["VLEXPORT_CACHE"] = str(root / "export-cache")  # the export's own cache (see the cache test)
    try:
        out = {}
        for name, extra in {
            "single": ["--vocab-mode", "input", "--with-text-encoder", "--templates", "single",
                       "--classes", "person,bus,car"],
            "three": ["--vocab-mode", "input", "--with-text-encoder", "--templates", str(root / "three.txt"),
                      "--classes", "person,bus"],
            "baked": ["--templates", "single", "--classes", ",".join(NEW)],
        }.items():
            r = _invoke(*common, *extra, "--out", str(root / name))
            assert r.exit_code == 0, r.output
            out[name] = root / name
    finally:
        if old is None:
            os.environ.pop("VLEXPORT_CACHE", None)
        else:
            os.environ["VLEXPORT_CACHE"] = old
    out["export_cache"] = root / "export-cache"
    out["templates_file"] = root / "three.txt"
    return out


def _reference(names: list[str], templates: str) -> np.ndarray:
    """The export-time bake: PyTorch's tiny text tower over the same templates."""
    from vlexport.models.clip.towers import FrozenCLIPTextEncoder
    from vlexport.models.clip.text import build_text_embeddings, resolve_templates

    templates_id, tpl = resolve_templates(templates)
    return build_text_embeddings(FrozenCLIPTextEncoder("tiny", None), names, tpl, templates_id).embeddings


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VLEXPORT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bundles_carry_their_templates_and_tokenizer_hashed(bundles):
    m = _manifest(bundles["three"])
    assert m["vocabulary"]["prompt_templates"] == ["a photo of a {}.", "the {} in the picture", "itap of my {}."]
    assert m["vocabulary"]["templates"] == templates_file_id(m["vocabulary"]["prompt_templates"])
    tok = m["text_tokenizer"]
    assert tok["type"] == "clip_bpe" and tok["context_length"] == 77
    assert tok["vocab"] in m["files"] and tok["merges"] in m["files"]
    assert m["parts"]["text_encoder"]["inputs"] == [{"name": "tokens", "dtype": "int64", "shape": ["prompts", "length"]}]
    assert _manifest(bundles["single"])["vocabulary"]["prompt_templates"] == ["a photo of a {}."]
    assert "text_tokenizer" not in _manifest(bundles["baked"])  # no text_encoder part, no tokenizer


@pytest.mark.parametrize("which", ["single", "three"])
def test_set_vocabulary_by_names_in_a_fresh_interpreter_never_imports_torch(bundles, which, tmp_path):
    out = tmp_path / "emb.npy"
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from vlexport.runtime import load
        task = load({str(bundles[which])!r}, precision="fp32", threads=1)
        task.set_vocabulary({NEW!r})
        task.detect(np.zeros((96, 160, 3), np.uint8))
        np.save({str(out)!r}, task.text_embeddings)
        bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.") or m.startswith("open_clip")]
        assert not bad, bad
        print(json.dumps({{"classes": task.classes, "runs": task.text_encoder.runs}}))
        task.close()
    """)
    env = {**os.environ, "VLEXPORT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"classes": NEW, "runs": 1}
    templates = "single" if which == "single" else str(bundles["templates_file"])
    np.testing.assert_allclose(np.load(out), _reference(NEW, templates), atol=1e-5)


@pytest.mark.parametrize("which", ["single", "three"])
def test_runtime_embeddings_equal_the_pytorch_bake(bundles, which, fresh_cache):
    templates = "single" if which == "single" else str(bundles["templates_file"])
    names = NEW + HARD + ["person"]
    with TextEncoder(bundles[which], threads=1, batch_size=4) as enc:  # small runs: several lengths
        got = enc.encode(names)
        assert enc.runs == -(-len(names) * len(enc.templates) // 4)
    assert got.shape == (len(names), 64) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, _reference(names, templates), atol=1e-5)
    # The bundle's own classes come out as its vocab.npz has them (baked by PyTorch at export).
    vocab = np.load(bundles[which] / "vocab.npz")
    with TextEncoder(bundles[which], cache=False) as enc:
        np.testing.assert_allclose(enc.encode([str(c) for c in vocab["classes"]]), vocab["embeddings"], atol=1e-5)


def test_detections_after_set_vocabulary_equal_a_bundle_baked_with_it(bundles, assets, fresh_cache):
    img = cv2.imread(str(assets / "images" / "bus.jpg"))
    swapped = load(bundles["single"], precision="fp32", threads=1, score_threshold=0.0)
    swapped.set_vocabulary(NEW)
    baked = load(bundles["baked"], precision="fp32", threads=1, score_threshold=0.0)
    got, want = swapped.detect(img), baked.detect(img)
    assert len(want) > 0 and swapped.classes == baked.classes == NEW
    assert got.labels == want.labels
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3)
    np.testing.assert_allclose(swapped.text_embeddings, np.load(bundles["baked"] / "vocab.npz")["embeddings"],
                               atol=1e-5)
    # Back to the bundle's own classes, by name.
    swapped.set_vocabulary(["person", "bus", "car"])
    np.testing.assert_allclose(swapped.text_embeddings, np.load(bundles["single"] / "vocab.npz")["embeddings"],
                               atol=1e-5)
    swapped.close()
    baked.close()


def test_the_on_device_cache_is_used_the_second_time(bundles, fresh_cache, monkeypatch):
    first = load(bundles["single"], precision="fp32", threads=1)
    first.set_vocabulary(NEW)
    assert first.text_encoder.runs == 1 and first.text_encoder.last["encoded"] == 3
    assert len(list((fresh_cache / "text").rglob("*.npy"))) == 3
    assert not list((fresh_cache / "text").rglob(".tmp-*"))
    emb = first.text_embeddings
    first.close()

    def no_text_encoder(self):
        raise AssertionError("the text encoder ran although every name was cached")

    monkeypatch.setattr(TextEncoder, "_load", no_text_encoder)
    second = load(bundles["single"], precision="fp32", threads=1)
    second.set_vocabulary(list(reversed(NEW)))
    assert second.text_encoder.runs == 0 and second.text_encoder.last == {
        "encoded": 0, "cached": 3, "prompts": 0, "seconds": second.text_encoder.last["seconds"]}
    np.testing.assert_array_equal(second.text_embeddings, emb[::-1])
    second.close()


def test_the_export_and_the_runtime_share_cache_keys(bundles, monkeypatch):
    # The export cached its classes' embeddings; the runtime finds them without running anything.
    monkeypatch.setattr(TextEncoder, "_load", lambda self: pytest.fail("the text encoder ran"))
    enc = TextEncoder(bundles["single"], cache=TextEmbeddingCache(bundles["export_cache"]))
    vocab = np.load(bundles["single"] / "vocab.npz")
    np.testing.assert_array_equal(enc.encode(["person", "bus", "car"]), vocab["embeddings"])
    assert enc.runs == 0


def test_entries_of_another_activation_or_weights_hash_are_not_served(bundles, tmp_path):
    te = _manifest(bundles["single"])["provenance"]["text_encoder"]
    model, sha, act = te["model"], te["weights_sha256"], te["activation"]
    other_act = {"gelu": "quickgelu", "quickgelu": "gelu"}[act]
    cache = TextEmbeddingCache(tmp_path)
    bogus = np.zeros(64, np.float32)
    bogus[0] = 1.0
    cache.put(model, sha, "single", "forklift", bogus, activation=other_act)
    cache.put(model, "0" * 64, "single", "forklift", bogus, activation=act)
    cache.put("ViT-B-32", sha, "single", "forklift", bogus, activation=act)
    cache.put(model, sha, "imagenet80", "forklift", bogus, activation=act)
    enc = TextEncoder(bundles["single"], cache=cache, threads=1)
    got = enc.encode(["forklift"])
    assert enc.runs == 1 and enc.last["encoded"] == 1
    np.testing.assert_allclose(got, _reference(["forklift"], "single"), atol=1e-5)
    # An entry under the bundle's own key is served (that is what the key is for).
    cache.put(model, sha, "single", "pallet", bogus, activation=act)
    np.testing.assert_array_equal(enc.encode(["pallet"]), bogus[None])
    assert enc.runs == 1
    enc.close()


def test_set_vocabulary_refuses_bundles_that_cannot(bundles, tmp_path, fresh_cache):
    baked = load(bundles["baked"], threads=1)
    with pytest.raises(UsageError, match="baked into the graph.*--vocab-mode input"):
        baked.set_vocabulary(["forklift"])
    baked.close()
    no_text = load(write_bundle(tmp_path / "fake", vocab_mode="input"), threads=1)
    with pytest.raises(UsageError, match="no 'text_encoder' part.*--with-text-encoder"):
        no_text.set_vocabulary(["forklift"])
    assert no_text.classes == ["person", "bus", "car"]  # unchanged
    no_text.close()
    task = load(bundles["single"], threads=1)
    for bad, msg in ((["a", "a"], "more than once"), ([], "empty"), (["ok", ""], "non-empty strings"),
                     ("forklift", "single string")):
        with pytest.raises(UsageError, match=msg):
            task.set_vocabulary(bad)
    assert task.classes == ["person", "bus", "car"]
    task.close()


def test_a_bundle_from_before_the_tokenizer_says_to_export_again(bundles, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(bundles["single"], copy)
    m = _manifest(copy)
    del m["text_tokenizer"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="older vlexport.*export it again"):
        TextEncoder(copy)


def test_cli_run_with_classes(bundles, assets, tmp_path, fresh_cache):
    jsonl = tmp_path / "out.jsonl"
    r = _invoke("run", str(bundles["single"]), "--classes", "forklift, pallet ,traffic cone",
                "--source", str(assets / "images" / "bus.jpg"), "--jsonl", str(jsonl),
                "--score-threshold", "0.0", "--precision", "fp32", "--threads", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    rec = json.loads(jsonl.read_text().splitlines()[0])
    labels = [d["label"] for d in rec["detections"]]
    assert labels and set(labels) <= set(NEW)
    # The same detections as the Python API after set_vocabulary.
    task = load(bundles["single"], precision="fp32", threads=1, score_threshold=0.0)
    task.set_vocabulary(NEW)
    want = task.detect(cv2.imread(str(assets / "images" / "bus.jpg")))
    assert labels == want.labels
    task.close()


def test_cli_run_with_classes_on_bundles_that_cannot(bundles, assets, tmp_path, fresh_cache):
    image = str(assets / "images" / "bus.jpg")
    for bundle, needle in ((bundles["baked"], "baked into the graph"),
                           (write_bundle(tmp_path / "fake", vocab_mode="input"), "no 'text_encoder' part")):
        r = _invoke("run", str(bundle), "--classes", "forklift", "--source", image, "--no-progress")
        assert r.exit_code == 1, r.output
        assert "Traceback" not in r.output and needle in r.output
        assert r.output.strip().count("\n") == 0, r.output
    r = _invoke("run", str(bundles["single"]), "--classes", " , ", "--source", image, "--no-progress")
    assert r.exit_code == 1 and "vocabulary is empty" in r.output


def test_ros2_vocabulary_path_without_torch(bundles, tmp_path):
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from vlexport.ros2 import VocabularyEncoder
        from vlexport.ros2.core import DetectorCore
        core = DetectorCore({str(bundles["three"])!r}, vocabulary=["forklift", "bus"], threads=1,
                            templates={str(bundles["templates_file"])!r})
        fields = core.process(np.zeros((96, 160, 3), np.uint8), "cam", (1, 2))
        labels = {{d["results"][0]["hypothesis"]["class_id"] for d in fields["detections"]}}
        assert labels <= {{"forklift", "bus"}}, labels
        enc = VocabularyEncoder({str(bundles["three"])!r})
        np.save({str(tmp_path / "ros.npy")!r}, enc.encode(["forklift", "bus"]))
        bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.") or m.startswith("open_clip")]
        assert not bad, bad
        print(json.dumps(core.classes))
        core.close()
        enc.close()
    """)
    env = {**os.environ, "VLEXPORT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["forklift", "bus"]
    np.testing.assert_allclose(np.load(tmp_path / "ros.npy"),
                               _reference(["forklift", "bus"], str(bundles["templates_file"])), atol=1e-5)


def test_ros2_templates_parameter_must_be_the_bundles(bundles, tmp_path):
    from vlexport.ros2 import VocabularyEncoder

    VocabularyEncoder(bundles["three"], templates=bundles["templates_file"]).close()  # the same file: fine
    other = tmp_path / "other.txt"
    other.write_text("a {}\n", encoding="utf-8")
    with pytest.raises(UsageError, match="exported with 'file:"):
        VocabularyEncoder(bundles["three"], templates=other)
