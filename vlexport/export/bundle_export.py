"""Family-agnostic export: parts → ONNX (fp32, fp16, int8) → parity → accuracy gate → bundle.

A family module builds an :class:`ExportPlan` (its parts, pre/post-processing, vocabulary,
provenance); :func:`write_bundle` does the rest identically for every family.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from vlexport.errors import ExportError, UsageError
from vlexport.export.bundle_writer import BundleWriter
from vlexport.export.command import PrecisionFields
from vlexport.export.fp16 import (
    FP16_PROBE_FEEDS,
    FP16_SEARCH_ROUNDS,
    FRAGILE_OPS,
    convert_to_fp16,
    fp32_node_names,
    overflowing_nodes,
    search_fp32_islands,
)
from vlexport.export.onnx_export import DEFAULT_OPSET, export_part
from vlexport.export.parity import check_parity, torch_outputs
from vlexport.export.part import Part
from vlexport.runtime.manifest import CalibrationRecord, Manifest, PartRecord, ValidationRecord

log = logging.getLogger("vlexport")


@dataclass(kw_only=True)
class PrecisionOptions(PrecisionFields):
    """Which precisions to write, and how INT8 is calibrated and gated: the CLI's precision fields
    (:class:`~vlexport.export.command.PrecisionFields`: ``val`` is a labelled dataset that, with
    ``int8``, enables the accuracy gate; ``strict`` fails the export instead of leaving a failing
    lower precision out) and the search limits the CLI does not expose."""

    max_gate_rounds: int = 7
    # Rounds of the FP16 search that keeps FP32 islands until FP16 passes its checks (0: no search).
    max_fp16_rounds: int = FP16_SEARCH_ROUNDS

    def check(self) -> None:
        from vlexport.calibration.quantize import CALIB_METHODS, INT8_TARGETS

        if self.max_drop < 0:
            raise UsageError(f"--max-drop must be zero or positive (points of the task metric), got {self.max_drop}")
        if self.int8 and not self.calib:
            raise UsageError(
                "INT8 needs calibration data and there is no silent default: pass --calib SOURCE "
                "(an image folder, a video, or a YOLO/COCO dataset) and optionally --calib-size N"
            )
        if self.calib_size < 1:
            raise UsageError(f"--calib-size must be at least 1, got {self.calib_size}")
        if self.int8_target not in INT8_TARGETS:
            raise UsageError(f"unknown --int8-target {self.int8_target!r}; choose one of {', '.join(INT8_TARGETS)}")
        if self.calib_method not in CALIB_METHODS:
            raise UsageError(f"unknown --calib-method {self.calib_method!r}; choose one of {', '.join(CALIB_METHODS)}")
        if isinstance(self.max_fp16_rounds, bool) or not isinstance(self.max_fp16_rounds, int) or self.max_fp16_rounds < 0:
            raise UsageError(f"the FP16 search rounds must be zero or a positive integer, got {self.max_fp16_rounds!r}")


@dataclass
class ExportPlan:
    """Everything a family hands to the bundle writer."""

    family: str
    task: str
    preset: str
    parts: list[Part]
    parity_images: torch.Tensor  # pre-processed [N, 3, H, W], what the runtime would feed
    parity_source: str
    preprocess: dict[str, Any]
    postprocess: dict[str, Any] = field(default_factory=dict)
    vocabulary: dict[str, Any] | None = None
    vocab_arrays: tuple[list[str], np.ndarray] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # One BGR frame → the tensor the parts' ``make_inputs`` take (default: the runtime's letterbox
    # pre-processing of ``preprocess``); families with another input (SCLIP's crops) set it.
    frame_to_tensor: Callable[[np.ndarray], torch.Tensor] | None = None
    extra_manifest: dict[str, Any] = field(default_factory=dict)  # family sections, e.g. "segment"
    # Files copied into the bundle as they are (bundle-relative name -> source), e.g. a tokenizer.
    extra_files: dict[str, Path] = field(default_factory=dict)
    # Family checks run on the written graphs after the per-part parity (e.g. a whole decode loop):
    # ``check(files)`` with files = {part: {precision: path}} returns (name, figures, violations) and
    # optionally a 4th item, the (part, precision) files it refuses (an accuracy gate), which are
    # dropped; figures go to ``validation[name]``. A violation that starts with "part/precision" (as
    # parity's do) concerns that file: FP16 then searches FP32 islands, and a lower precision that still
    # fails is refused like a parity failure; any other violation (and FP32's) stops the export.
    checks: list[Callable[[dict[str, dict[str, Path]]], tuple[str, dict[str, Any], list[str]]]] = field(
        default_factory=list)


@dataclass
class ExportReport:
    """What was written and how faithful it is."""

    path: Path
    parity: dict[str, dict[str, dict[str, float]]]
    files: list[str]
    seconds: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    gate: list[dict[str, Any]] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # "part/precision" -> why it is not in the bundle
    fp16: dict[str, dict[str, Any]] = field(default_factory=dict)  # the manifest's fp16 section (island search)


def _batches(part: Part, images: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    batch_dim = part.io.inputs[0].shape[0] if part.io.inputs[0].shape else None
    if isinstance(batch_dim, str):
        return [part.make_inputs(images)]
    # Static batch: one image at a time (the shape the graph was exported with).
    return [part.make_inputs(images[i:i + 1]) for i in range(images.shape[0])]


def _feeds(part: Part, batches: list[tuple[torch.Tensor, ...]]) -> list[dict[str, np.ndarray]]:
    return [{n: t.detach().cpu().numpy() for n, t in zip(part.input_names, b)} for b in batches]


def write_bundle(plan: ExportPlan, out: str | Path, *, precision: PrecisionOptions | None = None, fp16: bool = False,
                 opset: int = DEFAULT_OPSET, overwrite: bool = False, simplify: bool = True) -> ExportReport:
    """Export every part of ``plan`` in the asked precisions, check parity (and accuracy), write the bundle.

    An FP16 graph that fails its checks keeps more nodes in FP32, round by round, until it passes
    (:func:`vlexport.export.fp16.search_fp32_islands`). A lower precision (FP16, INT8) that still fails
    is left out of the bundle, with the reason in ``validation.refused`` and a warning; with
    ``precision.strict``, or when FP32 fails, all violations of all parts are reported together in one
    :class:`ExportError` and nothing is left at ``out`` (nor when the accuracy gate gives up).
    """
    t0 = time.perf_counter()
    prec = precision or PrecisionOptions(fp16=fp16)
    prec.check()
    parity: dict[str, dict[str, dict[str, float]]] = {}
    parity_bad: dict[str, list[str]] = {}  # "part/precision" -> parity violations
    runs: dict[str, tuple[Part, list[tuple[torch.Tensor, ...]], dict[str, np.ndarray]]] = {}
    refused: dict[str, str] = {}
    parts_manifest: dict[str, Any] = {}
    fp32_files: dict[str, Path] = {}
    extra: dict[str, Any] = {}
    calib = None
    if prec.int8:
        calib = _calibration_set(plan, prec)
    with BundleWriter(out, overwrite=overwrite) as writer:
        for rel, src in plan.extra_files.items():
            shutil.copyfile(src, writer.path(rel))
        for part in plan.parts:
            batches = _batches(part, plan.parity_images)
            reference = torch_outputs(part, batches)
            files: dict[str, str] = {}
            fp32_rel = f"{part.name}.onnx"
            log.info("exporting %s (fp32, opset %d)…", part.name, opset)
            fp32_path = writer.path(fp32_rel)
            export_part(part, batches[0], fp32_path, opset=opset, simplify=simplify)
            files["fp32"] = fp32_rel
            fp32_files[part.name] = fp32_path
            if prec.fp16:
                fp16_rel = f"{part.name}.fp16.onnx"
                kept = overflowing_nodes(fp32_path, _feeds(part, batches))
                log.info("converting %s to fp16 (op types %s, … and %d node(s) whose activations overflow FP16 stay FP32)…",
                         part.name, ", ".join(FRAGILE_OPS[:3]), len(kept))
                fp32_model = onnx.load(str(fp32_path))
                onnx.save(convert_to_fp16(fp32_model, keep_fp32_nodes=kept), str(writer.path(fp16_rel)))
                files["fp16"] = fp16_rel
                extra.setdefault("fp16", {})[part.name] = {
                    "kept_fp32_op_types": list(FRAGILE_OPS), "kept_fp32_nodes": kept, "overflowing_nodes": kept,
                    "island_nodes": [], "fp32_nodes": len(fp32_node_names(fp32_model, FRAGILE_OPS, kept)),
                    "nodes": len(fp32_model.graph.node), "rounds": []}
                del fp32_model
            if prec.int8 and part.weight_quantizer is not None:
                int8_rel = f"{part.name}.int8.onnx"
                log.info("quantising %s weights to int8 (no calibration: weight-only)…", part.name)
                info = part.weight_quantizer(fp32_path, writer.path(int8_rel))
                files["int8"] = int8_rel
                extra.setdefault("weight_only", {})[part.name] = info
            elif prec.int8 and part.quantize:
                from vlexport.calibration.quantize import quantize_int8

                int8_rel = f"{part.name}.int8.onnx"
                inputs = _calibration_inputs(part, calib, plan, fp32_files)
                log.info("quantising %s to int8 (QDQ, %s, %d calibration images)…", part.name, prec.calib_method, len(inputs))
                q = quantize_int8(fp32_path, writer.path(int8_rel), inputs, method=prec.calib_method,
                                  target=prec.int8_target)
                files["int8"] = int8_rel
                extra.setdefault("int8", {})[part.name] = {"quantized_nodes": len(q.quantized_nodes),
                                                           "excluded_nodes": list(q.excluded_nodes), "inputs": inputs,
                                                           "op_types": list(q.op_types), "calibration": q.calibration}
            for p in files:
                log.info("checking %s/%s against PyTorch on %d image(s)…", part.name, p, plan.parity_images.shape[0])
                res, bad = check_parity(part, writer.path(files[p]), p, batches, reference)
                parity[f"{part.name}/{p}"] = {k: v.to_dict() for k, v in res.items()}
                parity_bad[f"{part.name}/{p}"] = bad
            parts_manifest[part.name] = {**part.io.to_dict(), "files": files, "engines": {}}
            runs[part.name] = (part, batches, reference)

        def drop(key: str, reason: str) -> None:
            part_name, p = key.split("/", 1)
            rel = parts_manifest[part_name]["files"].pop(p)
            writer.path(rel).unlink()
            parity.pop(key, None)
            parity_bad.pop(key, None)
            refused[key] = reason
            if p == "int8":
                extra.get("weight_only", {}).pop(part_name, None)
                extra.get("int8", {}).pop(part_name, None)
            elif p == "fp16":
                extra["fp16"][part_name]["refused"] = reason

        def fatal_problems(check_bad: dict[str, list[str]], other: list[str]) -> list[str]:
            return ([b for k, bad in parity_bad.items() if k.endswith("/fp32") for b in bad]
                    + [b for k, bad in check_bad.items() if k.endswith("/fp32") for b in bad] + other)

        def all_problems(check_bad: dict[str, list[str]], other: list[str]) -> list[str]:
            return [b for bad in parity_bad.values() for b in bad] + [b for bad in check_bad.values() for b in bad] + other

        family_checks: dict[str, Any] = {}
        check_bad: dict[str, list[str]] = {}
        other: list[str] = []
        if not fatal_problems(check_bad, other):
            family_checks, check_bad, other = _run_checks(plan, parts_manifest, writer, drop)
        if prec.fp16 and not fatal_problems(check_bad, other):
            searched = False
            for name in list(parts_manifest):
                key = f"{name}/fp16"
                if "fp16" not in parts_manifest[name]["files"] or not (parity_bad.get(key) or check_bad.get(key)):
                    continue
                _search_fp16(plan, writer, parts_manifest, runs[name], prec, extra["fp16"][name], parity, parity_bad,
                             first=(_fp16_figures(parity[key], family_checks), parity_bad[key] + check_bad.get(key, [])))
                searched = True
            if searched:  # the family figures of the final FP16 graphs
                family_checks, check_bad, other = _run_checks(plan, parts_manifest, writer, drop)
        for name, info in extra.get("fp16", {}).items():
            if not info["rounds"] and f"{name}/fp16" in parity:  # passed as first converted: round 0 only
                info["rounds"] = [{"round": 0, "kept_nodes": len(info["kept_fp32_nodes"]), "fp32_nodes": info["fp32_nodes"],
                                   "passed": not (parity_bad.get(f"{name}/fp16") or check_bad.get(f"{name}/fp16")),
                                   **_fp16_figures(parity[f"{name}/fp16"], family_checks),
                                   "violations": parity_bad.get(f"{name}/fp16", []) + check_bad.get(f"{name}/fp16", [])}]
        fatal = fatal_problems(check_bad, other)
        if fatal or (prec.strict and all_problems(check_bad, other)):
            raise ExportError(
                "the export does not match PyTorch, so no bundle was written: "
                + "; ".join(all_problems(check_bad, other))
            )
        failing = {k: parity_bad.get(k, []) + check_bad.get(k, []) for k in [*parity_bad, *check_bad]}
        for key, bad in failing.items():
            if not bad or key in refused:
                continue
            reason = "; ".join(_strip_key(b, key) for b in bad)
            fp16_info = extra.get("fp16", {}).get(key.split("/", 1)[0], {}) if key.endswith("/fp16") else {}
            if len(fp16_info.get("rounds", [])) > 1:
                reason += (f" (after {len(fp16_info['rounds']) - 1} round(s) of the FP32 island search, "
                           f"{len(fp16_info['kept_fp32_nodes'])} node(s) kept in FP32)")
            drop(key, reason)
            left = ", ".join(parts_manifest[key.split("/", 1)[0]]["files"])
            log.warning("%s refused, it is not in the bundle (which keeps %s): %s; --strict makes this an error",
                        key, left, reason)
        vocabulary = dict(plan.vocabulary) if plan.vocabulary else None
        if plan.vocab_arrays is not None and vocabulary is not None:
            vocabulary["file"] = writer.write_vocab(*plan.vocab_arrays)
        manifest = Manifest(
            family=plan.family,
            task=plan.task,
            preset=plan.preset,
            preprocess=plan.preprocess,
            vocabulary=vocabulary,
            # The files dicts are shared with parts_manifest, so a later drop() shows in the manifest.
            parts={name: PartRecord(name=name, io=runs[name][0].io, files=entry["files"])
                   for name, entry in parts_manifest.items()},
            postprocess=plan.postprocess,
            validation=ValidationRecord(parity=parity, refused=refused, extra={
                "parity_images": {"source": plan.parity_source, "count": int(plan.parity_images.shape[0])},
                **family_checks}),
            extra={
                "provenance": {
                    "torch": torch.__version__,
                    "onnx": onnx.__version__,
                    "opset": opset,
                    "python": platform.python_version(),
                    **plan.provenance,
                },
                "model": plan.model,
                "warnings": plan.warnings,
                **({"fp16": extra["fp16"]} if "fp16" in extra else {}),
                **plan.extra_manifest,
            },
        )
        metrics: dict[str, dict[str, float]] = {}
        gate_rounds: list[dict[str, Any]] = []
        if prec.int8:
            manifest.calibration = CalibrationRecord(
                target=prec.int8_target, weight_only=extra.get("weight_only", {}),
                extra={"method": prec.calib_method, "source": calib.source, "kind": calib.kind,
                       "count": len(calib.frames), "seed": prec.calib_seed, "sha256": calib.sha256,
                       "excluded_nodes": {k: v["excluded_nodes"] for k, v in extra.get("int8", {}).items()},
                       "ranges": {k: v["calibration"].summary() for k, v in extra.get("int8", {}).items()
                                  if v.get("calibration") is not None}},
            )
            if prec.val and not extra.get("int8"):
                log.warning("no INT8 graph left to gate on --val %s", prec.val)
            elif prec.val and _is_labelled(plan.task, prec.val):
                from vlexport.calibration.gate import GateRefused, run_accuracy_gate

                def searched() -> dict[str, Any]:
                    return {k: v["search"] for k, v in extra.get("int8", {}).items() if "search" in v}

                try:
                    # The gate reads the manifest as JSON data and stages it with writer.provisional().
                    metrics, gate_rounds = run_accuracy_gate(writer, manifest.to_dict(), plan, prec, extra["int8"],
                                                             calib)
                    search_info = searched()
                except GateRefused as e:
                    search_info = searched()  # a refused INT8 keeps its search on record too
                    if prec.strict:
                        raise
                    # Like any lower precision that cannot pass: the others are written, INT8 is refused.
                    metrics, gate_rounds = e.metrics, e.rounds
                    key = f"{next(iter(extra['int8']))}/int8"
                    drop(key, str(e))
                    log.warning("%s refused, it is not in the bundle: %s; --strict makes this an error", key, e)
                manifest.calibration.extra["excluded_nodes"] = {k: v["excluded_nodes"]
                                                                for k, v in extra.get("int8", {}).items()}
                manifest.validation.extra["metrics"] = metrics
                manifest.validation.extra["gate"] = {"data": prec.val, "max_drop": prec.max_drop,
                                                     "target": prec.int8_target, "rounds": gate_rounds,
                                                     **(next(iter(search_info.values())) if search_info else {})}
        if prec.int8 and prec.int8_target == "cpu" and plan.frame_to_tensor is None:
            pixel = _pixel_inputs(plan, parts_manifest, writer, extra.get("int8", {}))
            if pixel and manifest.calibration is not None:
                manifest.calibration.extra["pixel_inputs"] = pixel
        path = writer.commit(manifest)
    files_written = sorted(p.name for p in path.iterdir())
    return ExportReport(path=path, parity=parity, files=files_written, seconds=time.perf_counter() - t0,
                        metrics=metrics, gate=gate_rounds, refused=refused, fp16=extra.get("fp16", {}))


def _pixel_inputs(plan: ExportPlan, parts_manifest: dict[str, Any], writer: BundleWriter,
                  int8_info: dict[str, Any]) -> dict[str, Any]:
    """The cpu target's INT8 graphs take the letterboxed uint8 pixels where their first
    QuantizeLinear gives back exactly those (:func:`~vlexport.calibration.pixel_input.pixel_input`).
    Done last: the parity checks, the gate and the search ran the float-input graph, whose
    results are the same. Returns {part: {input: its quantisation}} for the manifest."""
    from vlexport.calibration.pixel_input import pixel_input
    from vlexport.runtime.preprocess import Preprocessor

    step = Preprocessor(plan.preprocess).pixel_step
    parts = {p.name: p for p in plan.parts}
    done: dict[str, Any] = {}
    if step is None:
        return done
    for name in int8_info:
        rel = parts_manifest[name]["files"].get("int8")
        part = parts[name]
        if rel is None or part.calib_from is not None or "images" not in part.input_names:
            continue
        model = onnx.load(str(writer.path(rel)))
        record = pixel_input(model, "images", step)
        if record is not None:
            onnx.save(model, str(writer.path(rel)))
            done[name] = {"images": record}
            log.info("%s/int8 takes uint8 pixels (its input quantisation is the pixel step %.6g)", name, step)
    return done


def _violation_key(problem: str, files: dict[str, dict[str, Any]]) -> str | None:
    """The "part/precision" a violation names at its start (parity's and the families' own), if any."""
    for part, precisions in files.items():
        for p in precisions:
            key = f"{part}/{p}"
            if problem.startswith(key) and problem[len(key):len(key) + 1] in (":", " ", ""):
                return key
    return None


def _strip_key(problem: str, key: str) -> str:
    return problem[len(key):].lstrip(": ") if problem.startswith(key) else problem


def _run_checks(plan: ExportPlan, parts_manifest: dict[str, Any], writer: BundleWriter,
                drop: Callable[[str, str], None]) -> tuple[dict[str, Any], dict[str, list[str]], list[str]]:
    """The plan's family checks on the written files: (figures by check, violations by "part/precision",
    other violations). Files a check refuses (an accuracy gate of its own) are dropped."""
    written = {name: {p: writer.path(rel) for p, rel in entry["files"].items()}
               for name, entry in parts_manifest.items()}
    figures: dict[str, Any] = {}
    by_key: dict[str, list[str]] = {}
    other: list[str] = []
    for check in plan.checks:
        name, figs, bad, *rest = check(written)
        figures[name] = figs
        for problem in bad:
            key = _violation_key(problem, written)
            (by_key.setdefault(key, []) if key else other).append(problem)
        for part_name, p in (rest[0] if rest else []):  # files a family's own gate refused
            if p in parts_manifest[part_name]["files"]:
                drop(f"{part_name}/{p}", f"the {name} check refused it")
                log.warning("%s/%s dropped: the %s check refused it", part_name, p, name)
    return figures, by_key, other


def _fp16_figures(parity: dict[str, Any], family_checks: dict[str, Any]) -> dict[str, Any]:
    """One round's figures: the parity of every output, and the fp16 summary of each family check."""
    figures: dict[str, Any] = {"parity": parity}
    for name, figs in family_checks.items():
        if isinstance(figs, dict) and isinstance(figs.get("fp16"), dict):
            figures[name] = {k: v for k, v in figs["fp16"].items() if k != "per_image"}
    return figures


def _search_fp16(plan: ExportPlan, writer: BundleWriter, parts_manifest: dict[str, Any], run, prec: PrecisionOptions,
                 info: dict[str, Any], parity: dict[str, Any], parity_bad: dict[str, list[str]],
                 first: tuple[dict[str, Any], list[str]]) -> None:
    """Keep FP32 islands in one part's FP16 graph until its parity and the family checks pass (or the
    rounds run out); rewrites the staged FP16 file and records the search in ``info`` (the manifest's
    ``fp16[part]``) and the final parity in ``parity``/``parity_bad``."""
    part, batches, reference = run
    key = f"{part.name}/fp16"
    files = parts_manifest[part.name]["files"]
    last: dict[str, Any] = {}

    def evaluate(candidate: Path) -> tuple[dict[str, Any], list[str]]:
        res, bad = check_parity(part, candidate, "fp16", batches, reference)
        last["parity"], last["bad"] = {k: v.to_dict() for k, v in res.items()}, list(bad)
        # The family checks on this part's FP32 and candidate FP16 graphs (and the other parts' FP32).
        subset = {n: {p: writer.path(rel) for p, rel in e["files"].items() if p == "fp32" or n == part.name and p == "fp16"}
                  for n, e in parts_manifest.items()}
        subset[part.name]["fp16"] = candidate
        family: dict[str, Any] = {}
        for check in plan.checks:
            name, figs, check_bad, *rest = check(subset)
            family[name] = figs
            bad += [b for b in check_bad if _violation_key(b, subset) == key]
            if (part.name, "fp16") in (rest[0] if rest else []):
                bad.append(f"{key}: the {name} check refuses it")
        return _fp16_figures(last["parity"], family), bad

    log.info("%s fails its checks (%s): searching the nodes to keep in FP32 (at most %d round(s))…", key,
             "; ".join(first[1]), prec.max_fp16_rounds)
    result = search_fp32_islands(writer.path(files["fp32"]), writer.path(files["fp16"]),
                                 _feeds(part, batches)[:FP16_PROBE_FEEDS], evaluate, kept=info["kept_fp32_nodes"],
                                 first=first, max_rounds=prec.max_fp16_rounds, label=key)
    info.update(kept_fp32_nodes=result.kept_nodes, island_nodes=result.island_nodes, rounds=result.rounds,
                fp32_nodes=result.rounds[-1]["fp32_nodes"])
    if len(result.rounds) > 1:
        parity[key], parity_bad[key] = last["parity"], last["bad"]
    state = "passes" if result.passed else "still fails"
    log.info("%s %s with %d node(s) kept in FP32 by name (%d in FP32 in all, of %d) after %d round(s)", key, state,
             len(result.kept_nodes), info["fp32_nodes"], info["nodes"], len(result.rounds) - 1)


def _is_labelled(task: str, source: str) -> bool:
    """Whether ``--val`` is a labelled dataset (it gates INT8) or only images (parity only)."""
    from vlexport.calibration.gate_metrics import labelled_kind

    if labelled_kind(task, source) is None:
        log.warning("--val %s has no labels: the INT8 accuracy gate is skipped (pass a YOLO data.yaml/folder "
                    "or a COCO json to measure mAP, masks with a semantic.yaml or VOC pairs for (m)IoU)", source)
        return False
    return True


def _calibration_set(plan: ExportPlan, prec: PrecisionOptions):
    """The calibration frames (the gate sets these images aside when it evaluates)."""
    from vlexport.data.readers import calibration_frames

    calib = calibration_frames(prec.calib, prec.calib_size, seed=prec.calib_seed)
    log.info("calibration: %d image(s) from %s (sha256 %s…)", len(calib.frames), calib.source, calib.sha256[:12])
    return calib


def _letterbox_tensor(preprocess: dict[str, Any]) -> Callable[[np.ndarray], torch.Tensor]:
    from vlexport.runtime.preprocess import Preprocessor

    pre = Preprocessor(preprocess)
    return lambda frame: torch.from_numpy(pre(frame)[0])


def _calibration_inputs(part: Part, calib, plan: ExportPlan, files_of: dict[str, Path]) -> list[dict[str, np.ndarray]]:
    """Feeds for the part on every calibration image, pre-processed exactly as the runtime does.

    An inner part (``calib_from``) gets what the preceding part's FP32 graph outputs on each
    calibration image, recorded by running that graph.
    """
    to_tensor = plan.frame_to_tensor or _letterbox_tensor(plan.preprocess)
    if part.calib_from is None:
        feeds = []
        for frame in calib.frames:
            x = to_tensor(frame)
            # One feed per sample: frames can yield different numbers of samples (SCLIP's crops),
            # and the calibrator stacks feeds.
            for i in range(x.shape[0]):
                feeds.append({n: t.detach().cpu().numpy()
                              for n, t in zip(part.input_names, part.make_inputs(x[i:i + 1]))})
        return feeds
    if part.calib_from not in files_of or part.calib_feeds is None:
        raise ExportError(f"part {part.name!r} calibrates from {part.calib_from!r}, which must be exported before it "
                          "and give calib_feeds")
    from vlexport.runtime.backends.onnxruntime import OrtBackend

    upstream = next(p for p in plan.parts if p.name == part.calib_from)
    with OrtBackend(files_of[part.calib_from], providers=["CPUExecutionProvider"]) as backend:
        recorded = []
        for frame in calib.frames:
            x = to_tensor(frame)
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(upstream.input_names, upstream.make_inputs(x))}
            recorded.append(part.calib_feeds(backend.infer(feeds)))
    return recorded
