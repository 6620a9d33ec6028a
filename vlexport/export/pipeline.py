"""Family-agnostic export: parts → ONNX (fp32, fp16) → parity → bundle.

A family module builds an :class:`ExportPlan` (its parts, pre/post-processing, vocabulary,
provenance); :func:`write_bundle` does the rest identically for every family.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from vlexport.errors import ExportError
from vlexport.export.bundle_writer import BundleWriter
from vlexport.export.fp16 import FRAGILE_OPS, convert_to_fp16
from vlexport.export.onnx_export import DEFAULT_OPSET, export_part
from vlexport.export.parity import check_parity, torch_outputs
from vlexport.export.part import Part

log = logging.getLogger("vlexport")


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


@dataclass
class ExportReport:
    """What was written and how faithful it is."""

    path: Path
    parity: dict[str, dict[str, dict[str, float]]]
    files: list[str]
    seconds: float


def _batches(part: Part, images: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    batch_dim = part.io.inputs[0].shape[0] if part.io.inputs[0].shape else None
    if isinstance(batch_dim, str):
        return [part.make_inputs(images)]
    # Static batch: one image at a time (the shape the graph was exported with).
    return [part.make_inputs(images[i:i + 1]) for i in range(images.shape[0])]


def write_bundle(plan: ExportPlan, out: str | Path, *, fp16: bool = False, opset: int = DEFAULT_OPSET,
                 overwrite: bool = False, simplify: bool = True) -> ExportReport:
    """Export every part of ``plan`` (FP32, and FP16 if asked), check parity, write the bundle.

    All parity violations of all parts are collected and reported together in one
    :class:`ExportError`; in that case nothing is left at ``out``.
    """
    t0 = time.perf_counter()
    precisions = ["fp32"] + (["fp16"] if fp16 else [])
    parity: dict[str, dict[str, dict[str, float]]] = {}
    problems: list[str] = []
    parts_manifest: dict[str, Any] = {}
    with BundleWriter(out, overwrite=overwrite) as writer:
        for part in plan.parts:
            batches = _batches(part, plan.parity_images)
            reference = torch_outputs(part, batches)
            files: dict[str, str] = {}
            fp32_rel = f"{part.name}.onnx"
            log.info("exporting %s (fp32, opset %d)…", part.name, opset)
            export_part(part, batches[0], writer.path(fp32_rel), opset=opset, simplify=simplify)
            files["fp32"] = fp32_rel
            if fp16:
                log.info("converting %s to fp16 (keeping %s in fp32)…", part.name, ", ".join(FRAGILE_OPS[:4]) + ", …")
                fp16_rel = f"{part.name}.fp16.onnx"
                model16 = convert_to_fp16(onnx.load(str(writer.path(fp32_rel))))
                onnx.save(model16, str(writer.path(fp16_rel)))
                files["fp16"] = fp16_rel
            for precision in precisions:
                log.info("checking %s/%s against PyTorch on %d image(s)…", part.name, precision, plan.parity_images.shape[0])
                res, bad = check_parity(part, writer.path(files[precision]), precision, batches, reference)
                parity[f"{part.name}/{precision}"] = {k: v.to_dict() for k, v in res.items()}
                problems += bad
            parts_manifest[part.name] = {**part.io.to_dict(), "files": files, "engines": {}}
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
                                                               "count": int(plan.parity_images.shape[0])}},
            "warnings": plan.warnings,
        }
        path = writer.commit(manifest)
    files_written = sorted(p.name for p in path.iterdir())
    return ExportReport(path=path, parity=parity, files=files_written, seconds=time.perf_counter() - t0)
