"""The accuracy gate: INT8 may lose at most ``--max-drop`` points of the task metric against FP32.

The task metric (mAP50-95 for detectors, mIoU for semantic segmenters, foreground IoU for
binary ones: :mod:`vlexport.calibration.gate_metrics`) is measured on the ``--val`` images the
calibration did not use. When INT8 loses more, or when keeping some layers in float is both
faster and more accurate, the precision search (:mod:`vlexport.calibration.search`) chooses which
layers stay float by measured sensitivity and measured latency; the points within budget are
timed again side by side in one run and the lowest-latency one is written. Every point it measured goes to the manifest
(``validation.gate.rounds``; ``vlexport inspect --plot`` draws them). When no point is within
budget the gate refuses INT8 and says so with the figures.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from vlexport.errors import ExportError, UsageError

log = logging.getLogger("vlexport")


class GateRefused(ExportError):
    """The accuracy gate could not bring INT8 within ``--max-drop``; carries what it measured."""

    def __init__(self, message: str, metrics: dict[str, dict[str, float]], rounds: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.metrics = metrics
        self.rounds = rounds


def run_accuracy_gate(writer, manifest: dict[str, Any], plan, prec, int8_info: dict[str, dict[str, Any]],
                      calib) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Measure every precision on ``prec.val`` and search the INT8 precision assignment.

    Mutates ``int8_info[part]`` (``excluded_nodes``, ``search``: the candidates and their figures)
    and rewrites the INT8 file in the staging folder with the chosen point. Returns (metrics per
    precision, one record per explored point).
    """
    from tqdm import tqdm

    from vlexport.calibration.gate_metrics import gate_metric
    from vlexport.calibration.quantize import CPU_OP_TYPES, quantize_int8, quantized_node_names
    from vlexport.calibration.search import (
        SearchPoint,
        free_groups,
        group_costs,
        group_of,
        local_errors,
        measure_latency,
        paired_latency_ratios,
        rank_groups,
        search_schedule,
    )

    if len(int8_info) != 1:
        raise ExportError("the accuracy gate handles one quantised part per bundle")
    part_name, info = next(iter(int8_info.items()))
    metric = gate_metric(plan.task, plan.family, prec.val, calib.names)
    log.info("accuracy gate: %s on %d evaluation image(s) from %s, disjoint from the %d calibration image(s)",
             metric.label, metric.images, prec.val, len(calib.names))
    files = manifest["parts"][part_name]["files"]

    def evaluate(precision: str) -> tuple[float, dict[str, Any]]:
        return metric.evaluate(writer.provisional(manifest), precision)

    metrics: dict[str, dict[str, float]] = {}
    m32, metrics["fp32"] = evaluate("fp32")
    if not math.isfinite(m32):
        raise UsageError(f"FP32 {metric.label} is undefined on --val {prec.val} (none of the model's classes occurs "
                         "in its labels or predictions): pass a --val whose labels hold the model's classes")
    if "fp16" in files:
        metrics["fp16"] = evaluate("fp16")[1]
    fp32_path = writer.path(files["fp32"])
    int8_path = writer.path(files["int8"])
    feeds = info["inputs"]
    target = prec.int8_target
    measured = target == "cpu"  # the tensorrt target's latency cannot be measured here
    threads = min(2, os.cpu_count() or 1)
    op_types = CPU_OP_TYPES if target == "cpu" else info.get("op_types")
    points: list[SearchPoint] = []
    scratch = Path(tempfile.mkdtemp(prefix=".vlexport-search-", dir=int8_path.parent))
    bar = tqdm(total=prec.max_gate_rounds + 1, desc="INT8 search", unit="round", leave=False)

    def measure(graph: Path, excluded: list[str], groups: int) -> SearchPoint:
        r = len(points)
        bar.set_description(f"INT8 search round {r}: {groups} layer(s) float")
        if graph != int8_path:
            shutil.copyfile(graph, int8_path)
        value, figures = evaluate("int8")
        lat, lat32 = measure_latency(fp32_path, int8_path, feeds[0], threads=threads) if measured else (None, None)
        extra = {f"int8_{k}": figures[k] for k in ("map50_95", "map50") if k in figures}
        point = SearchPoint(r, groups, list(excluded), metric.name, value, m32, lat, lat32, measured,
                            100.0 * (m32 - value) <= prec.max_drop, extra)
        points.append(point)
        bar.update(1)
        log.info("search round %d: %d layer(s) (%d nodes) float, INT8 %s %.4f vs FP32 %.4f (drop %.2f, budget %.2f)%s",
                 r, groups, len(excluded), metric.label, value, m32, point.drop_points, prec.max_drop,
                 f", {lat:.1f} vs {lat32:.1f} ms ({lat / lat32:.2f}x)" if lat else "")
        kept = scratch / f"round{r}.onnx"
        shutil.copyfile(int8_path, kept)
        point.extra.update(_file=str(kept), _figures=figures)
        return point

    try:
        first = measure(int8_path, list(info["excluded_nodes"]), 0)
        quantised = [n for n in quantized_node_names(onnx.load(str(int8_path), load_external_data=False), op_types)]
        groups: dict[str, list[str]] = {}
        for n in quantised:
            groups.setdefault(group_of(n), []).append(n)
        search: dict[str, Any] = {"metric": metric.name, "candidates": len(groups)}
        if prec.max_gate_rounds > 0 and groups:
            errors = local_errors(fp32_path, int8_path, feeds[: min(8, len(feeds))], quantised)
            sensitivity = {g: sum(errors.get(n, 0.0) for n in ns) for g, ns in groups.items()}
            cost = group_costs(fp32_path, int8_path, feeds[0], list(groups), target=target, threads=threads)
            order = rank_groups(sensitivity, cost)
            search["order"] = [{"group": g, "nodes": len(groups[g]), "sensitivity": sensitivity[g],
                                "float_cost_ms": cost.get(g, 0.0)} for g in order]
            search["cost_source"] = "profiled int8 vs fp32 kernels" if measured else "fp32 kernel time (estimate)"

            def point(k: int) -> bool:
                excluded = [n for g in order[:k] for n in groups[g]]
                q = quantize_int8(fp32_path, scratch / "candidate.onnx", feeds, method=prec.calib_method,
                                  exclude_nodes=excluded, target=target, calibration=info.get("calibration"))
                return measure(scratch / "candidate.onnx", list(q.excluded_nodes), k).passed

            costs = {g: cost.get(g, 0.0) for g in order}
            free = len(free_groups(costs)) if measured else 0
            not_slower = sum(1 for c in costs.values() if c < 0) if measured else 0
            search.update(free_layers=free, not_slower_layers=not_slower)
            if first.passed:
                # Within budget already: keeping the layers whose float kernels are faster should
                # cost nothing; both prefixes are measured (the island borders are not estimated).
                for k in list(dict.fromkeys(k for k in (free, not_slower) if k))[: prec.max_gate_rounds]:
                    point(k)
            else:
                search_schedule(len(order), point, prec.max_gate_rounds)
    finally:
        bar.close()
    info["search"] = {"search": search}
    passed = [p for p in points if p.passed]
    if not passed:
        table = "; ".join(f"round {p.round}: {p.excluded_groups} layer(s) float, drop {p.drop_points:.2f}" for p in points)
        shutil.rmtree(scratch, ignore_errors=True)
        best = max(points, key=lambda p: p.int8_metric)
        raise GateRefused(
            f"INT8 stays {best.drop_points:.2f} points of {metric.label} below FP32 ({best.int8_metric:.4f} vs "
            f"{m32:.4f}), over --max-drop {prec.max_drop}, after {len(points) - 1} search round(s) ({table}); "
            "raise --max-drop, try another --calib-method or more --calib-size",
            {**metrics, "int8": best.extra["_figures"]}, _records(points))
    if measured and len(passed) > 1:
        # The in-loop ratios were timed minutes apart; the final choice compares the candidates in
        # one interleaved run, where the machine's drift cancels.
        bar = tqdm(total=1, desc=f"INT8 search: timing the {len(passed)} points within budget side by side",
                   unit="run", leave=False)
        try:
            ratios = paired_latency_ratios(fp32_path, [Path(p.extra["_file"]) for p in passed], feeds[0],
                                           threads=threads)
            bar.update(1)
        finally:
            bar.close()
        for p, r in zip(passed, ratios):
            p.extra["paired_latency_ratio"] = r
        search["final_timing"] = f"{len(passed)} points within budget and FP32 side by side, 10 rounds of 5 runs"
        log.info("search: the points within budget timed side by side: %s",
                 ", ".join(f"round {p.round} {r:.3f}x" for p, r in zip(passed, ratios)))

    def ratio(p: SearchPoint) -> float:
        r = p.extra.get("paired_latency_ratio", p.latency_ratio)
        return r if r is not None else 0.0

    # The ratio, not the milliseconds: each point's INT8 and FP32 were timed side by side, so a
    # slower machine during one point does not make it look worse than another.
    chosen = min(passed, key=lambda p: (ratio(p), p.excluded_groups))
    chosen.chosen = True
    os.replace(chosen.extra["_file"], int8_path)
    shutil.rmtree(scratch, ignore_errors=True)
    info["excluded_nodes"] = list(chosen.excluded_nodes)
    search["chosen_round"] = chosen.round
    metrics["int8"] = chosen.extra["_figures"]
    return metrics, _records(points)


def _records(points: list[Any]) -> list[dict[str, Any]]:
    """The manifest's records of the explored points (without the search's own bookkeeping)."""
    return [{k: v for k, v in p.to_dict().items() if not k.startswith("_")} for p in points]
