import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vlexport.export.fp16 import convert_to_fp16


def _graph():
    # x @ W, then Softmax: the MatMul may go to fp16, the Softmax must stay fp32.
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_fp16_keeps_fp32_io_and_fragile_ops_and_runs_on_cpu(tmp_path):
    m32 = _graph()
    m16 = convert_to_fp16(m32)
    onnx.checker.check_model(m16)
    assert m16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert m16.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in m16.graph.initializer)
    # The Softmax's input comes through a Cast back to float32.
    softmax = next(n for n in m16.graph.node if n.op_type == "Softmax")
    producer = next(n for n in m16.graph.node if softmax.input[0] in n.output)
    assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    p32, p16 = (tmp_path / "a.onnx", tmp_path / "b.onnx")
    onnx.save(m32, p32)
    onnx.save(m16, p16)
    y32 = ort.InferenceSession(str(p32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y16 = ort.InferenceSession(str(p16), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y16.dtype == np.float32
    assert np.abs(y32 - y16).max() < 5e-3
    assert not np.allclose(y32, y16, atol=0, rtol=0)  # it really computed in fp16


def test_fp32_kept_nodes_talk_in_fp32_up_to_the_outputs(tmp_path):
    # x + 1000 → Softmax → y with the Add kept by name and the Softmax by op type: nothing computes in
    # FP16, so no value may be rounded to FP16 between them or before the output (the converter's
    # Cast-to-FP16-and-back pairs are bypassed).
    big = numpy_helper.from_array(np.array(1000.0, np.float32), "big")
    nodes = [helper.make_node("Add", ["x", "big"], ["h"], name="add"), helper.make_node("Softmax", ["h"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])], [big])
    m32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    m16 = convert_to_fp16(m32, keep_fp32_nodes=["add"])
    onnx.checker.check_model(m16)
    assert not any(n.op_type == "Cast" for n in m16.graph.node)
    x = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    p32, p16 = (tmp_path / "a.onnx", tmp_path / "b.onnx")
    onnx.save(m32, p32)
    onnx.save(m16, p16)
    y32 = ort.InferenceSession(str(p32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y16 = ort.InferenceSession(str(p16), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y16, y32)
