"""PyTorch module → checked ONNX file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from vlexport.errors import ExportError
from vlexport.export.part import Part

log = logging.getLogger("vlexport")

DEFAULT_OPSET = 17


def export_part(part: Part, example: tuple[torch.Tensor, ...], path: Path, *, opset: int = DEFAULT_OPSET,
                simplify: bool = True) -> Path:
    """Export ``part.module`` to ``path`` with the part's names and named dynamic axes.

    Uses the TorchScript-based exporter (``dynamo=False``): it gives the plain, constant-folded
    graphs that TensorRT and onnxruntime digest best and that every opset from 13 supports.
    The result is simplified with onnxslim when available and always passes the ONNX checker.
    """
    module = part.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constants are expected here
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=part.input_names,
            output_names=part.output_names,
            dynamic_axes=part.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    if simplify:
        model = _simplify(model)
    _check(model, path)
    onnx.save(model, str(path))
    return path


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError:
        return model
    try:
        return onnxslim.slim(model)
    except Exception as e:  # a failed simplification is not fatal: the plain export is valid
        log.warning("onnxslim could not simplify the graph (%s); keeping the unsimplified export", e)
        return model


def _check(model: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph {path.name} fails the ONNX checker: {e}") from e
