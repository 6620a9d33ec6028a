"""Helpers of the serving tests, importable by name (``from serve_helpers import ...``): with
several conftest.py files in the tree, ``from conftest import`` could reach the wrong one."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

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


def decoded(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


HERE = Path(__file__).resolve().parent
WEIGHTS = ASSETS / "weights" / "yolov8n_coco.pt"
PHOTOS = ("bus.jpg", "zidane.jpg")
#: Model names in the session's repository.
YOLO, DETR = "yolo", "detr"


def env_root() -> Path:
    return Path(os.environ.get("VLEXPORT_TEST_TRITON_ENV") or Path.home() / ".cache" / "vlexport" / "triton-env-tests")


def write_repo(bundles: dict[str, Path], out: Path, **options) -> Path:
    """A python-layout repository of ``bundles`` (name -> bundle) written by the project's writer."""
    from vlexport.serve.repository import write_repository

    write_repository(list(bundles.values()), out, layout="python", names=list(bundles), **options)
    return out


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; /proc says which.
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False
