"""Parity of an exported graph against its PyTorch module, on the same inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlexport.export.part import OutputTolerance, Part


@dataclass
class OutputParity:
    """Agreement of one output: errors for float tensors, equality rate for integer tensors."""

    name: str
    max_abs: float | None = None
    mean_abs: float | None = None
    cosine: float | None = None
    agreement: float | None = None
    finite: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "name" and v is not None}

    def violations(self, tol: OutputTolerance | None) -> list[str]:
        out = []
        if not self.finite:
            out.append(f"{self.name}: NaN or Inf in the export's output")
        if tol is None:
            return out
        if tol.max_abs is not None and self.max_abs is not None and self.max_abs > tol.max_abs:
            out.append(f"{self.name}: max-abs error {self.max_abs:.3g} > {tol.max_abs:.3g}")
        if tol.min_cosine is not None and self.cosine is not None and self.cosine < tol.min_cosine:
            out.append(f"{self.name}: cosine {self.cosine:.6f} < {tol.min_cosine}")
        if tol.min_agreement is not None and self.agreement is not None and self.agreement < tol.min_agreement:
            out.append(f"{self.name}: agreement {self.agreement:.4%} < {tol.min_agreement:.2%}")
        return out


def compare(name: str, ref: np.ndarray, got: np.ndarray, argmax_axis: int | None = None) -> OutputParity:
    """Compare one output tensor of the export (``got``) with PyTorch's (``ref``)."""
    if ref.shape != got.shape:
        return OutputParity(name=name, max_abs=float("inf"), finite=bool(np.isfinite(got).all()) if got.dtype.kind == "f" else True)
    if ref.dtype.kind in "iub":
        agree = float((ref == got).mean()) if ref.size else 1.0
        return OutputParity(name=name, agreement=agree)
    r = ref.astype(np.float64).ravel()
    g = got.astype(np.float64).ravel()
    finite = bool(np.isfinite(g).all())
    if not finite or r.size == 0:
        return OutputParity(name=name, finite=finite, max_abs=float("inf") if not finite else 0.0)
    diff = np.abs(r - g)
    denom = np.linalg.norm(r) * np.linalg.norm(g)
    cos = float(r @ g / denom) if denom > 0 else float(np.array_equal(r, g))
    agree = None
    if argmax_axis is not None:  # e.g. per-pixel class agreement of segmentation logits
        agree = float((ref.argmax(argmax_axis) == got.argmax(argmax_axis)).mean())
    return OutputParity(name=name, max_abs=float(diff.max()), mean_abs=float(diff.mean()), cosine=cos, finite=finite,
                        agreement=agree)


Batches = list[tuple[torch.Tensor, ...]]


def _concat(outs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([o[k] for o in outs], axis=0) for k in outs[0]}


def torch_outputs(part: Part, batches: Batches) -> dict[str, np.ndarray]:
    """Run the PyTorch module on every batch; outputs named as the part declares, batches concatenated."""
    outs = []
    fn = part.reference if part.reference is not None else part.module.eval()
    with torch.no_grad():
        for inputs in batches:
            out = fn(*inputs)
            if isinstance(out, torch.Tensor):
                out = (out,)
            outs.append({n: t.detach().cpu().numpy() for n, t in zip(part.output_names, out)})
    return _concat(outs)


def onnx_outputs(path: Path, part: Part, batches: Batches, threads: int | None = None) -> dict[str, np.ndarray]:
    """Run the exported file through the runtime's own onnxruntime backend on the CPU provider."""
    from vlexport.runtime.backends.onnxruntime import OrtBackend

    outs = []
    with OrtBackend(path, providers=["CPUExecutionProvider"], threads=threads) as backend:
        for inputs in batches:
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(part.input_names, inputs)}
            outs.append(backend.infer(feeds))
    return _concat(outs)


def check_parity(part: Part, path: Path, precision: str, batches: Batches,
                 reference: dict[str, np.ndarray] | None = None) -> tuple[dict[str, OutputParity], list[str]]:
    """Measure every output over all batches and return (measurements, all tolerance violations)."""
    ref = reference if reference is not None else torch_outputs(part, batches)
    got = onnx_outputs(path, part, batches)
    tols = part.tolerances.get(precision, {})
    results: dict[str, OutputParity] = {}
    problems: list[str] = []
    for name in part.output_names:
        tol = tols.get(name)
        res = compare(name, ref[name], got[name], tol.argmax_axis if tol is not None else None)
        results[name] = res
        problems += [f"{part.name}/{precision} {p}" for p in res.violations(tol)]
    return results, problems
