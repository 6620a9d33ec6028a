"""Tiny real ONNX graphs that implement the bundle contracts, and bundle folders around them.

The detector graph has fixed anchors whose boxes, scores and classes are known in advance, so a
test can compute the expected detections by hand:

* anchor 0 ("brightness"): its score is the mean of the input tensor (so batch order and the
  preprocessing can be checked), class 0;
* the other anchors: score and class come from ``features @ text_embeddings.T`` (max and argmax),
  which is what an open-vocabulary head computes; the text embeddings are a constant (vocab mode
  "baked") or the graph input ``text_embeddings`` (vocab mode "input").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", "/work/shared/assets"))
OPSET = 17

CLASSES = ["person", "bus", "car"]
DIM = 4
# Rows are class embeddings (one-hot, so an anchor feature's entry c is its score for class c).
TEXT_EMB = np.eye(len(CLASSES), DIM, dtype=np.float32)

# Anchors in model-input pixels for a 640x640 input. With bus.jpg (810x1080, w x h) the letterbox
# is r = 640/1080, resized 480x640, pad_x = 80, pad_y = 0, so source = (x - 80) * 1.6875, y * 1.6875.
ANCHOR_BOXES = np.array(
    [
        [500, 600, 520, 620],  # 0: brightness anchor
        [128, 64, 320, 320],  # 1: person 0.9 -> source [81, 108, 405, 540]
        [130, 66, 322, 322],  # 2: person 0.8, overlaps 1 (IoU ~0.97): suppressed
        [130, 66, 322, 322],  # 3: bus 0.7, same place, other class: kept unless class-agnostic
        [300, 400, 500, 600],  # 4: car 0.3: kept at 0.25, dropped at 0.5
        [0, 10, 100, 50],  # 5: car 0.6, starts in the left padding: clipped to x = 0
    ],
    dtype=np.float32,
)
ANCHOR_FEATS = np.array(
    [
        [0, 0, 0, 0],
        [0.9, 0, 0, 0],
        [0.8, 0, 0, 0],
        [0, 0.7, 0, 0],
        [0, 0, 0.3, 0],
        [0, 0, 0.6, 0],
    ],
    dtype=np.float32,
)


def _const(name: str, arr: np.ndarray) -> Any:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr), name=name + "_v"))


def make_detector(
    path: Path,
    size: tuple[int, int] = (640, 640),
    *,
    batch: int | str = "batch",
    text_input: bool = False,
    text_emb: np.ndarray = TEXT_EMB,
    boxes: np.ndarray = ANCHOR_BOXES,
    feats: np.ndarray = ANCHOR_FEATS,
    tag: str = "",
) -> Path:
    """Write a detector ONNX graph (contract: images -> boxes, scores, class_ids)."""
    a = boxes.shape[0]
    onehot0 = np.zeros((1, a), np.float32)
    onehot0[0, 0] = 1
    nodes = [
        _const("anchor_boxes", boxes[None]),
        _const("feats", feats),
        _const("onehot0", onehot0),
        _const("not0", 1 - onehot0),
        _const("zero", np.array(0, np.float32)),
        _const("ax0", np.array([0], np.int64)),
        _const("ax1", np.array([1], np.int64)),
        _const("ax12", np.array([1, 2], np.int64)),
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=0),  # [B]
        helper.make_node("Mul", ["m", "zero"], ["mz"]),
        helper.make_node("Unsqueeze", ["mz", "ax12"], ["mz3"]),  # [B,1,1]
        helper.make_node("Add", ["anchor_boxes", "mz3"], ["boxes"]),  # [B,A,4]
        helper.make_node("Transpose", ["text"], ["text_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["feats", "text_t"], ["logits"]),  # [A,C]
        helper.make_node("ReduceMax", ["logits"], ["best"], axes=[1], keepdims=0),  # [A]
        helper.make_node("ArgMax", ["logits"], ["cls64"], axis=1, keepdims=0),  # [A]
        helper.make_node("Unsqueeze", ["best", "ax0"], ["best2"]),  # [1,A]
        helper.make_node("Mul", ["best2", "not0"], ["base"]),
        helper.make_node("Unsqueeze", ["m", "ax1"], ["m2"]),  # [B,1]
        helper.make_node("Mul", ["m2", "onehot0"], ["bright"]),  # [B,A]
        helper.make_node("Add", ["base", "bright"], ["scores"]),
        helper.make_node("Cast", ["cls64"], ["clsf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["clsf", "ax0"], ["clsf2"]),
        helper.make_node("Unsqueeze", ["mz", "ax1"], ["mz2"]),
        helper.make_node("Add", ["clsf2", "mz2"], ["clsb"]),
        helper.make_node("Cast", ["clsb"], ["class_ids"], to=TensorProto.INT32),
    ]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size[0], size[1]])]
    if text_input:
        nodes.insert(0, helper.make_node("Identity", ["text_embeddings"], ["text"]))
        inputs.append(
            helper.make_tensor_value_info("text_embeddings", TensorProto.FLOAT, ["num_classes", text_emb.shape[1]])
        )
    else:
        nodes.insert(0, _const("text", text_emb))
    outputs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, a, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, a]),
        helper.make_tensor_value_info("class_ids", TensorProto.INT32, [batch, a]),
    ]
    graph = helper.make_graph(nodes, "tiny_detector", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vlexport-tests")
    model.ir_version = 8
    model.doc_string = tag  # makes the per-precision files differ (distinct hashes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


ENC_W = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], np.float32)  # [3, D=3]
ENC_B = np.array([0.1, 0.2, 0.3], np.float32)


def make_encoder(path: Path, size: tuple[int, int] = (640, 640)) -> Path:
    """Write an image encoder graph: embeddings = normalize(mean_hw(images) @ W + b)."""
    nodes = [
        _const("w", ENC_W),
        _const("b", ENC_B),
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[2, 3], keepdims=0),  # [B,3]
        helper.make_node("MatMul", ["m", "w"], ["x"]),
        helper.make_node("Add", ["x", "b"], ["y"]),
        helper.make_node("LpNormalization", ["y"], ["embeddings"], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size[0], size[1]])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", ENC_W.shape[1]])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


_PREC_FILE = {"fp32": "detector.onnx", "fp16": "detector.fp16.onnx", "int8": "detector.int8.onnx"}


def write_bundle(
    root: Path,
    *,
    size: tuple[int, int] = (640, 640),
    precisions: Sequence[str] = ("fp32",),
    vocab_mode: str = "baked",
    classes: Sequence[str] = CLASSES,
    batch: int | str = "batch",
    encoder: bool = False,
    task: str = "detect",
    postprocess: dict[str, Any] | None = None,
    manifest_patch: dict[str, Any] | None = None,
) -> Path:
    """Write a real bundle folder (ONNX files, vocab.npz, manifest.json with sha256s) and return it."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    parts: dict[str, Any] = {}
    text_input = vocab_mode == "input"
    h, w = size
    det_in = [{"name": "images", "dtype": "float32", "shape": [batch, 3, h, w]}]
    if text_input:
        det_in.append({"name": "text_embeddings", "dtype": "float32", "shape": ["num_classes", DIM]})
    if task == "detect":
        det_files = {}
        for p in precisions:
            name = _PREC_FILE[p]
            make_detector(root / name, size, batch=batch, text_input=text_input, tag=p)
            det_files[p] = name
            files[name] = _sha(root / name)
        parts["detector"] = {
            "inputs": det_in,
            "outputs": [
                {"name": "boxes", "dtype": "float32", "shape": [batch, "anchors", 4]},
                {"name": "scores", "dtype": "float32", "shape": [batch, "anchors"]},
                {"name": "class_ids", "dtype": "int32", "shape": [batch, "anchors"]},
            ],
            "files": det_files,
            "engines": {},
        }
    if encoder or task == "embed":
        make_encoder(root / "image_encoder.onnx", size)
        files["image_encoder.onnx"] = _sha(root / "image_encoder.onnx")
        parts["image_encoder"] = {
            "inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", 3, h, w]}],
            "outputs": [{"name": "embeddings", "dtype": "float32", "shape": ["batch", ENC_W.shape[1]]}],
            "files": {"fp32": "image_encoder.onnx"},
            "engines": {},
        }
    np.savez(root / "vocab.npz", classes=np.array(list(classes)), embeddings=TEXT_EMB[: len(classes)])
    files["vocab.npz"] = _sha(root / "vocab.npz")
    manifest = {
        "schema": "vlexport.bundle/1",
        "family": "tiny",
        "task": task,
        "preset": "tiny",
        "preprocess": {
            "size": [h, w],
            "resize": "letterbox",
            "pad_value": 114,
            "color": "RGB",
            "scale": 1 / 255,
            "mean": [0, 0, 0],
            "std": [1, 1, 1],
        },
        "vocabulary": {"classes": list(classes), "templates": "none", "mode": vocab_mode, "file": "vocab.npz"},
        "parts": parts,
        "postprocess": postprocess
        or {"score_threshold": 0.25, "iou_threshold": 0.5, "max_detections": 300, "class_agnostic": False},
        "files": files,
    }
    if manifest_patch:
        manifest.update(manifest_patch)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def rewrite_manifest(root: Path, **changes: Any) -> None:
    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"assets folder {ASSETS} not found (set VLEXPORT_ASSETS)")
    return ASSETS


@pytest.fixture
def car_video(assets: Path) -> Path:
    path = assets / "video" / "car-detection.mp4"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture
def bus(assets: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(assets / "images" / "bus.jpg"))
    assert img is not None
    return img


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle")
