"""FP32 ONNX → FP16 ONNX with FP32 inputs/outputs and numerically fragile ops kept in FP32, and the
search for the FP32 islands an FP16 graph that fails its checks needs."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger("vlexport")

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
    from vlexport.calibration.activations import activation_ranges

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
    # Between two FP32-kept nodes it routes the tensor through FP16 (a Cast to FP16, then one back):
    # that rounding is what keeping them was meant to avoid, so the FP32 consumer gets the FP32 tensor.
    bypass_fp16_round_trips(converted.graph)
    # It also appends its Cast nodes at the end of the node list; onnxruntime does not mind,
    # but the ONNX checker (and some TensorRT parsers) require topological order.
    topological_sort(converted.graph)
    return converted


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def bypass_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Where an FP32 tensor goes through Cast(→FP16) and Cast(→FP32), feed the consumers of the second
    Cast the FP32 tensor itself (a graph output: through an Identity instead of the second Cast), and
    drop the Casts nobody reads any more. Returns the pairs bypassed."""
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    elem.update({t.name: t.data_type for t in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "Cast" and _cast_to(n) is not None:
            elem[n.output[0]] = _cast_to(n)
    outputs = {o.name for o in graph.output}
    replace: dict[str, str] = {}
    identities = 0
    for k, node in enumerate(graph.node):
        if node.op_type != "Cast" or _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if (first is None or first.op_type != "Cast" or _cast_to(first) != onnx.TensorProto.FLOAT16
                or elem.get(first.input[0]) != onnx.TensorProto.FLOAT):
            continue
        if node.output[0] in outputs:  # keep the output's name: an Identity of the FP32 tensor
            graph.node[k].CopyFrom(onnx.helper.make_node("Identity", [first.input[0]], list(node.output),
                                                         name=node.name))
            identities += 1
        else:
            replace[node.output[0]] = first.input[0]
    if not replace and not identities:
        return 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in replace:
                node.input[k] = replace[name]
    while True:  # Casts whose outputs nobody reads
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    return len(replace) + identities


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


# -- the FP32 island search ---------------------------------------------------------------------------
# When the FP16 graph fails its part's FP16 checks, the nodes whose FP16 error matters most are kept in
# FP32 and the graph is converted again, round after round (the INT8 accuracy gate does the same for its
# exclusions, vlexport.calibration.gate). Round 1 keeps the outputs' decoding tail and at least
# FP16_FIRST_FRACTION of the converted nodes; each later round at least doubles the kept set, chosen by
# errors measured again on the graph of the previous round.
FP16_SEARCH_ROUNDS = 6
FP16_FIRST_FRACTION = 0.01
#: How many computing nodes up an island may reach from the node that amplifies the error.
FP16_ISLAND_LEVELS = 4
#: Feeds the per-node errors are measured on (the first of the parity feeds): enough to rank nodes.
FP16_PROBE_FEEDS = 2


def _nodes_and_producers(model: onnx.ModelProto) -> tuple[dict[str, onnx.NodeProto], dict[str, str]]:
    by_name = {n.name: n for n in model.graph.node}
    producer = {o: n.name for n in model.graph.node for o in n.output if o}
    return by_name, producer


def fp32_node_names(model: onnx.ModelProto, keep_fp32_ops: tuple[str, ...] = FRAGILE_OPS,
                    keep_fp32_nodes: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The nodes of the FP32 graph that :func:`convert_to_fp16` leaves in FP32 (by op type or by name)."""
    named = set(keep_fp32_nodes)
    return [n.name for n in model.graph.node if n.op_type in keep_fp32_ops or n.name in named]


def fp16_node_errors(fp32_path, fp16_path, feeds: list[dict]) -> dict[str, float]:
    """Relative L2 error (FP16 graph against FP32 graph) of every float tensor a node of the FP32 graph
    produces that the FP16 graph still has, accumulated over ``feeds``; inf where FP16 is not finite."""
    from vlexport.calibration.activations import _run_each, _session_with_outputs

    sess32, names32 = _session_with_outputs(fp32_path, None)
    m16 = onnx.load(str(fp16_path), load_external_data=False)
    present = {o for n in m16.graph.node for o in n.output}
    names = [t for t in names32 if t in present]
    sess16, _ = _session_with_outputs(fp16_path, names)
    err: dict[str, float] = {}
    ref: dict[str, float] = {}
    for feed in feeds:
        v32 = next(_run_each(sess32, names, [feed]))
        v16 = next(_run_each(sess16, names, [feed]))
        for t in names:
            a, b = v32.get(t), v16.get(t)
            if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) or a.dtype.kind != "f" or a.shape != b.shape:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if not np.isfinite(b64).all():
                err[t] = float("inf")
                ref[t] = ref.get(t, 0.0) + float(np.sum(a64 * a64))
                continue
            err[t] = err.get(t, 0.0) + float(np.sum((a64 - b64) ** 2))
            ref[t] = ref.get(t, 0.0) + float(np.sum(a64 * a64))
        del v32, v16
    return {t: (float("inf") if math.isinf(e) else math.sqrt(e / max(ref[t], 1e-30)) if e > 0 else 0.0)
            for t, e in err.items()}


def amplification_order(fp32_model: onnx.ModelProto, errors: dict[str, float]) -> list[tuple[str, float]]:
    """Nodes, the ones that add the most FP16 error first: (name, added error), where the added error
    is the relative error of the node's output minus the largest of its inputs' (a node that turns
    small input errors into a large output error — a cancellation, a softmax of large logits — comes
    first; ties: nodes nearer the outputs first). Nodes already in FP32 are ranked too: what they
    amplify is the FP16 rounding of their inputs, which their island (:func:`fp32_island`) removes."""
    order = []
    for pos, node in enumerate(fp32_model.graph.node):
        outs = [errors[o] for o in node.output if o in errors]
        if not outs:
            continue
        ins = [errors[i] for i in node.input if i in errors]
        out_err, in_err = max(outs), max(ins, default=0.0)
        added = float("inf") if math.isinf(out_err) and not math.isinf(in_err) else out_err - in_err
        if math.isnan(added):
            added = 0.0
        order.append((node.name, added, pos))
    order.sort(key=lambda x: (-x[1], -x[2]))
    return [(n, a) for n, a, _ in order]


# Ops that only move or select values: FP16 rounds their float inputs without computing anything, so an
# island reaches through them to the node that computed the values.
MOVEMENT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice", "Gather",
                "Split", "Identity", "Expand", "Tile", "Pad")


def fp32_island(fp32_model: onnx.ModelProto, name: str, fp32_nodes: set[str], levels: int = 1) -> list[str]:
    """A node and the nodes that compute its float inputs, ``levels`` computing nodes up (value-moving
    ops such as Reshape or Transpose in between do not count): keeping only the node in FP32 would still
    feed it FP16-rounded values. Nodes already in ``fp32_nodes`` are passed through but not listed."""
    by_name, producer = _nodes_and_producers(fp32_model)
    island = [] if name in fp32_nodes else [name]
    stack = [(t, 1) for t in by_name[name].input]
    seen = {name}
    while stack:
        t, level = stack.pop()
        p = producer.get(t)
        if p is None or p in seen:
            continue
        seen.add(p)
        if p not in fp32_nodes:
            island.append(p)
        moves = by_name[p].op_type in MOVEMENT_OPS
        if moves or level < levels:
            stack.extend((i, level if moves else level + 1) for i in by_name[p].input)
    return island


# Ops that carry a model's weights and its compute: the output tail stops before them.
HEAVY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "Attention", "MultiHeadAttention")


def output_tail(fp32_model: onnx.ModelProto) -> list[str]:
    """The nodes between the graph outputs and the last convolution or matrix product before them:
    decoding (a sigmoid, box conversion, scaling to pixels), whose FP16 rounding lands on the outputs
    unchanged and which cost next to nothing in FP32. The first round of the search keeps them."""
    by_name, producer = _nodes_and_producers(fp32_model)
    tail: list[str] = []
    stack = [o.name for o in fp32_model.graph.output]
    seen: set[str] = set()
    while stack:
        p = producer.get(stack.pop())
        if p is None or p in seen:
            continue
        seen.add(p)
        if by_name[p].op_type in HEAVY_OPS:
            continue
        tail.append(p)
        stack.extend(by_name[p].input)
    position = {n.name: i for i, n in enumerate(fp32_model.graph.node)}
    return sorted(tail, key=position.get)


@dataclass
class IslandSearch:
    """What :func:`search_fp32_islands` found: the node names kept in FP32, the rounds, the last violations."""

    kept_nodes: list[str]
    island_nodes: list[str]
    rounds: list[dict]
    violations: list[str]

    @property
    def passed(self) -> bool:
        return not self.violations


def search_fp32_islands(
    fp32_path, fp16_path, feeds: list[dict], evaluate: Callable[[Path], tuple[dict, list[str]]], *,
    kept: list[str] | tuple[str, ...] = (), first: tuple[dict, list[str]] | None = None,
    keep_fp32_ops: tuple[str, ...] = FRAGILE_OPS, max_rounds: int = FP16_SEARCH_ROUNDS, label: str = "fp16",
) -> IslandSearch:
    """Keep FP32 islands in the FP16 graph at ``fp16_path`` until ``evaluate`` finds no violation.

    ``fp16_path`` holds the conversion with ``kept`` nodes in FP32 (by name, besides ``keep_fp32_ops``);
    ``evaluate(fp16_path) -> (figures, violations)`` is the part's FP16 check, and ``first`` its result
    on that conversion when already known. The first round keeps the outputs' decoding tail
    (:func:`output_tail`) and at least one island; each round measures every node's added FP16 error
    (:func:`fp16_node_errors` on ``feeds``, :func:`amplification_order`), keeps the worst ones with their
    producers (:func:`fp32_island`) until the searched nodes reach FP16_FIRST_FRACTION * 2**(r-1) of the
    converted ones and at least twice the previous round's, converts again into ``fp16_path`` and
    evaluates it, up to ``max_rounds`` rounds. ``evaluate`` decides; this only chooses what to try.
    """
    fp32_model = onnx.load(str(fp32_path))
    kept = list(dict.fromkeys(kept))
    figures, violations = first if first is not None else evaluate(Path(fp16_path))
    all_fp32 = set(fp32_node_names(fp32_model, keep_fp32_ops, kept))
    rounds = [{"round": 0, "kept_nodes": len(kept), "fp32_nodes": len(all_fp32), "passed": not violations,
               **figures, "violations": list(violations)}]
    islands: list[str] = []
    candidates = len(fp32_model.graph.node) - len(all_fp32)
    base = max(1, math.ceil(FP16_FIRST_FRACTION * max(candidates, 1)))
    r = 0
    while violations and r < max_rounds:
        r += 1
        fp32_nodes = set(fp32_node_names(fp32_model, keep_fp32_ops, kept + islands))
        errors = fp16_node_errors(fp32_path, fp16_path, feeds)
        order = amplification_order(fp32_model, errors)
        # The searched set (at least) doubles each round: FP16_FIRST_FRACTION of the nodes, then 2x, 4x …
        target = max(1, max(base * 2 ** (r - 1), 2 * len(islands)) - len(islands))
        added: list[str] = []
        if r == 1:  # the outputs' decoding tail first (cheap in FP32, its rounding hits the outputs directly)
            added += [n for n in output_tail(fp32_model) if n not in fp32_nodes]
            fp32_nodes.update(added)
            target = max(target, len(added) + 1)
        for name, _ in order:
            if len(added) >= target:
                break
            # A node that still adds the most error once its island runs in FP32 gets a deeper island.
            for levels in range(1, FP16_ISLAND_LEVELS + 1):
                new = [n for n in fp32_island(fp32_model, name, fp32_nodes, levels) if n not in fp32_nodes]
                if new:
                    break
            added += new
            fp32_nodes.update(new)
        if not added:
            break  # every node already runs in FP32
        islands += added
        worst = ", ".join(f"{n} ({e:.3g})" for n, e in order[:3])
        log.info("%s: round %d keeps %d more node(s) in FP32 (%d by name in all; worst: %s)…",
                 label, r, len(added), len(kept) + len(islands), worst)
        onnx.save(convert_to_fp16(onnx.load(str(fp32_path)), keep_fp32_ops=keep_fp32_ops,
                                  keep_fp32_nodes=kept + islands), str(fp16_path))
        figures, violations = evaluate(Path(fp16_path))
        rounds.append({"round": r, "kept_nodes": len(kept) + len(islands), "fp32_nodes": len(fp32_nodes),
                       "passed": not violations, **figures, "violations": list(violations),
                       "added_nodes": len(added)})
        log.info("%s: round %d %s", label, r, "passes" if not violations else "still fails: " + "; ".join(violations))
    return IslandSearch(kept_nodes=kept + islands, island_nodes=islands, rounds=rounds, violations=list(violations))
