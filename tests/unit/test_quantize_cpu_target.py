"""The cpu INT8 target's graph as onnxruntime runs it: integer chains, float decoding, no round trips.

A small YOLO-like graph (Conv·SiLU, a C2f-style channel split into Slices and a Concat, MaxPool,
a 1x1 head conv, then decoding: Reshape, Sigmoid, ReduceMax) is quantised for the cpu target and
loaded by real onnxruntime; the optimised graph is inspected. No timing here (benchmarks/ has it).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlexport.calibration.profile import INTEGER_OPS, optimized_op_counts, profile_graph
from vlexport.calibration.qdq_passes import drop_round_trips, integer_reductions, tail_inputs
from vlexport.calibration.quantize import decoding_tail, quantize_int8
from vlexport.errors import SourceError


@pytest.fixture(scope="module")
def yolo_like(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)

    def w(name, shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    def const(name, values):
        return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)

    inits = [
        w("w1", (16, 3, 3, 3), 0.4), w("b1", (16,), 0.1), w("w2", (8, 8, 3, 3)), w("b2", (8,), 0.1),
        w("w3", (16, 24, 1, 1)), w("b3", (16,), 0.1), w("wh", (5, 16, 1, 1)), w("bh", (5,), 0.1),
        const("s0", [0]), const("s8", [8]), const("s16", [16]), const("ax1", [1]), const("shape", [1, 5, -1]),
    ]

    def silu(x, name):
        return [helper.make_node("Sigmoid", [x], [f"{name}_s"], name=f"{name}_sig"),
                helper.make_node("Mul", [x, f"{name}_s"], [f"{name}_y"], name=f"{name}_mul")]

    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        *silu("c1", "a1"),
        helper.make_node("Slice", ["a1_y", "s0", "s8", "ax1"], ["left"], name="split_left"),
        helper.make_node("Slice", ["a1_y", "s8", "s16", "ax1"], ["right"], name="split_right"),
        helper.make_node("Conv", ["right", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        *silu("c2", "a2"),
        helper.make_node("Concat", ["left", "right", "a2_y"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["c3"], name="conv3"),
        *silu("c3", "a3"),
        helper.make_node("MaxPool", ["a3_y"], ["pool"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["pool", "wh", "bh"], ["logits"], name="head"),
        helper.make_node("Reshape", ["logits", "shape"], ["flat"], name="flatten"),
        helper.make_node("ReduceMax", ["flat", "ax1"], ["best"], name="best", keepdims=0),
        helper.make_node("Sigmoid", ["best"], ["scores"], name="score"),
    ]
    graph = helper.make_graph(
        nodes, "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1024])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("cpu_target") / "yolo_like.onnx"
    onnx.save(model, str(path))
    return path


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"images": rng.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(n)]


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.fixture(scope="module")
def cpu_graph(yolo_like, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cpu_int8") / "yolo_like.int8.onnx"
    quantize_int8(yolo_like, out, _feeds(8, 0), method="minmax", target="cpu")
    return out


def test_decoding_tail_is_what_follows_the_last_convolution(yolo_like):
    assert decoding_tail(yolo_like) == ["flatten", "best", "score"]


def test_auto_ranges_keep_the_decodings_inputs_whole(yolo_like, tmp_path, monkeypatch):
    # The head's logits feed the float decoding: their rare high values are the best scores, so
    # `auto` never clips them. Here every tensor's histogram "prefers" a clip to its top half, so
    # all the inner tensors take it and only the decoding's input keeps min-max.
    from vlexport.calibration import ranges

    assert tail_inputs(onnx.load(str(yolo_like)), ["Conv"]) == {"logits"}

    def clip_top_half(h, **_):
        return ranges.RangeChoice(h.lowest, (h.lowest + h.highest) / 2, "percentile:50", 0.0, 1.0)

    monkeypatch.setattr(ranges, "choose_range", clip_top_half)
    feeds = _feeds(8, 0)
    auto = quantize_int8(yolo_like, tmp_path / "auto.onnx", feeds, method="auto", target="cpu").calibration
    minmax = quantize_int8(yolo_like, tmp_path / "mm.onnx", feeds, method="minmax", target="cpu").calibration
    assert "logits" not in auto.choices and auto.ranges["logits"] == pytest.approx(minmax.ranges["logits"])
    assert {"c1", "c3", "pool"} <= set(auto.choices)


def test_decoding_tail_keeps_weighted_matmuls_in_the_body():
    """An encoder whose last weighted layers are MatMuls (a transformer's projections) keeps them
    and everything before them in the body; a MatMul of two activations is not a weighted layer."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("wc", (8, 3, 4, 4)), ("w1", (8, 8)), ("w2", (8, 8)))]
    nodes = [
        helper.make_node("Conv", ["images", "wc"], ["patches"], name="embed", strides=[4, 4]),
        helper.make_node("Flatten", ["patches"], ["tokens"], name="flat", axis=2),
        helper.make_node("Transpose", ["tokens"], ["t"], name="tr", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "w1"], ["h"], name="proj1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["e"], name="proj2"),
        helper.make_node("Transpose", ["e"], ["et"], name="tr2", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["e", "et"], ["sim"], name="similarity"),
        helper.make_node("Softmax", ["sim"], ["out"], name="softmax"),
    ]
    graph = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert decoding_tail(model) == ["tr2", "similarity", "softmax"]


def test_cpu_target_writes_no_round_trips_and_keeps_the_decoding_float(cpu_graph):
    model = onnx.load(str(cpu_graph))
    onnx.checker.check_model(model, full_check=True)
    producers = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    # No QuantizeLinear reads a DequantizeLinear: nothing leaves int8 only to come back.
    assert not [q.name for q in model.graph.node if q.op_type == "QuantizeLinear"
                and producers.get(q.input[0]) is not None and producers[q.input[0]].op_type == "DequantizeLinear"]
    # The decoding reads float: the head's output is dequantised once, before the Reshape.
    for name in ("best", "score"):
        src = producers.get(by_name[name].input[0])
        assert src is not None and src.op_type not in ("DequantizeLinear", "QuantizeLinear"), name
    assert producers[by_name["flatten"].input[0]].op_type == "DequantizeLinear"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("flat", "best", "scores") for n in model.graph.node)
    # The channel split passes int8 through: each Slice reads a DQ and its output is quantised with the same scale.
    for name in ("split_left", "split_right"):
        dq = producers[by_name[name].input[0]]
        q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == by_name[name].output[0])
        assert dq.op_type == "DequantizeLinear" and q.input[1] == dq.input[1] and q.input[2] == dq.input[2]


def test_cpu_target_runs_as_integer_chains_after_onnxruntime_optimisation(yolo_like, cpu_graph):
    ops = optimized_op_counts(cpu_graph)
    # Every convolution and every SiLU runs on integer kernels; the split, concat and pool stay int8.
    assert ops.get("QLinearConv") == 4 and not ops.get("Conv") and not ops.get("FusedConv")
    assert ops.get("QLinearSigmoid") == 3 and ops.get("QLinearMul") == 3
    assert ops.get("QLinearConcat") == 1 and not ops.get("Concat")
    # onnxruntime merges the two int8 Slices into one Split, and MaxPool runs on uint8 in place.
    assert not ops.get("Mul") and not ops.get("Slice") and ops.get("Split") == 1 and ops.get("MaxPool") == 1
    # Q/DQ left: the image's QuantizeLinear and the head's DequantizeLinear, nothing in between.
    assert ops.get("QuantizeLinear") == 1 and ops.get("DequantizeLinear") == 1
    # The float decoding keeps its ops; only the final Sigmoid is float.
    assert ops.get("ReduceMax") == 1 and ops.get("Sigmoid") == 1
    # And it still computes what FP32 does.
    for feed in _feeds(3, 9):
        ref, got = _run(yolo_like, feed), _run(cpu_graph, feed)
        assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.98


def test_tensorrt_target_keeps_its_placement(yolo_like, tmp_path):
    out = tmp_path / "trt.onnx"
    res = quantize_int8(yolo_like, out, _feeds(4, 0), method="minmax", target="tensorrt")
    model = onnx.load(str(out))
    ops = Counter(n.op_type for n in model.graph.node)
    # Q/DQ on the weighted ops' inputs only: the four convs (activation + weight each); no Slice,
    # Sigmoid or Concat is quantised, and the activations are symmetric int8.
    assert res.quantized_nodes == ["conv1", "conv2", "conv3", "head"]
    assert ops["QuantizeLinear"] == 4 and ops["DequantizeLinear"] == 8
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert all(inits[n.input[2]].dtype == np.int8 for n in model.graph.node if n.op_type == "QuantizeLinear")


def test_drop_round_trips_removes_only_identity_pairs(tmp_path):
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(3, np.uint8), "z")
    other = numpy_helper.from_array(np.array(0.2, np.float32), "s2")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q0"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq0"),
        helper.make_node("QuantizeLinear", ["xd", "s", "z"], ["xq2"], name="q_same"),  # a round trip
        helper.make_node("QuantizeLinear", ["xd", "s2", "z"], ["xq3"], name="q_other"),  # a real requantisation
        helper.make_node("DequantizeLinear", ["xq2", "s", "z"], ["y"], name="dq1"),
        helper.make_node("DequantizeLinear", ["xq3", "s2", "z"], ["y2"], name="dq2"),
    ]
    graph = helper.make_graph(nodes, "rt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4])], [scale, zero, other])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    before = tmp_path / "before.onnx"
    onnx.save(model, str(before))
    assert drop_round_trips(model) == 1
    names = [n.name for n in model.graph.node]
    assert "q_same" not in names and "q_other" in names and "dq0" in names
    onnx.checker.check_model(model)
    after = tmp_path / "after.onnx"
    onnx.save(model, str(after))
    x = {"x": np.array([0.0, 0.13, -0.2, 5.0], np.float32)}
    for a, b in zip(ort.InferenceSession(str(before)).run(None, x), ort.InferenceSession(str(after)).run(None, x)):
        np.testing.assert_array_equal(a, b)


def test_integer_reductions_are_exact_and_skip_per_channel_scales(tmp_path):
    # Class maps [1, 5, 2, 3] as uint8 codes; the best class per cell from the codes themselves.
    scale = numpy_helper.from_array(np.array(0.25, np.float32), "s")
    zero = numpy_helper.from_array(np.array(7, np.uint8), "z")
    per_channel = numpy_helper.from_array(np.array([0.1, 0.3, 0.2, 0.5, 0.4], np.float32), "sc")
    zeros = numpy_helper.from_array(np.full(5, 7, np.uint8), "zc")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"], name="dq"),
        helper.make_node("ReduceMax", ["x", "axes"], ["best"], name="max", keepdims=0),
        helper.make_node("ArgMax", ["x"], ["which"], name="argmax", axis=1, keepdims=0),
        helper.make_node("DequantizeLinear", ["xq", "sc", "zc"], ["xc"], name="dq_channels", axis=1),
        helper.make_node("ReduceMax", ["xc", "axes"], ["best_c"], name="max_c", keepdims=0),
    ]
    out = [helper.make_tensor_value_info(n, t, [1, 2, 3]) for n, t in
           (("best", TensorProto.FLOAT), ("which", TensorProto.INT64), ("best_c", TensorProto.FLOAT))]
    graph = helper.make_graph(nodes, "red", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, 5, 2, 3])], out,
                              [scale, zero, per_channel, zeros, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    before = model.SerializeToString()
    assert integer_reductions(model) == 1  # the per-channel one is left alone: its codes do not order the values
    onnx.checker.check_model(model)
    by_name = {n.name: n for n in model.graph.node}
    assert "dq" not in by_name and by_name["argmax"].input[0] == "xq" and by_name["max"].input[0] == "xq"
    assert by_name["max_c"].input[0] == "xc"
    xq = {"xq": np.random.default_rng(0).integers(0, 256, (1, 5, 2, 3), dtype=np.uint8)}
    for a, b in zip(ort.InferenceSession(before).run(None, xq), ort.InferenceSession(model.SerializeToString()).run(None, xq)):
        np.testing.assert_array_equal(a, b)


def test_profile_graph_reports_integer_kernels_and_time_per_op(yolo_like, cpu_graph):
    feed = _feeds(1, 1)[0]
    fp32 = profile_graph(yolo_like, feed, threads=2, runs=3, warmup=1)
    int8 = profile_graph(cpu_graph, feed, threads=2, runs=3, warmup=1)
    assert fp32.integer_nodes == 0 and fp32.float_compute_nodes >= 4 and fp32.qdq_nodes == 0
    assert int8.integer_nodes >= 4 + 3 + 3 + 1 and int8.float_compute_nodes == 0
    assert set(int8.optimized_ops) & INTEGER_OPS >= {"QLinearConv", "QLinearSigmoid", "QLinearMul"}
    assert int8.by_op_type["QLinearConv"]["nodes"] == 4 and int8.by_op_type["QLinearConv"]["ms"] > 0
    assert abs(sum(v["share"] for v in int8.by_op_type.values()) - 1.0) < 1e-6
    assert int8.by_node and {"name", "op_type", "ms"} <= set(int8.by_node[0]) and int8.median_ms > 0
    json.dumps(int8.to_dict())
    with pytest.raises(SourceError, match="ONNX model not found"):
        profile_graph(cpu_graph.parent / "missing.onnx", feed)


def _upsampling_graph(mode: str = "nearest", out_scale: float = 0.25) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(0.25, np.float32), "s"),
             numpy_helper.from_array(np.array(out_scale, np.float32), "s_out"),
             numpy_helper.from_array(np.array(9, np.uint8), "z"),
             numpy_helper.from_array(np.array([1, 1, 2, 3], np.float32), "scales")]
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"], name="dq"),
        helper.make_node("Resize", ["x", "", "scales"], ["up"], name="up", mode=mode,
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("QuantizeLinear", ["up", "s_out", "z"], ["upq"], name="q"),
        helper.make_node("DequantizeLinear", ["upq", "s_out", "z"], ["y"], name="dq_out"),
    ]
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, 4, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 18])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_integer_upsampling_repeats_the_codes_exactly():
    from vlexport.calibration.qdq_passes import integer_upsampling

    model = _upsampling_graph()
    before = model.SerializeToString()
    assert integer_upsampling(model) == 1
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Resize"] == 0 and ops["QuantizeLinear"] == 0 and ops["Concat"] == 2
    assert "scales" not in {i.name for i in model.graph.initializer}
    xq = {"xq": np.random.default_rng(0).integers(0, 256, (1, 4, 5, 6), dtype=np.uint8)}
    want = ort.InferenceSession(before).run(None, xq)[0]
    got = ort.InferenceSession(model.SerializeToString()).run(None, xq)[0]
    assert got.shape == (1, 4, 10, 18)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode, out_scale", [("linear", 0.25), ("nearest", 0.5)])
def test_integer_upsampling_leaves_interpolation_and_requantisation_alone(mode, out_scale):
    from vlexport.calibration.qdq_passes import integer_upsampling

    model = _upsampling_graph(mode, out_scale)
    assert integer_upsampling(model) == 0
    assert [n.op_type for n in model.graph.node].count("Resize") == 1
