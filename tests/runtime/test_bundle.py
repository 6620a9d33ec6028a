"""A folder that is not a valid bundle is refused with a message naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import rewrite_manifest, write_bundle

import vlexport.runtime as vr
from vlexport.errors import BundleError


def test_folder_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "detector.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="has no manifest.json"):
        vr.load(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle not found"):
        vr.load(tmp_path / "nope")


def test_unknown_schema_names_it(bundle_dir: Path) -> None:
    rewrite_manifest(bundle_dir, schema="vlexport.bundle/99")
    with pytest.raises(BundleError) as e:
        vr.load(bundle_dir)
    assert "'vlexport.bundle/99'" in str(e.value)


def test_corrupt_manifest(bundle_dir: Path) -> None:
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        vr.load(bundle_dir)


def test_tampered_model_file(bundle_dir: Path) -> None:
    with open(bundle_dir / "detector.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match its sha256"):
        vr.load(bundle_dir)


def test_tampered_vocab_in_input_mode(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", vocab_mode="input")
    with open(root / "vocab.npz", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="'vocab.npz' does not match"):
        vr.load(root)


def test_path_escaping_the_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "x.onnx"
    outside.write_bytes((bundle_dir / "detector.onnx").read_bytes())
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["parts"]["detector"]["files"]["fp32"] = "../x.onnx"
    m["files"]["../x.onnx"] = m["files"]["detector.onnx"]
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="leaves the bundle folder"):
        vr.load(bundle_dir)


def test_absolute_path_is_refused(bundle_dir: Path) -> None:
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["parts"]["detector"]["files"]["fp32"] = str(bundle_dir / "detector.onnx")
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="must be relative"):
        vr.load(bundle_dir)


def test_unlisted_file_is_refused(bundle_dir: Path) -> None:
    m = json.loads((bundle_dir / "manifest.json").read_text())
    del m["files"]["detector.onnx"]
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not listed"):
        vr.load(bundle_dir)


def test_manifest_io_must_match_the_model(bundle_dir: Path) -> None:
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["parts"]["detector"]["inputs"][0]["name"] = "pixels"
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="declares inputs"):
        vr.load(bundle_dir)


def test_preprocess_size_must_match_the_model(bundle_dir: Path) -> None:
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["preprocess"]["size"] = [320, 320]
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="does not fit"):
        vr.load(bundle_dir)
