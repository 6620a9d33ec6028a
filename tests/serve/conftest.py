"""Real bundles for the serving tests: the runtime tests' tiny detector, a tiny binary segmenter,
and the exported tiny captioner; the shared photos as encoded bytes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

pytest.importorskip("tritonclient.grpc.model_config_pb2")

_spec = importlib.util.spec_from_file_location("vlexport_tests_runtime_helpers",
                                               Path(__file__).resolve().parents[1] / "runtime" / "conftest.py")
runtime_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runtime_helpers)
write_bundle = runtime_helpers.write_bundle
CLASSES = runtime_helpers.CLASSES

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", "/work/shared/assets"))
SEG_CLASSES = ["background", "bright"]


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def write_binary_segment_bundle(root: Path, size: int = 64, batch: int | str = "batch") -> Path:
    """A real multiscale-family bundle: logits = 10 * mean over channels - 5 (bright pixels are the object)."""
    root.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Constant", [], ["ten"], value=helper.make_tensor("ten_v", TensorProto.FLOAT, [], [10.0])),
        helper.make_node("Constant", [], ["five"], value=helper.make_tensor("five_v", TensorProto.FLOAT, [], [5.0])),
        helper.make_node("Mul", ["m", "ten"], ["m10"]),
        helper.make_node("Sub", ["m10", "five"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_binary",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1, size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(root / "segmenter.onnx"))
    manifest = {
        "schema": "vlexport.bundle/1", "family": "multiscale", "task": "segment", "preset": "tiny",
        "preprocess": {"size": [size, size], "resize": "letterbox", "pad_value": 0, "color": "RGB",
                       "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "vocabulary": {"classes": SEG_CLASSES},
        "parts": {"segmenter": {
            "inputs": [{"name": "images", "dtype": "float32", "shape": [batch, 3, size, size]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [batch, 1, size, size]}],
            "files": {"fp32": "segmenter.onnx"}, "engines": {}}},
        "postprocess": None,
        "segment": {"threshold": 0.5, "classes": SEG_CLASSES},
        "files": {"segmenter.onnx": _sha(root / "segmenter.onnx")},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture
def detect_bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "yolo-tiny")


@pytest.fixture
def segment_bundle(tmp_path: Path) -> Path:
    return write_binary_segment_bundle(tmp_path / "seg-tiny")


@pytest.fixture(scope="session")
def caption_bundle(tiny_caption_bundle: Path) -> Path:
    return tiny_caption_bundle


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """The shared photos' encoded bytes (JPEG and PNG), by file name."""
    folder = ASSETS / "images"
    if not (folder / "bus.jpg").is_file():
        pytest.skip(f"shared assets not found at {ASSETS} (set VLEXPORT_ASSETS)")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".png")}


def decoded(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
