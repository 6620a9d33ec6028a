"""Rewrites of a QDQ graph after ``quantize_static``, and the graph walks the cpu target needs.

Pure onnx graph surgery (no onnxruntime): which nodes follow the last weighted layers, Q/DQ
round trips that give back the same integers, reductions and nearest upsampling done on the
integer codes, float inputs for excluded nodes, and the Q/DQ nodes left unread afterwards. :mod:`vlexport.calibration.quantize` applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

__all__ = ["tail_after_weighted", "tail_inputs", "drop_round_trips", "integer_reductions", "integer_upsampling",
           "restore_float_inputs", "prune_unused_qdq"]


def tail_after_weighted(m: onnx.ModelProto, weighted_ops: Sequence[str]) -> list[str]:
    """Names of the nodes no weighted layer reads from, directly or further down, in graph order.

    A weighted layer is a node of ``weighted_ops`` whose second input (the weights) is a constant:
    ``x @ W`` counts, ``MatMul(constant bins, softmax)`` and ``MatMul(q, k)`` do not. The
    weighted layers themselves are never in the list. Every node must have a name.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in m.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    constants = {i.name for i in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant"
                                                         for o in n.output}

    def weighted(node: onnx.NodeProto) -> bool:
        # A layer with weights: Conv/ConvTranspose/MatMul/Gemm whose second input is a constant
        # (a transformer's projections count; the DFL's MatMul(constant bins, softmax) does not).
        return node.op_type in weighted_ops and len(node.input) > 1 and node.input[1] in constants

    feeds_body: dict[str, bool] = {}
    # Reverse topological order: a node feeds the body when a consumer is a weighted layer or feeds one.
    for node in reversed(m.graph.node):
        feeds_body[node.name] = any(weighted(c) or feeds_body.get(c.name, False)
                                    for t in node.output for c in consumers.get(t, []))
    return [n.name for n in m.graph.node if not feeds_body[n.name] and not weighted(n)]


def tail_inputs(m: onnx.ModelProto, weighted_ops: Sequence[str]) -> set[str]:
    """The tensors the tail (:func:`tail_after_weighted`) reads from the body: where a float
    decoding takes over from the quantised layers (a detector's class and box maps)."""
    tail = set(tail_after_weighted(m, weighted_ops))
    produced_in_tail = {o for n in m.graph.node if n.name in tail for o in n.output}
    body_outputs = {o for n in m.graph.node if n.name not in tail for o in n.output}
    return {t for n in m.graph.node if n.name in tail for t in n.input
            if t in body_outputs and t not in produced_in_tail}


def drop_round_trips(model: onnx.ModelProto) -> int:
    """Remove ``DequantizeLinear → QuantizeLinear`` pairs that give back the same integers.

    A QuantizeLinear fed directly by a DequantizeLinear with the same scale, zero point and axis
    re-creates its input; its consumers read the DequantizeLinear's input instead, and the nodes
    left unread go. Returns how many QuantizeLinear nodes were bypassed.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}

    def same(a: str, b: str) -> bool:
        if a == b:
            return True
        if a not in inits or b not in inits:
            return False
        x, y = onnx.numpy_helper.to_array(inits[a]), onnx.numpy_helper.to_array(inits[b])
        return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))

    def attrs(n: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}

    rename: dict[str, str] = {}
    for q in graph.node:
        dq = producers.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if dq is None or dq.op_type != "DequantizeLinear" or q.output[0] in outputs:
            continue
        if len(q.input) < 3 or len(dq.input) < 3 or attrs(q) != attrs(dq):
            continue
        if same(q.input[1], dq.input[1]) and same(q.input[2], dq.input[2]):
            rename[q.output[0]] = dq.input[0]
    if not rename:
        return 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    prune_unused_qdq(graph)
    return len(rename)


def integer_reductions(model: onnx.ModelProto) -> int:
    """Let ``ReduceMax``/``ArgMax`` read the integers a DequantizeLinear would turn into floats.

    A per-tensor dequantisation with a positive scale is monotonic, so the maximum of the
    dequantised values is the dequantised maximum and the index of the maximum is the same:
    ``ArgMax(DQ(q)) = ArgMax(q)``, ``ReduceMax(DQ(q)) = DQ(ReduceMax(q))``, exactly. A detector's
    best class per anchor then reduces uint8 codes (a quarter of the bytes, and onnxruntime's
    layout optimiser can keep the channels-last tensor) and dequantises one value per anchor.
    Applies where every reader of the DequantizeLinear is such a reduction. Returns how many
    DequantizeLinear nodes were moved behind their reductions.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    outputs = {o.name for o in graph.output}
    moved = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        users = readers.get(dq.output[0], [])
        if not users or dq.output[0] in outputs or any(u.op_type not in ("ReduceMax", "ArgMax") for u in users):
            continue
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
        if scale is None or scale.size != 1 or float(scale.ravel()[0]) <= 0:
            continue  # per-channel or unknown scale: the order across channels is not the codes' order
        for u in users:
            u.input[0] = dq.input[0]
            if u.op_type == "ReduceMax":
                reduced = u.output[0] + "_q"
                after = onnx.helper.make_node("DequantizeLinear", [reduced, *dq.input[1:]], [u.output[0]],
                                              name=u.name + "_dq", **{a.name: onnx.helper.get_attribute_value(a)
                                                                      for a in dq.attribute})
                u.output[0] = reduced
                graph.node.insert(list(graph.node).index(u) + 1, after)
        graph.node.remove(dq)
        moved += 1
    return moved


def prune_unused_qdq(graph: onnx.GraphProto) -> None:
    """Drop the Q/DQ nodes nobody reads any more, and their scales and zero points."""
    freed: set[str] = set()
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            freed.update(n.input)
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name in freed and i.name not in used]:
        graph.initializer.remove(init)


def restore_float_inputs(model: onnx.ModelProto, excluded: set[str]) -> bool:
    """Feed excluded nodes their float inputs again; returns whether the graph changed.

    onnxruntime puts one Q/DQ pair on a tensor and rewires *every* consumer to the DQ output,
    so a node excluded from quantisation still read int8-rounded activations when it shares an
    input with a quantised node. Excluding a node must keep it entirely in float.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    changed = False
    for node in graph.node:
        if node.name not in excluded:
            continue
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                changed = True
    if changed:
        prune_unused_qdq(graph)
    return changed


def _constant_values(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return onnx.numpy_helper.to_array(n.attribute[0].t) if n.attribute[0].name == "value" else None
    return None


def _replication_factors(graph: onnx.GraphProto, resize: onnx.NodeProto, shape: list[int]) -> tuple[int, int] | None:
    """(kh, kw) when ``resize`` repeats each pixel kh x kw times (nearest, integer factors), else None."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in resize.attribute}
    mode = attrs.get("mode", b"nearest")
    coords = attrs.get("coordinate_transformation_mode", b"half_pixel")
    rounding = attrs.get("nearest_mode", b"round_prefer_floor")
    # asymmetric: the source of output x is x / k; floor and round-prefer-floor both give x // k.
    if mode != b"nearest" or coords != b"asymmetric" or rounding not in (b"floor", b"round_prefer_floor"):
        return None
    if len(shape) != 4 or any(d <= 0 for d in shape[1:]):
        return None
    scales = _constant_values(graph, resize.input[2]) if len(resize.input) > 2 and resize.input[2] else None
    sizes = _constant_values(graph, resize.input[3]) if len(resize.input) > 3 and resize.input[3] else None
    if scales is not None and scales.size == 4:
        factors = [float(s) for s in scales.ravel()]
    elif sizes is not None and sizes.size == 4:
        factors = [float(o) / i for o, i in zip(sizes.ravel()[1:], shape[1:])]
        factors = [1.0, *factors]
    else:
        return None
    if factors[:2] != [1.0, 1.0] or any(f < 1 or f != int(f) for f in factors[2:]):
        return None
    return int(factors[2]), int(factors[3])


def integer_upsampling(model: onnx.ModelProto) -> int:
    """Nearest upsampling by integer factors as byte copies of the uint8 codes, exactly.

    A ``DequantizeLinear → Resize(nearest) → QuantizeLinear`` with the same scale on both sides
    only repeats codes. onnxruntime's uint8 Resize is a generic per-element loop (about 1 ms for
    YOLOv8n's 40x40→80x80 map on 2 cores); the same repetition written channels-last as
    Concat·Reshape (each pixel copied kw times along a row, then each row kh times) is a handful
    of memcpys between the channels-last integer convolutions.
    Needs static C, H, W. Returns how many Resize nodes were rewritten.
    """
    from onnx import shape_inference

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    outputs = {o.name for o in graph.output}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
              for v in shape_inference.infer_shapes(model).graph.value_info}

    def same(a: str, b: str) -> bool:
        return a == b or (a in inits and b in inits and np.array_equal(onnx.numpy_helper.to_array(inits[a]),
                                                                         onnx.numpy_helper.to_array(inits[b])))

    rewritten, dropped_constants = 0, set()
    for resize in [n for n in graph.node if n.op_type == "Resize"]:
        dq = producers.get(resize.input[0])
        users = readers.get(resize.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1 or resize.output[0] in outputs:
            continue
        q = users[0]
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or len(dq.input) < 3:
            continue
        if not (same(q.input[1], dq.input[1]) and same(q.input[2], dq.input[2])):
            continue  # a real requantisation: leave it to onnxruntime
        shape = shapes.get(resize.input[0], [])
        factors = _replication_factors(graph, resize, shape)
        if factors is None:
            continue
        (kh, kw), (_, c, h, w) = factors, shape
        p = resize.name or resize.output[0]

        def const(suffix: str, values: list[int]) -> str:
            graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(values, np.int64), f"{p}_{suffix}"))
            return f"{p}_{suffix}"

        codes, make = dq.input[0], onnx.helper.make_node
        # Channels last, a pixel's C codes are contiguous: kw copies side by side along C are
        # the row with each pixel repeated, and kh copies of a row along W are the repeated rows.
        # The explicit transposes cancel against the ones onnxruntime puts around its
        # channels-last integer convolutions.
        chain = [
            make("Transpose", [codes], [f"{p}_nhwc"], name=f"{p}_nhwc", perm=[0, 2, 3, 1]),
            make("Concat", [f"{p}_nhwc"] * kw, [f"{p}_px_rep"], name=f"{p}_px_rep", axis=3),
            make("Reshape", [f"{p}_px_rep", const("row_shape", [0, h, w * kw, c])], [f"{p}_rows"], name=f"{p}_rows"),
            make("Concat", [f"{p}_rows"] * kh, [f"{p}_row_rep"], name=f"{p}_row_rep", axis=2),
            make("Reshape", [f"{p}_row_rep", const("shape", [0, h * kh, w * kw, c])], [f"{p}_up"], name=f"{p}_up"),
            make("Transpose", [f"{p}_up"], [q.output[0]], name=p, perm=[0, 3, 1, 2]),
        ]
        at = list(graph.node).index(resize)
        graph.node.remove(resize)
        graph.node.remove(q)
        dropped_constants.update(resize.input[1:])
        for k, node in enumerate(chain):
            graph.node.insert(at + k, node)
        rewritten += 1
    if rewritten:
        prune_unused_qdq(graph)
        used = {i for n in graph.node for i in n.input}
        for init in [i for i in graph.initializer if i.name not in used and i.name in dropped_constants]:
            graph.initializer.remove(init)
    return rewritten
