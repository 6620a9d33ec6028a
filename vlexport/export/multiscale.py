"""The `multiscale` family: the multi-scale binary segmenter → part `segmenter`.

One graph, ``images [1, 3, S, S] → logits [1, 1, S, S]``, holds everything: the resizes to every
scale, the shared ResNet run on each, the per-level fusion (ABSI or hierarchical), the FPN
decoder and the head. The graph is for one fixed input size ``S`` (the preset's
``image_size`` or ``--imgsz``).

Pre-processing (the manifest's ``preprocess``, run by the torch-free runtime):
letterbox the BGR frame into ``S x S`` (aspect ratio kept, grey 114 padding), BGR → RGB,
``(x / 255 − mean) / std`` with ImageNet's mean and std (what a torchvision ResNet expects).
The letterbox keeps the geometry, so the runtime maps the logits back exactly: it crops the
padded border away and resizes the image region to the source size (see
:mod:`vlexport.runtime.tasks.binary_segment`). The sigmoid and the threshold are applied by the
runtime too (``segment.threshold``), so they can change without a re-export.

Parity: FP32 logits within 1e-4 of PyTorch's (max-abs), or within ``ROUNDING_FACTOR`` times
PyTorch's own float32 error (measured against a float64 copy on the same images) when that is
larger; FP16 cosine ≥ 0.999 and no NaN/Inf. Both figures are in the manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from vlexport.errors import CheckpointError, UsageError
from vlexport.export.part import OutputTolerance, Part
from vlexport.export.bundle_export import ExportPlan, ExportReport, PrecisionOptions, write_bundle
from vlexport.export.command import PRECISION_OPTIONS, FamilyCommand, PrecisionFields, default_out, own_fields, precision_from
from vlexport.export.provenance import checkpoint_provenance
from vlexport.export.samples import parity_batch
from vlexport.runtime.bundle import Bundle, sha256_file
from vlexport.runtime.spec import PartSignature, TensorSpec

log = logging.getLogger("vlexport")

__all__ = ["MultiScaleExportOptions", "multiscale_preprocess", "load_segmenter_state", "fuse_batchnorm",
           "fp32_rounding_error", "build_plan", "export_multiscale", "IMAGENET_MEAN", "IMAGENET_STD",
           "COMMAND", "Options", "export", "export_options"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_VALUE = 114  # close to ImageNet's mean grey: the padding normalises to about zero
FP32_MAX_ABS = 1e-4  # FP32 parity tolerance on the logits …
# … unless PyTorch's own float32 logits are already further than FP32_MAX_ABS / ROUNDING_FACTOR
# from exact (float64) arithmetic on the parity images. A deep random ResNet-50 with ABSI gets
# there (measured ~1.5e-4): two float32 computations that sum in different orders (PyTorch,
# onnxruntime) then differ by about the sum of their own errors, and onnxruntime's was measured at
# up to 1.6x PyTorch's. The floor only tracks arithmetic noise; an export bug is orders larger.
ROUNDING_FACTOR = 4.0
_SHOWN = 4  # keys named per kind of mismatch in a checkpoint error (the rest are counted)


@dataclass
class MultiScaleExportOptions:
    """Every knob of `vlexport multiscale`; ``None`` means the preset's value."""

    out: Path
    preset: str = "r50"
    fusion: str = "absi"
    checkpoint: Path | None = None  # a state dict of the whole segmenter (tensors only)
    backbone_weights: Path | None = None  # a torchvision ResNet state dict, for an untrained head
    imgsz: int | None = None
    class_name: str = "object"
    threshold: float = 0.5
    parity_source: str | None = None
    parity_count: int = 2
    opset: int = 17
    overwrite: bool = False
    precision: PrecisionOptions | None = None


@dataclass(kw_only=True)
class Options(PrecisionFields):
    """The options of `vlexport multiscale`, as typed fields with the CLI's defaults (for :func:`export`)."""

    preset: str = "r50"
    fusion: str = "absi"
    checkpoint: Path | None = None
    backbone_weights: Path | None = None
    imgsz: int | None = None
    class_name: str = "object"
    threshold: float = 0.5
    out: Path | None = None  # bundles/multiscale-PRESET-FUSION
    overwrite: bool = False
    opset: int = 17


COMMAND = FamilyCommand(
    help="""Export the multi-scale binary segmenter (part: segmenter; all scales and the fusion in one graph).

    \b
    Examples:
      vlexport multiscale --checkpoint cod_r50.pt --class-name animal --fp16
      vlexport multiscale --fusion hierarchical --backbone-weights resnet50.pt
      vlexport multiscale --preset tiny --imgsz 128 --out /tmp/ms    # seconds, random weights
      vlexport run bundles/multiscale-r50-absi --source video.mp4 --save out.mp4 --jsonl out.jsonl
    """,
    options=(
        click.option("--preset", default="r50", show_default=True, help="tiny (ResNet-18, 320) or r50 (ResNet-50, 352)."),
        click.option("--fusion", default="absi", show_default=True, type=click.Choice(["absi", "hierarchical"]),
                     help="How the 0.5x/1.0x/1.5x features are fused: attention across scales, or coarse-to-fine merges."),
        click.option("--checkpoint", type=click.Path(path_type=Path),
                     help="Trained segmenter: torch.save(model.state_dict()) of the same --preset and --fusion (tensors only)."),
        click.option("--backbone-weights", type=click.Path(path_type=Path),
                     help="torchvision ResNet state dict for the backbone of an otherwise untrained model."),
        click.option("--imgsz", type=int, help="Square input size, a multiple of 32 (default: the preset's)."),
        click.option("--class-name", default="object", show_default=True, help="Name of the foreground class."),
        click.option("--threshold", default=0.5, show_default=True, type=float,
                     help="Foreground where the probability is above this (the runtime can override it)."),
        click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/multiscale-PRESET-FUSION]."),
        click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out."),
        click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21)),
        *PRECISION_OPTIONS,
    ),
)


def export_options(options: Options) -> MultiScaleExportOptions:
    """The exporter's options for CLI-level ``options`` (precision checked)."""
    precision = precision_from(options)
    out = default_out(options.out, f"multiscale-{options.preset}-{options.fusion}")
    return MultiScaleExportOptions(out=out, precision=precision, parity_source=options.val,
                                   **own_fields(options, "out"))


def export(options: Options) -> ExportReport:
    """Write the bundle `vlexport multiscale` writes for these options (see :func:`vlexport.export.exporter.export_model`)."""
    return export_multiscale(export_options(options))


def multiscale_preprocess(size: int) -> dict[str, Any]:
    """The manifest's pre-processing: letterbox to ``size x size``, RGB, ImageNet mean/std."""
    return {"size": [size, size], "resize": "letterbox", "pad_value": PAD_VALUE, "color": "RGB",
            "scale": 1.0 / 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _check_options(opts: MultiScaleExportOptions) -> None:
    from vlexport.models.multiscale.model import FUSION_MODES, MULTISCALE_PRESETS

    if opts.preset not in MULTISCALE_PRESETS:
        raise UsageError(f"unknown multiscale preset {opts.preset!r}; choose one of {', '.join(MULTISCALE_PRESETS)}")
    if opts.fusion not in FUSION_MODES:
        raise UsageError(f"unknown --fusion {opts.fusion!r}; choose one of {', '.join(FUSION_MODES)}")
    if opts.imgsz is not None and (isinstance(opts.imgsz, bool) or not isinstance(opts.imgsz, int)
                                   or opts.imgsz < 32 or opts.imgsz % 32):
        raise UsageError(f"--imgsz must be a multiple of 32 and at least 32, got {opts.imgsz}")
    if not 0.0 < float(opts.threshold) < 1.0:
        raise UsageError(f"--threshold is a probability strictly between 0 and 1, got {opts.threshold}")
    name = (opts.class_name or "").strip()
    if not name or name == "background":
        raise UsageError("--class-name must name the foreground (not empty, not 'background'), "
                         f"got {opts.class_name!r}")
    if opts.parity_count < 1:
        raise UsageError(f"the parity check needs at least 1 image, got {opts.parity_count}")
    if opts.checkpoint is not None and opts.backbone_weights is not None:
        raise UsageError("--backbone-weights starts an untrained segmenter from a ResNet; a --checkpoint already "
                         "holds the whole model (backbone included): pass one of them")
    for p, flag in ((opts.checkpoint, "--checkpoint"), (opts.backbone_weights, "--backbone-weights")):
        if p is not None and not Path(p).is_file():
            raise UsageError(f"{flag} {p}: no such file")
    prec = opts.precision
    if prec is not None and prec.int8 and prec.val:
        from vlexport.data.detection import dataset_kind

        if dataset_kind(prec.val) is not None:
            raise UsageError(f"--val {prec.val} is a labelled detection dataset, but this is a segmenter: its INT8 "
                             "accuracy gate measures foreground IoU on masks (a COCO semantic.yaml or VOC pairs); "
                             "pass those, or an image folder (parity only)")


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", … ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def load_segmenter_state(model: torch.nn.Module, path: str | Path, *, hint: str = "") -> None:
    """Load a segmenter state dict from ``path`` (``weights_only``) after checking every key and shape.

    The file holds ``model.state_dict()`` (or ``{"state_dict": …}``). All missing, unexpected and
    mis-shaped keys are counted in one :class:`CheckpointError` line, the first few by name, with
    ``hint`` appended (e.g. which preset and fusion the model was built with).
    """
    from vlexport.models.common.backbones import load_checkpoint_file

    obj = load_checkpoint_file(path, trust=False, what="multiscale checkpoint")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"multiscale checkpoint {path} holds a {type(obj).__name__}, expected a non-empty "
                              "state dict (torch.save(model.state_dict(), PATH))")
    own = model.state_dict()
    missing = [k for k in own if k not in obj]
    unexpected = [str(k) for k in obj if k not in own]
    mismatched = [f"{k} (checkpoint {list(getattr(v, 'shape', ()))} vs model {list(own[k].shape)})"
                  for k, v in obj.items()
                  if k in own and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_names(mismatched)}")
    if problems:
        raise CheckpointError(f"multiscale checkpoint {path} does not match the model{hint}: " + "; ".join(problems))
    model.load_state_dict(dict(obj), strict=True)


def fuse_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``model`` with every ``Conv2d`` → ``BatchNorm2d`` pair folded into the convolution.

    Pairs are a ``convN``/``bnN`` attribute pair (torchvision's ResNet blocks) or consecutive items
    of an ``nn.Sequential`` (the stem, downsample branches, the decoder and merge blocks); the
    folded BatchNorm becomes an ``Identity``. Why: the exporter folds BatchNorm itself, but once
    per *call*, and the shared ResNet is called once per scale, so the graph would carry three
    folded copies of the backbone's weights. Folded here, each weight is one parameter that all
    three scales' convolutions share in the graph.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            items = list(module)
            for i in range(len(items) - 1):
                if isinstance(items[i], nn.Conv2d) and isinstance(items[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(items[i], items[i + 1])
                    module[i + 1] = nn.Identity()
        for name, child in list(module.named_children()):
            if name.startswith("conv") and isinstance(child, nn.Conv2d):
                bn = getattr(module, "bn" + name[len("conv"):], None)
                if isinstance(bn, nn.BatchNorm2d):
                    setattr(module, name, fuse_conv_bn_eval(child, bn))
                    setattr(module, "bn" + name[len("conv"):], nn.Identity())
    return fused


def fp32_rounding_error(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Max |logits in float32 − logits in float64| of ``model`` over ``images`` (one at a time)."""
    double = copy.deepcopy(model).double().eval()
    worst = 0.0
    with torch.no_grad():
        for i in range(images.shape[0]):
            x = images[i:i + 1]
            worst = max(worst, float((model(x).double() - double(x.double())).abs().max()))
    return worst


def _build_model(opts: MultiScaleExportOptions):
    from vlexport.models.multiscale.model import build_multiscale

    overrides = {"image_size": int(opts.imgsz)} if opts.imgsz is not None else {}
    log.info("building the multiscale %s segmenter (%s fusion)…", opts.preset, opts.fusion)
    model = build_multiscale(opts.preset, opts.fusion, pretrained_backbone=opts.backbone_weights, **overrides)
    notes: list[str] = []
    if opts.checkpoint is not None:
        log.info("loading %s…", opts.checkpoint)
        hint = f" (built as --preset {opts.preset} --fusion {opts.fusion}; was it trained as another?)"
        load_segmenter_state(model, opts.checkpoint, hint=hint)
    elif opts.backbone_weights is not None:
        notes.append("no --checkpoint: the ResNet comes from --backbone-weights but the scale fusion, decoder and "
                     "head are UNTRAINED (random weights): masks are meaningless")
    else:
        notes.append("no --checkpoint: the segmenter is UNTRAINED (random weights): masks are meaningless")
    return model.eval(), notes


def build_plan(opts: MultiScaleExportOptions | Options) -> ExportPlan:
    """Build (and load) the segmenter and describe the `segmenter` part and the runtime's settings."""
    if isinstance(opts, Options):
        opts = export_options(opts)
    _check_options(opts)
    model, notes = _build_model(opts)
    cfg = model.config
    size = int(cfg.image_size)
    preprocess = multiscale_preprocess(size)
    images, source = parity_batch(preprocess, opts.parity_source, opts.parity_count)
    log.info("measuring PyTorch's own float32 rounding on the %d parity image(s) (a float64 copy)…", images.shape[0])
    rounding = fp32_rounding_error(model, images)
    fp32_tol = max(FP32_MAX_ABS, ROUNDING_FACTOR * rounding)
    if fp32_tol > FP32_MAX_ABS:
        log.info("PyTorch's float32 logits are %.2g from float64: the FP32 parity tolerance is %.2g instead of %.0e",
                 rounding, fp32_tol, FP32_MAX_ABS)
    part = Part(
        name="segmenter",
        module=fuse_batchnorm(model),
        reference=model,  # parity against the model as trained (BatchNorm unfolded)
        io=PartSignature(inputs=(TensorSpec("images", "float32", (1, 3, size, size)),),
                  outputs=(TensorSpec("logits", "float32", (1, 1, size, size)),)),
        make_inputs=lambda x: (x,),
        tolerances={"fp32": {"logits": OutputTolerance(max_abs=fp32_tol)},
                    "fp16": {"logits": OutputTolerance(min_cosine=0.999)}},
        quantize=True,
    )
    processor = model.processor
    classes = ["background", opts.class_name.strip()]
    provenance: dict[str, Any] = checkpoint_provenance(opts.checkpoint)
    if opts.backbone_weights is not None:
        provenance.update(backbone_weights=str(opts.backbone_weights),
                          backbone_weights_sha256=sha256_file(opts.backbone_weights))
    return ExportPlan(
        family="multiscale", task="segment", preset=opts.preset, parts=[part], parity_images=images,
        parity_source=source, preprocess=preprocess,
        vocabulary={"classes": classes, "templates": None, "mode": "closed"},
        provenance=provenance,
        model={"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()},
               "parameters": int(sum(p.numel() for p in model.parameters())),
               "fp32_parity": {"max_abs_tolerance": fp32_tol, "torch_fp32_vs_fp64_max_abs": rounding}},
        warnings=notes,
        extra_manifest={"segment": {
            "threshold": float(opts.threshold), "classes": classes, "output": "logits",
            "fusion": cfg.fusion, "scales": list(processor.scales),
            "scale_sizes": [list(s) for s in processor.scale_sizes(size, size)],
            "mask": "logits cropped to the letterboxed image, resized bilinearly to the source, "
                    "foreground where sigmoid(logit) > threshold"}},
    )


def export_multiscale(opts: MultiScaleExportOptions) -> ExportReport:
    """Check the options, build the plan and write the bundle (see :func:`write_bundle`).

    A user mistake raises before anything is written; a failed parity check leaves nothing at ``opts.out``.
    """
    opts = dataclasses.replace(opts, precision=opts.precision or PrecisionOptions())
    opts.precision.check()
    plan = build_plan(opts)
    for note in plan.warnings:
        log.warning("WARNING: %s", note)
    return write_bundle(plan, opts.out, precision=opts.precision, opset=opts.opset, overwrite=opts.overwrite)


# -- eager rebuild (vlexport bench) -----------------------------------------------------------
def eager_parts(bundle: Bundle) -> dict[str, torch.nn.Module]:
    """The ``segmenter`` part of an opened multi-scale bundle as an eval-mode eager module."""
    from vlexport.export.eager import manifest_model_config
    from vlexport.models.multiscale.model import MULTISCALE_PRESETS, build_multiscale

    cfg = manifest_model_config(bundle)
    fusion = cfg.pop("fusion", "absi")
    preset = bundle.manifest.get("preset")
    # Every config field is passed, so the preset only has to exist.
    preset = preset if preset in MULTISCALE_PRESETS else next(iter(MULTISCALE_PRESETS))
    return {"segmenter": build_multiscale(preset, fusion, **cfg).eval()}
