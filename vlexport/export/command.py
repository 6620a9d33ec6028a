"""What every export command shares, declared once: the precision options, --classes/--vocab, --clip-activation.

A family declares its CLI in its export module as a :class:`FamilyCommand` (help text and click
options, in ``--help`` order); :mod:`vlexport.cli.export` turns each registered family into a
command. The precision fields of a family's ``Options`` come from :class:`PrecisionFields` and
become a checked :class:`~vlexport.export.bundle_export.PrecisionOptions` in one place,
:func:`precision_from`. Torch-free (click only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

if TYPE_CHECKING:
    from vlexport.export.bundle_export import PrecisionOptions

__all__ = ["FamilyCommand", "PRECISION_OPTIONS", "PrecisionFields", "clip_activation_option", "default_out",
           "own_fields", "parse_classes", "precision_from"]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

#: --fp16/--int8 and the INT8 calibration and accuracy-gate options, shared by every family.
PRECISION_OPTIONS: tuple[Decorator, ...] = (
    click.option("--fp16", is_flag=True, help="Also write FP16 graphs (FP32 inputs/outputs; fragile and overflowing ops stay FP32)."),
    click.option("--int8", is_flag=True, help="Also write an INT8 (QDQ) graph; needs --calib."),
    click.option("--calib", help="Calibration images: a folder, a video, a YOLO data.yaml/folder or a COCO json."),
    click.option("--calib-size", default=64, show_default=True, type=int, help="Number of calibration images (sampled with --calib-seed)."),
    click.option("--calib-seed", default=0, show_default=True, type=int),
    click.option("--calib-method", default="entropy", show_default=True,
                 type=click.Choice(["minmax", "entropy", "percentile", "auto"]),
                 help="Activation ranges: min-max, entropy (KL), percentile, or auto: per tensor, the candidate "
                      "(min-max or a percentile clip) with the lowest measured quantisation error."),
    click.option("--int8-target", default="tensorrt", show_default=True, type=click.Choice(["tensorrt", "cpu"]),
                 help="tensorrt: signed symmetric Q/DQ that TensorRT and any onnxruntime run; cpu: uint8 activations, "
                      "onnxruntime's fast x86 path (TensorRT cannot take it)."),
    click.option("--val", help="Images for the parity check; a labelled dataset (YOLO data.yaml/folder or COCO json for "
                               "detectors, masks for segmenters) also gates INT8 by the task metric and runs the "
                               "precision search (which layers stay float, by measured accuracy and latency)."),
    click.option("--max-drop", default=1.0, show_default=True, type=float,
                 help="Points of the task metric (mAP50-95, mIoU, IoU) INT8 may lose against FP32 (with --val)."),
    click.option("--strict", is_flag=True,
                 help="Fail (write nothing) when an FP16 or INT8 graph fails its checks; by default it is left out "
                      "of the bundle with a warning and the reason in the manifest (FP32 failing always fails)."),
)

#: --clip-activation, shared by the families with a CLIP tower.
clip_activation_option: Decorator = click.option(
    "--clip-activation", type=click.Choice(["quickgelu", "gelu"]), default=None,
    help="MLP activation of the CLIP towers [default: from the weights: QuickGELU for OpenAI's layout or tags, "
         "the open_clip config's otherwise]. Pass gelu for open_clip weights trained with nn.GELU.")


@dataclass(frozen=True)
class FamilyCommand:
    """A family's export command: its help text (click's docstring format) and its click options in order."""

    help: str
    options: tuple[Decorator, ...]

    def params(self) -> list[click.Parameter]:
        """The click parameters the options declare, in ``--help`` order."""

        def target() -> None:  # click's decorators collect their parameters on a function
            pass

        for option in reversed(self.options):
            option(target)
        return list(reversed(getattr(target, "__click_params__", [])))


@dataclass(kw_only=True)
class PrecisionFields:
    """The precision options of every family's ``Options`` (the CLI's ``PRECISION_OPTIONS``)."""

    fp16: bool = False
    int8: bool = False
    calib: str | None = None
    calib_size: int = 64
    calib_seed: int = 0
    calib_method: str = "entropy"
    int8_target: str = "tensorrt"  # or "cpu": see vlexport.calibration.quantize.INT8_TARGETS
    val: str | None = None  # parity images; a labelled dataset also gates INT8 by the task metric
    max_drop: float = 1.0  # points of the task metric INT8 may lose against FP32
    strict: bool = False  # a failing FP16/INT8 fails the export instead of being left out


def precision_from(fields: PrecisionFields) -> PrecisionOptions:
    """The checked precision options of a family's ``Options`` (bad values raise UsageError)."""
    from vlexport.export.bundle_export import PrecisionOptions

    shared = {f.name: getattr(fields, f.name) for f in dataclasses.fields(PrecisionFields)}
    precision = PrecisionOptions(**shared)
    precision.check()
    return precision


def parse_classes(classes: str | None, vocab: str | Path | None) -> list[str] | None:
    """--classes "a,b" or --vocab FILE as a list of names; None when neither is given (the family's default)."""
    if classes is None and vocab is None:
        return None
    from vlexport.models.clip.text import parse_vocabulary

    return parse_vocabulary(classes, vocab)


def default_out(out: str | Path | None, name: str) -> Path:
    """``--out``, or ``bundles/NAME`` without one."""
    return Path(out) if out is not None else Path("bundles") / name


def own_fields(options: PrecisionFields, *skip: str) -> dict[str, Any]:
    """A family ``Options``' own fields (not the precision ones, nor ``skip``) as keyword arguments."""
    shared = {f.name for f in dataclasses.fields(PrecisionFields)}
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if f.name not in shared and f.name not in skip}
