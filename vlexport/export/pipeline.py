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
from vlexport.export.fp16 import FRAGILE_OPS, convert_to_fp16, overflowing_nodes
from vlexport.export.onnx_export import DEFAULT_OPSET, export_part
from vlexport.export.parity import check_parity, torch_outputs
from vlexport.export.part import Part

log = logging.getLogger("vlexport")


@dataclass
class PrecisionOptions:
    """Which precisions to write, and how INT8 is calibrated and gated."""

    fp16: bool = False
    int8: bool = False
    calib: str | None = None
    calib_size: int = 64
    calib_seed: int = 0
    calib_method: str = "entropy"
    int8_target: str = "tensorrt"  # or "cpu": see vlexport.calibration.quantize.INT8_TARGETS
    val: str | None = None  # labelled dataset: with int8, enables the accuracy gate
    max_drop: float = 1.0  # points of the task metric INT8 may lose against FP32
    max_gate_rounds: int = 7

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
    # dropped; figures go to ``validation[name]``; a violation stops the export like a parity failure.
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

    All parity violations of all parts are collected and reported together in one
    :class:`ExportError`; in that case, or if the accuracy gate gives up, nothing is left at ``out``.
    """
    t0 = time.perf_counter()
    prec = precision or PrecisionOptions(fp16=fp16)
    prec.check()
    parity: dict[str, dict[str, dict[str, float]]] = {}
    problems: list[str] = []
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
                onnx.save(convert_to_fp16(onnx.load(str(fp32_path)), keep_fp32_nodes=kept), str(writer.path(fp16_rel)))
                files["fp16"] = fp16_rel
                extra.setdefault("fp16", {})[part.name] = {"kept_fp32_op_types": list(FRAGILE_OPS),
                                                           "kept_fp32_nodes": kept}
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
                                                           "op_types": list(q.op_types)}
            for p in files:
                log.info("checking %s/%s against PyTorch on %d image(s)…", part.name, p, plan.parity_images.shape[0])
                res, bad = check_parity(part, writer.path(files[p]), p, batches, reference)
                parity[f"{part.name}/{p}"] = {k: v.to_dict() for k, v in res.items()}
                problems += bad
            parts_manifest[part.name] = {**part.io.to_dict(), "files": files, "engines": {}}
        written = {name: {p: writer.path(rel) for p, rel in entry["files"].items()}
                   for name, entry in parts_manifest.items()}
        family_checks: dict[str, Any] = {}
        if not problems:
            for check in plan.checks:
                name, figures, bad, *rest = check(written)
                family_checks[name] = figures
                problems += bad
                for part_name, p in (rest[0] if rest else []):  # files a family's own gate refused
                    rel = parts_manifest[part_name]["files"].pop(p)
                    writer.path(rel).unlink()
                    parity.pop(f"{part_name}/{p}", None)
                    extra.get("weight_only", {}).pop(part_name, None)
                    log.warning("%s/%s dropped: the %s check refused it", part_name, p, name)
        if problems:
            raise ExportError(
                "the export does not match PyTorch, so no bundle was written: " + "; ".join(problems)
            )
        vocabulary = dict(plan.vocabulary) if plan.vocabulary else None
        if plan.vocab_arrays is not None and vocabulary is not None:
            vocabulary["file"] = writer.write_vocab(*plan.vocab_arrays)
        manifest = {
            "family": plan.family,
            "task": plan.task,
            "preset": plan.preset,
            "provenance": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "opset": opset,
                "python": platform.python_version(),
                **plan.provenance,
            },
            "model": plan.model,
            "preprocess": plan.preprocess,
            "vocabulary": vocabulary,
            "parts": parts_manifest,
            "postprocess": plan.postprocess,
            "validation": {"parity": parity, "parity_images": {"source": plan.parity_source,
                                                               "count": int(plan.parity_images.shape[0])},
                           **family_checks},
            "warnings": plan.warnings,
        }
        if "fp16" in extra:
            manifest["fp16"] = extra["fp16"]
        manifest.update(plan.extra_manifest)
        metrics: dict[str, dict[str, float]] = {}
        gate_rounds: list[dict[str, Any]] = []
        if prec.int8:
            manifest["calibration"] = {
                "target": prec.int8_target, "method": prec.calib_method, "source": calib.source,
                "kind": calib.kind, "count": len(calib.frames), "seed": prec.calib_seed, "sha256": calib.sha256,
                "excluded_nodes": {k: v["excluded_nodes"] for k, v in extra.get("int8", {}).items()},
                "weight_only": extra.get("weight_only", {}),
            }
            if prec.val and _is_labelled(prec.val):
                from vlexport.calibration.gate import run_accuracy_gate

                metrics, gate_rounds = run_accuracy_gate(writer, manifest, plan, prec, extra["int8"], calib)
                manifest["calibration"]["excluded_nodes"] = {k: v["excluded_nodes"] for k, v in extra["int8"].items()}
                manifest["validation"]["metrics"] = metrics
                manifest["validation"]["gate"] = {"data": prec.val, "max_drop": prec.max_drop, "rounds": gate_rounds}
        path = writer.commit(manifest)
    files_written = sorted(p.name for p in path.iterdir())
    return ExportReport(path=path, parity=parity, files=files_written, seconds=time.perf_counter() - t0,
                        metrics=metrics, gate=gate_rounds)


def _is_labelled(source: str) -> bool:
    """Whether ``--val`` is a labelled dataset (it gates INT8) or only images (parity only)."""
    from vlexport.calibration.datasets import dataset_kind

    if dataset_kind(source) is None:
        log.warning("--val %s has no labels: the INT8 accuracy gate is skipped (pass a YOLO data.yaml/folder "
                    "or a COCO json to measure mAP)", source)
        return False
    return True


def _calibration_set(plan: ExportPlan, prec: PrecisionOptions):
    """The calibration frames (the gate sets these images aside when it evaluates)."""
    from vlexport.calibration.readers import calibration_frames

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
