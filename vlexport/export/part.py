"""Declarative description of one exported graph (in the spirit of optimum's export configs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vlexport.runtime.spec import PartSignature


@dataclass(frozen=True)
class OutputTolerance:
    """What counts as a faithful export for one output, per precision.

    ``max_abs`` bounds the largest element-wise error against PyTorch; ``min_cosine`` bounds
    the cosine similarity of the flattened tensors; ``min_agreement`` is for integer outputs
    (fraction of equal elements). ``None`` means "record, do not gate".
    """

    max_abs: float | None = None
    min_cosine: float | None = None
    min_agreement: float | None = None
    argmax_axis: int | None = None  # float outputs: also gate the argmax over this axis by min_agreement


@dataclass
class Part:
    """One ONNX graph: a torch module whose positional inputs/outputs follow ``io``.

    ``make_inputs(images)`` turns a pre-processed image batch (float32 [B,3,H,W]) into the
    module's positional example inputs, so parity runs on real pictures when it can.
    ``tolerances`` maps precision → output name → tolerance. ``reference``, when given, is
    the PyTorch function parity is measured against (the model's own eager path) when the
    exported module is a rearranged but equivalent formulation of it.
    """

    name: str
    module: torch.nn.Module
    io: PartSignature
    make_inputs: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    tolerances: dict[str, dict[str, OutputTolerance]] = field(default_factory=dict)
    reference: Callable[..., object] | None = None
    quantize: bool = False  # an INT8 candidate; others stay FP32/FP16
    # INT8 without calibration: ``weight_quantizer(fp32_path, int8_path) -> info`` (e.g. weight-only
    # int8 for a decoder step, whose cost is reading weights); used instead of QDQ calibration.
    weight_quantizer: Callable[[Path, Path], dict] | None = None
    # Inner parts (a decoder fed by an encoder) calibrate on what the preceding part really
    # produces: ``calib_from`` names that part, and ``calib_feeds`` turns its recorded ONNX
    # outputs on one calibration image into this part's feeds.
    calib_from: str | None = None
    calib_feeds: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.io.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.io.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for spec in (*self.io.inputs, *self.io.outputs):
            if spec.dynamic_axes:
                axes[spec.name] = spec.dynamic_axes
        return axes
