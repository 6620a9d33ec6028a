"""The cpu target's image input as uint8 pixels: the graph starts from the integer codes.

A YOLO-style INT8 graph quantises its float input ``x = pixel / 255`` with scale 1/255 and zero
point 0, so the first QuantizeLinear gives back the pixel values themselves: the runtime turns
uint8 pixels into floats only for the graph to turn them back (a pass over the whole image each
way). :func:`pixel_input` drops that QuantizeLinear and declares the input uint8, so the
runtime feeds the letterboxed pixels as they are. Exact: the codes are the ones the
QuantizeLinear computed. The graph records the input's quantisation in its metadata
(:data:`~vlexport.runtime.backends.onnxruntime.QUANTIZED_INPUTS_KEY`), so that a float feed
(a pre-processed tensor, the parity batches) is still accepted: the backend quantises it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from vlexport.runtime.backends.onnxruntime import QUANTIZED_INPUTS_KEY

__all__ = ["pixel_input"]


def _scalar(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            value = numpy_helper.to_array(init)
            return value if value.size == 1 else None
    return None


def pixel_input(model: onnx.ModelProto, name: str, pixel_step: float) -> dict[str, Any] | None:
    """Make float input ``name`` a uint8 input of pixel codes, when its only reader is a
    QuantizeLinear to uint8 with zero point 0 and scale ``pixel_step`` (the pre-processing's
    factor from a pixel to the float input, e.g. 1/255): the codes are then the pixels.

    Returns the input's quantisation (``{"scale", "zero_point"}``, also written to the model's
    metadata) or None when the graph does not start that way (left unchanged).
    """
    g = model.graph
    inputs = [i for i in g.input if i.name == name]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        return None
    readers = [n for n in g.node if name in n.input]
    outputs = {o.name for o in g.output}
    if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or name in outputs:
        return None
    q = readers[0]
    if len(q.input) < 3 or q.input[0] != name or q.output[0] in outputs:
        return None
    scale, zero = _scalar(g, q.input[1]), _scalar(g, q.input[2])
    if scale is None or zero is None or zero.dtype != np.uint8 or int(zero.ravel()[0]) != 0:
        return None
    if np.float32(scale.ravel()[0]) != np.float32(pixel_step):
        return None  # the codes would not be the pixels: keep quantising in the graph
    codes = q.output[0]
    g.node.remove(q)
    for node in g.node:
        for k, t in enumerate(node.input):
            if t == codes:
                node.input[k] = name
    inputs[0].type.tensor_type.elem_type = TensorProto.UINT8
    record = {"scale": float(np.float32(scale.ravel()[0])), "zero_point": 0}
    meta = {p.key: p.value for p in model.metadata_props}
    quantized = json.loads(meta.get(QUANTIZED_INPUTS_KEY, "{}"))
    quantized[name] = record
    onnx.helper.set_model_props(model, {**meta, QUANTIZED_INPUTS_KEY: json.dumps(quantized)})
    return record
