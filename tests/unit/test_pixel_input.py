"""The cpu target's uint8 pixel input: exact against the float-input graph, on real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlexport.calibration.pixel_input import pixel_input
from vlexport.calibration.quantize import quantize_int8
from vlexport.errors import UsageError
from vlexport.runtime.backends.onnxruntime import OrtBackend, quantize_feed
from vlexport.runtime.preprocess import Preprocessor

STEP = np.float32(1 / 255)


def _pixels(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8)
        p[0, 0, 0, :2] = (0, 255)  # the full pixel range, as any photo has
        out.append(p)
    return out


@pytest.fixture(scope="module")
def cpu_int8(tmp_path_factory) -> Path:
    """A Conv·SiLU graph on a [1, 3, 16, 16] image, quantised for the cpu target on pixel images."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    b = numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["images", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="/act/Sigmoid"),
             helper.make_node("Mul", ["c", "s"], ["y"], name="/act/Mul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], [w, b])
    d = tmp_path_factory.mktemp("pix")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(d / "fp32.onnx"))
    feeds = [{"images": p.astype(np.float32) * STEP} for p in _pixels(4, 1)]
    quantize_int8(d / "fp32.onnx", d / "int8.onnx", feeds, method="minmax", target="cpu")
    return d / "int8.onnx"


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_pixel_input_gives_the_float_graphs_outputs_exactly(cpu_int8, tmp_path):
    model = onnx.load(str(cpu_int8))
    record = pixel_input(model, "images", float(STEP))
    assert record == {"scale": float(STEP), "zero_point": 0}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert not [n for n in model.graph.node if "images" in n.input and n.op_type == "QuantizeLinear"]
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "pixels.onnx"))
    with OrtBackend(tmp_path / "pixels.onnx", providers=["CPUExecutionProvider"]) as backend:
        assert backend.quantized_inputs == {"images": (float(STEP), 0)}
        assert backend.inputs[0].dtype == "uint8"
        for p in _pixels(3, 7):
            x = p.astype(np.float32) * STEP  # what the runtime's float pre-processing gives
            expected = _run(cpu_int8, {"images": x})
            np.testing.assert_array_equal(_run(tmp_path / "pixels.onnx", {"images": p}), expected)
            # A float feed still works: the backend quantises it as the removed QuantizeLinear did.
            np.testing.assert_array_equal(backend.infer({"images": x})["y"], expected)
            np.testing.assert_array_equal(backend.infer({"images": p})["y"], expected)


def test_pixel_input_needs_the_pixel_step(cpu_int8):
    model = onnx.load(str(cpu_int8))
    before = model.SerializeToString()
    assert pixel_input(model, "images", 1 / 128) is None  # codes would not be the pixels
    assert pixel_input(model, "missing", float(STEP)) is None
    assert model.SerializeToString() == before


def test_preprocessor_pixels_are_the_codes_of_its_float_tensor(assets):
    frame = cv2.imread(str(assets / "images" / "bus.jpg"))  # 810x1080: letterboxed with padding
    floats = Preprocessor({"size": [320, 320]})
    pixels = Preprocessor({"size": [320, 320]})
    assert pixels.pixel_step == pytest.approx(1 / 255)
    pixels.emit_pixels()
    x, info = floats(frame)
    p, info_p = pixels(frame)
    assert p.dtype == np.uint8 and p.shape == x.shape == (1, 3, 320, 320) and info_p == info
    np.testing.assert_array_equal(p, quantize_feed(x, float(STEP), 0))
    assert (p[0, :, 0, 0] == 114).all()  # the padding


def test_normalised_preprocessing_has_no_pixel_form():
    pre = Preprocessor({"size": [64, 64], "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]})
    assert pre.pixel_step is None
    with pytest.raises(UsageError, match="no pixel form"):
        pre.emit_pixels()
