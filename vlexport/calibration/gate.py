"""The accuracy gate: INT8 may lose at most ``--max-drop`` points of the task metric against FP32.

When it loses more, the most sensitive nodes are kept in higher precision and the part is
quantised again, round after round, until the drop is within budget or the gate gives up and
says so with the figures. Sensitivity is measured per node as the error each quantised node
*adds* to what it receives (1 − cosine of its output in the INT8 graph against FP32, minus
the worst error among its quantised ancestors), on a few calibration images. The first round
keeps the decoding (each head's last layer and what follows, :func:`decoding_nodes`) in higher
precision, the next ones more of the detection heads (:func:`head_nodes`), most sensitive
first, then the most sensitive of the remaining nodes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from vlexport.errors import ExportError, UsageError

log = logging.getLogger("vlexport")

# Successive rounds keep more nodes in higher precision: first growing fractions of the head
# nodes (most sensitive first), then all heads plus growing fractions of the other nodes.
HEAD_SCHEDULE = (0.25, 0.5, 1.0)
REST_SCHEDULE = (0.05, 0.1, 0.2, 0.35)


def exclusion_plan(heads: list[str], rest: list[str], decoding: list[str] | None = None) -> list[list[str]]:
    """The node lists to keep in higher precision, round by round (inputs most sensitive first).

    ``decoding`` (a subset of ``heads``) goes first on its own: the last layers of each head and
    the box/score decoding, where int8 rounding costs the most accuracy and saves the least time.
    """
    decoding = list(decoding or [])
    heads = decoding + [h for h in heads if h not in set(decoding)]
    plan = [decoding] if decoding else []
    plan += [heads[: max(len(decoding), math.ceil(f * len(heads)))] for f in HEAD_SCHEDULE if heads]
    plan += [heads + rest[: max(1, math.ceil(f * len(rest)))] for f in REST_SCHEDULE if rest]
    unique: list[list[str]] = []
    for step in plan:
        if not unique or len(step) > len(unique[-1]):
            unique.append(step)
    return unique


def _cosine_error(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0:
        return 0.0 if np.array_equal(a, b) else 1.0
    return float(1.0 - a @ b / denom)


def sensitivity_order(fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]],
                      op_types: list[str] | None = None) -> list[str]:
    """Quantised node names, most sensitive first (ties: nodes nearer the outputs first)."""
    from vlexport.calibration.activations import record_activations
    from vlexport.calibration.quantize import list_quantizable_nodes

    model = onnx.load(str(fp32_path), load_external_data=False)
    nodes = [n for n, _ in (list_quantizable_nodes(fp32_path, op_types) if op_types else list_quantizable_nodes(fp32_path))]
    by_name = {n.name: n for n in model.graph.node}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    tensors = [by_name[n].output[0] for n in nodes if n in by_name]
    ref = record_activations(fp32_path, feeds, tensors)
    got = record_activations(int8_path, feeds, tensors)
    err = {}
    for name in nodes:
        t = by_name[name].output[0]
        if t in ref and t in got:
            err[name] = float(np.mean([_cosine_error(a, b) for a, b in zip(ref[t], got[t])]))
    quantised = set(err)

    def ancestors(name: str) -> set[str]:
        # Nearest quantised ancestors, walking up through the nodes that are not quantised.
        found, stack, seen = set(), list(by_name[name].input), set()
        while stack:
            t = stack.pop()
            p = producer.get(t)
            if p is None or p in seen:
                continue
            seen.add(p)
            if p in quantised:
                found.add(p)
            else:
                stack.extend(by_name[p].input)
        return found

    position = {n: i for i, n in enumerate(nodes)}
    local = {n: err[n] - max((err[a] for a in ancestors(n)), default=0.0) for n in quantised}
    return sorted(quantised, key=lambda n: (-local[n], -position[n]))


def head_nodes(fp32_path: Path, candidates: list[str]) -> list[str]:
    """The candidates on output-specific branches: detection heads and decoding.

    A shared backbone/neck node is an ancestor of every graph output; a node that reaches only
    some outputs (the box branch, the class branch, the box decoding) belongs to a head. This
    holds for any detector graph, with no per-model list.
    """
    model = onnx.load(str(fp32_path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    reaches: dict[str, set[str]] = {}
    for out in model.graph.output:
        stack, seen = [out.name], set()
        while stack:
            t = stack.pop()
            node = producer.get(t)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            reaches.setdefault(node.name, set()).add(out.name)
            stack.extend(node.input)
    every = {o.name for o in model.graph.output}
    return [n for n in candidates if reaches.get(n, set()) != every]


def decoding_nodes(fp32_path: Path, heads: list[str]) -> list[str]:
    """The head nodes with no convolution after them: each head's last layer and the decoding."""
    model = onnx.load(str(fp32_path), load_external_data=False)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    by_name = {n.name: n for n in model.graph.node}

    def conv_after(name: str) -> bool:
        stack, seen = list(by_name[name].output), set()
        while stack:
            for c in consumers.get(stack.pop(), []):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.op_type in ("Conv", "ConvTranspose"):
                    return True
                stack.extend(c.output)
        return False

    return [h for h in heads if h in by_name and not conv_after(h)]


class GateRefused(ExportError):
    """The accuracy gate could not bring INT8 within ``--max-drop``; carries what it measured."""

    def __init__(self, message: str, metrics: dict[str, dict[str, float]], rounds: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.metrics = metrics
        self.rounds = rounds


def run_accuracy_gate(writer, manifest: dict[str, Any], plan, prec, int8_info: dict[str, dict[str, Any]],
                      calib) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Measure every precision on ``prec.val`` and re-quantise until INT8 is within ``prec.max_drop``.

    Mutates ``int8_info[part]["excluded_nodes"]`` and rewrites the INT8 file in the staging
    folder. Returns (metrics per precision, one record per gate round).
    """
    from vlexport import runtime
    from vlexport.data.detection import load_detection_dataset
    from vlexport.evaluation.detection import evaluate_detector
    from vlexport.calibration.quantize import quantize_int8

    if plan.task != "detect":
        raise UsageError(f"the accuracy gate measures detection mAP; the {plan.family} family's task is {plan.task!r}")
    if len(int8_info) != 1:
        raise UsageError("the accuracy gate handles one quantised part per bundle")
    part_name, info = next(iter(int8_info.items()))
    dataset = load_detection_dataset(prec.val)
    calib_paths = {str(Path(n).resolve()) for n in calib.names}
    keep = [i for i, it in enumerate(dataset.items) if str(Path(it.image_path).resolve()) not in calib_paths]
    if not keep:
        raise UsageError(f"every image of --val {prec.val} is a calibration image: evaluate on images the "
                         "calibration did not see (a smaller --calib-size or another --calib source)")
    eval_set = dataset.subset(keep)
    log.info("accuracy gate: %d evaluation image(s) from %s, disjoint from the %d calibration image(s)",
             len(keep), prec.val, len(calib_paths))

    files = manifest["parts"][part_name]["files"]

    def evaluate(precision: str):
        staging = writer.provisional(manifest)
        task = runtime.load(staging, precision=precision, backend="onnxruntime", score_threshold=0.001,
                            max_detections=300)
        try:
            return evaluate_detector(task, eval_set, progress=True)
        finally:
            task.close()

    metrics: dict[str, dict[str, float]] = {}
    m32 = evaluate("fp32")
    metrics["fp32"] = m32.to_dict()
    if "fp16" in files:
        metrics["fp16"] = evaluate("fp16").to_dict()
    fp32_path = writer.path(files["fp32"])
    int8_path = writer.path(files["int8"])
    feeds = info["inputs"]
    plan_steps: list[list[str]] | None = None
    excluded: list[str] = list(info["excluded_nodes"])
    rounds: list[dict[str, Any]] = []
    for r in range(prec.max_gate_rounds + 1):
        m8 = evaluate("int8")
        drop = 100.0 * (m32.map50_95 - m8.map50_95)
        rounds.append({"round": r, "excluded_nodes": len(excluded), "int8_map50_95": m8.map50_95,
                       "int8_map50": m8.map50, "drop_points": drop})
        log.info("gate round %d: %d node(s) kept in higher precision, INT8 mAP50-95 %.4f vs FP32 %.4f (drop %.2f points, budget %.2f)",
                 r, len(excluded), m8.map50_95, m32.map50_95, drop, prec.max_drop)
        if drop <= prec.max_drop:
            break
        if r == prec.max_gate_rounds:
            table = "; ".join(f"round {x['round']}: {x['excluded_nodes']} kept, drop {x['drop_points']:.2f}" for x in rounds)
            raise GateRefused(
                f"INT8 stays {drop:.2f} points of mAP50-95 below FP32 ({m8.map50_95:.4f} vs {m32.map50_95:.4f}), over "
                f"--max-drop {prec.max_drop}, after {r} rounds ({table}); raise --max-drop, try another "
                "--calib-method or more --calib-size", {**metrics, "int8": m8.to_dict()}, rounds)
        if plan_steps is None:
            order = sensitivity_order(fp32_path, int8_path, feeds[: min(8, len(feeds))], info.get("op_types"))
            heads = head_nodes(fp32_path, order)
            plan_steps = exclusion_plan(heads, [n for n in order if n not in set(heads)],
                                        decoding_nodes(fp32_path, heads))
        if r >= len(plan_steps):
            raise GateRefused(f"INT8 stays {drop:.2f} points below FP32 with every candidate node kept in "
                              "higher precision; export without --int8 or raise --max-drop",
                              {**metrics, "int8": m8.to_dict()}, rounds)
        excluded = plan_steps[r]
        q = quantize_int8(fp32_path, int8_path, feeds, method=prec.calib_method, exclude_nodes=excluded,
                          target=prec.int8_target)
        info["excluded_nodes"] = list(q.excluded_nodes)
    metrics["int8"] = m8.to_dict()
    return metrics, rounds
