"""FP32 ONNX → FP16 ONNX with FP32 inputs/outputs and numerically fragile ops kept in FP32."""

from __future__ import annotations

import onnx

# Operations whose FP16 result overflows or loses too much precision: normalisations
# (sums of squares), softmax and exponentials, and the reductions/divisions of L2 norms.
FRAGILE_OPS = (
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
    "ReduceL2", "ReduceSumSquare", "ReduceMean", "ReduceSum",
    "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "Div", "Erf",
)


# Activations beyond this stay FP32: a quarter of FP16's largest finite value (65504), so that
# inputs brighter or busier than the ones measured still have headroom.
FP16_SAFE_MAX = 16384.0


def overflowing_nodes(fp32_path, feeds: list[dict]) -> list[str]:
    """Nodes whose output magnitude, measured on ``feeds`` through the FP32 graph, is unsafe in FP16."""
    from vlexport.calibration.quantize import activation_ranges

    ranges = activation_ranges(fp32_path, feeds)
    model = onnx.load(str(fp32_path), load_external_data=False)
    producer = {o: n.name for n in model.graph.node for o in n.output}
    return sorted({producer[t] for t, m in ranges.items() if t in producer and (m > FP16_SAFE_MAX or m != m)})


def convert_to_fp16(model: onnx.ModelProto, *, keep_fp32_ops: tuple[str, ...] = FRAGILE_OPS,
                    keep_fp32_nodes: list[str] | tuple[str, ...] = ()) -> onnx.ModelProto:
    """Convert weights and activations to FP16, keeping graph inputs/outputs, ``keep_fp32_ops``
    (by op type) and ``keep_fp32_nodes`` (by name, e.g. from :func:`overflowing_nodes`) in FP32.

    Uses onnxruntime's maintained converter, which inserts the Cast nodes at the FP16/FP32
    boundaries. The result runs on onnxruntime's CPU provider as well as on GPUs.
    """
    import logging

    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Its "initializer is used by both fp32 and fp16 nodes" notices list whole nodes: expected here
    # (kept-FP32 nodes share weights), so only its warnings and errors are shown.
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.WARNING)
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(keep_fp32_ops),
        node_block_list=list(keep_fp32_nodes),
        disable_shape_infer=False,
    )
    # When one tensor feeds several FP32-kept nodes, the converter inserts the same Cast once
    # per consumer (same name, same output): keep one of each.
    drop_duplicate_nodes(converted.graph)
    # It also appends its Cast nodes at the end of the node list; onnxruntime does not mind,
    # but the ONNX checker (and some TensorRT parsers) require topological order.
    topological_sort(converted.graph)
    return converted


def drop_duplicate_nodes(graph: onnx.GraphProto) -> None:
    """Remove exact duplicates (same op, inputs, outputs, attributes) of an earlier node."""
    seen: dict[tuple[str, ...], bytes] = {}
    kept = []
    for node in graph.node:
        key = tuple(node.output)
        blob = node.SerializeToString()
        if key in seen:
            if seen[key] != blob:
                raise ValueError(f"two different nodes produce {list(node.output)}")
            continue
        seen[key] = blob
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so that every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    produced_by_graph = {o for n in graph.node for o in n.output}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            # Inputs produced nowhere in this graph come from an outer scope: treat as available.
            if all(i in available or i not in produced_by_graph for i in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            raise ValueError("the graph has a cycle: cannot order its nodes")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
