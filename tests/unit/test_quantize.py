"""INT8 QDQ quantisation: symmetric int8, per-channel weights, exclusions, activations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlexport.calibration.activations import activation_ranges, record_activations
from vlexport.calibration.quantize import (
    CALIB_METHODS,
    ArrayCalibrationReader,
    exclusion_candidates,
    list_quantizable_nodes,
    node_order,
    quantize_int8,
    quantized_node_names,
)
from vlexport.errors import SourceError, UsageError

C1, C2, K = 8, 16, 10


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory) -> Path:
    """images [N,3,32,32] → Conv → Relu → Conv(stride 2) → Sigmoid·x (SiLU) → GlobalAveragePool
    → Flatten → MatMul → Add → logits, plus a Gemm head on the same features."""
    rng = np.random.default_rng(0)

    def init(name, shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("w1", (C1, 3, 3, 3)), init("b1", (C1,), 0.1),
        init("w2", (C2, C1, 3, 3), 0.15), init("b2", (C2,), 0.1),
        init("wm", (C2, K)), init("bm", (K,), 0.1),
        init("wg", (4, C2)), init("bg", (4,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Sigmoid", ["c2"], ["s2"], name="sig2"),
        helper.make_node("Mul", ["c2", "s2"], ["a2"], name="silu2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "wm"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "bm"], ["logits"], name="add"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["box"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K]),
         helper.make_tensor_value_info("box", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("quant") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # Picture-like: smooth gradients plus noise in [0, 1], as a pre-processed image would be.
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 32
    out = []
    for _ in range(n):
        base = np.stack([xx * rng.uniform(0.2, 1), yy * rng.uniform(0.2, 1), (xx + yy) / 2])
        img = np.clip(base + rng.normal(0, 0.1, base.shape), 0, 1).astype(np.float32)
        out.append({"images": img[None]})
    return out


def _run(path: Path, feeds) -> list[list[np.ndarray]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("method", CALIB_METHODS)
def test_quantize_int8_gives_symmetric_per_channel_qdq_close_to_fp32(fp32_model, tmp_path, method):
    out = tmp_path / f"tiny.{method}.onnx"
    res = quantize_int8(fp32_model, out, _feeds(12, 0), method=method)
    assert res.path == out and out.is_file() and res.method == method and res.seconds > 0
    assert res.quantized_nodes == ["conv1", "conv2", "matmul", "gemm"] and res.excluded_nodes == []
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # nothing left beside it
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = _inits(model)
    # Symmetric: every zero point is an int8 zero (TensorRT's convention).
    zero_points = [n.input[2] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(inits[z].dtype == np.int8 and not inits[z].any() for z in zero_points)
    # Weights: int8 initialisers, one scale per output channel on the right axis; biases stay float.
    producers = {o: n for n in model.graph.node for o in n.output}
    expected = {"conv1": (1, 0, C1), "conv2": (1, 0, C2), "matmul": (1, 1, K), "gemm": (1, 0, 4)}
    for node in model.graph.node:
        if node.name in expected:
            index, axis, channels = expected[node.name]
            dq = producers[node.input[index]]
            assert dq.op_type == "DequantizeLinear"
            assert inits[dq.input[0]].dtype == np.int8
            attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
            assert attrs.get("axis") == axis and inits[dq.input[1]].shape == (channels,)
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input[2:])
    # Decoding-type ops are not quantised: no Q/DQ right after Sigmoid.
    assert not any(n.op_type == "QuantizeLinear" and producers.get(n.input[0]) is not None
                   and producers[n.input[0]].op_type == "Sigmoid" for n in model.graph.node)
    # Runs on the CPU provider, close to FP32 on inputs it was not calibrated on.
    test = _feeds(4, 99)
    for ref, got in zip(_run(fp32_model, test), _run(out, test)):
        for r, g in zip(ref, got):
            assert _cosine(r, g) > 0.99


def test_exclude_nodes_stay_float(fp32_model, tmp_path):
    out = tmp_path / "tiny.int8.onnx"
    res = quantize_int8(fp32_model, out, _feeds(6, 1), method="minmax", exclude_nodes=["matmul", "conv1"])
    assert res.excluded_nodes == ["matmul", "conv1"]
    assert res.quantized_nodes == ["conv2", "gemm"]
    model = onnx.load(str(out))
    assert quantized_node_names(model) == ["conv2", "gemm"]
    by_name = {n.name: n for n in model.graph.node}
    assert by_name["matmul"].input[1] == "wm" and by_name["conv1"].input[1] == "w1"  # float weights kept
    # Float activations too, although the Gemm beside the MatMul reads the same tensor quantised.
    assert by_name["matmul"].input[0] == "f" and by_name["conv1"].input[0] == "images"
    assert by_name["gemm"].input[0] != "f"
    onnx.checker.check_model(model)
    test = _feeds(3, 7)
    for ref, got in zip(_run(fp32_model, test), _run(out, test)):
        assert _cosine(ref[0], got[0]) > 0.99
    assert res.to_dict()["excluded_nodes"] == ["matmul", "conv1"]


def test_per_tensor_option(fp32_model, tmp_path):
    out = tmp_path / "pt.onnx"
    quantize_int8(fp32_model, out, _feeds(4, 2), method="minmax", per_channel=False)
    model = onnx.load(str(out))
    inits = _inits(model)
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert scales and all(s.size == 1 for s in scales)


def test_quantize_errors(fp32_model, tmp_path):
    out = tmp_path / "x.onnx"
    choices = r"choose one of \['minmax', 'entropy', 'percentile', 'auto'\]"
    with pytest.raises(UsageError, match=r"unknown calibration method 'kl'; " + choices):
        quantize_int8(fp32_model, out, _feeds(2, 0), method="kl")
    with pytest.raises(UsageError, match="INT8 needs calibration data: pass --calib SOURCE"):
        quantize_int8(fp32_model, out, [])
    with pytest.raises(UsageError, match="has no such node"):
        quantize_int8(fp32_model, out, _feeds(2, 0), exclude_nodes=["nope"])
    with pytest.raises(UsageError, match=r"input 0 has \['pixels'\], the model takes \['images'\]"):
        quantize_int8(fp32_model, out, [{"pixels": np.zeros((1, 3, 32, 32), np.float32)}])
    with pytest.raises(UsageError, match="cannot quantise op types"):
        quantize_int8(fp32_model, out, _feeds(2, 0), op_types=["Softmax"])
    with pytest.raises(SourceError, match="ONNX model not found"):
        quantize_int8(tmp_path / "missing.onnx", out, _feeds(2, 0))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_reader_and_graph_helpers(fp32_model):
    feeds = _feeds(5, 0)
    reader = ArrayCalibrationReader(feeds)
    assert len(reader) == 5 and len(list(reader)) == 5 and reader.get_next() is None
    reader.set_range(1, 3)
    assert [f["images"] is feeds[i]["images"] for i, f in zip((1, 2), reader)] == [True, True]
    assert [n for n, _ in list_quantizable_nodes(fp32_model)] == ["conv1", "conv2", "matmul", "gemm"]
    assert dict(list_quantizable_nodes(fp32_model))["gemm"] == "Gemm"
    assert exclusion_candidates(fp32_model) == ["gemm", "matmul", "conv2", "conv1"]
    order = node_order(fp32_model)
    assert order[0] == "conv1" and order[-1] == "gemm" and len(order) == 10


def test_record_activations_and_ranges(fp32_model):
    feeds = _feeds(3, 5)
    rec = record_activations(fp32_model, feeds, ["r1", "a2", "images", "logits"])
    assert set(rec) == {"r1", "a2", "images", "logits"}
    assert [a.shape for a in rec["r1"]] == [(1, C1, 32, 32)] * 3
    assert all(a.min() >= 0 for a in rec["r1"])  # a Relu output
    assert rec["images"][1] is feeds[1]["images"]
    for k, f in enumerate(feeds):
        np.testing.assert_allclose(rec["logits"][k], _run(fp32_model, [f])[0][0], rtol=1e-5, atol=1e-6)
    ranges = activation_ranges(fp32_model, feeds)
    assert {"c1", "r1", "c2", "s2", "a2", "p", "f", "mm", "logits", "box"} <= set(ranges)
    assert "images" not in ranges  # inputs are not activations
    assert ranges["r1"] == pytest.approx(max(float(np.abs(a).max()) for a in rec["r1"]))
    assert ranges["a2"] == pytest.approx(max(float(np.abs(a).max()) for a in rec["a2"]))
    assert 0 < ranges["s2"] <= 1.0  # a sigmoid
    with pytest.raises(UsageError, match="no tensor"):
        record_activations(fp32_model, feeds, ["nope"])
    with pytest.raises(UsageError, match="the model takes"):
        activation_ranges(fp32_model, [{"x": feeds[0]["images"]}])


def test_quantize_a_real_exported_detector(tiny_bundle, tmp_path):
    """The tiny KDEOV detector (backbone, heads, decoding, baked text similarity) quantises,
    passes the checker and runs, keeping its outputs' names, dtypes and shapes."""
    import json

    from vlexport.data.readers import synthetic_images
    from vlexport.runtime.preprocess import Preprocessor

    src = tiny_bundle / "detector.onnx"
    pre = Preprocessor(json.loads((tiny_bundle / "manifest.json").read_text())["preprocess"])
    feeds = [{"images": pre(img)[0]} for img in synthetic_images(6, seed=0)]
    out = tmp_path / "detector.int8.onnx"
    res = quantize_int8(src, out, feeds, method="percentile")
    assert res.quantized_nodes and set(res.quantized_nodes) <= {n for n, _ in list_quantizable_nodes(src)}
    onnx.checker.check_model(onnx.load(str(out)))
    ref, got = _run(src, feeds[:1])[0], _run(out, feeds[:1])[0]
    assert [(r.shape, r.dtype) for r in ref] == [(g.shape, g.dtype) for g in got]


def test_unnamed_nodes_get_stable_names(fp32_model, tmp_path):
    model = onnx.load(str(fp32_model))
    for n in model.graph.node:
        n.name = ""
    src = tmp_path / "unnamed.onnx"
    onnx.save(model, str(src))
    assert node_order(src)[:3] == ["Conv_0", "Relu_1", "Conv_2"]
    assert exclusion_candidates(src)[0] == "Gemm_9"
    res = quantize_int8(src, tmp_path / "q.onnx", _feeds(3, 0), method="minmax", exclude_nodes=["Gemm_9"])
    assert res.quantized_nodes == ["Conv_0", "Conv_2", "MatMul_7"] and res.excluded_nodes == ["Gemm_9"]
