"""The `yolo` family: an Ultralytics YOLOv8/YOLOv5(u) detection checkpoint → part `detector`.

Closed vocabulary (the checkpoint's class names); the same bundle contract as KDEOV's
detector, so the same runtime runs it. This is the real-weights reference of the project.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from vlexport.errors import CheckpointError, UsageError
from vlexport.export.part import OutputTolerance, Part
from vlexport.export.bundle_export import ExportPlan, ExportReport, PrecisionOptions, write_bundle
from vlexport.export.command import PRECISION_OPTIONS, FamilyCommand, PrecisionFields, default_out, own_fields, precision_from
from vlexport.export.samples import parity_batch, yolo_preprocess
from vlexport.runtime.bundle import Bundle, sha256_file
from vlexport.runtime.spec import PartSignature, TensorSpec

log = logging.getLogger("vlexport")


@dataclass
class YoloExportOptions:
    """Every knob of `vlexport yolo`."""

    checkpoint: Path
    out: Path
    trust_checkpoint: bool = False
    arch: str | None = None
    imgsz: int = 640
    opset: int = 17
    dynamic_batch: bool = False
    parity_source: str | None = None
    parity_count: int = 4
    score_threshold: float = 0.25
    iou_threshold: float = 0.7
    max_detections: int = 300
    overwrite: bool = False
    precision: PrecisionOptions | None = None


@dataclass(kw_only=True)
class Options(PrecisionFields):
    """The options of `vlexport yolo`, as typed fields with the CLI's defaults (for :func:`export`)."""

    checkpoint: Path
    trust_checkpoint: bool = False
    arch: str | None = None
    out: Path | None = None  # bundles/yolo-ARCH (the checkpoint's name without --arch)
    overwrite: bool = False
    imgsz: int = 640
    opset: int = 17
    dynamic_batch: bool = False
    score_threshold: float = 0.25
    iou_threshold: float = 0.7
    max_detections: int = 300


COMMAND = FamilyCommand(
    help="""Export an Ultralytics detection checkpoint (closed vocabulary, names from the checkpoint).

    \b
    Examples:
      vlexport yolo --checkpoint yolov8n.pt --trust-checkpoint --fp16
      vlexport yolo --checkpoint yolov8n.pt --trust-checkpoint --int8 \\
          --calib coco128/images/train2017 --calib-size 32 --val coco128/data.yaml --max-drop 1.0
    """,
    options=(
        click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="Ultralytics YOLOv8/YOLOv5u detection checkpoint."),
        click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling the checkpoint (Ultralytics .pt files are pickles: this runs code from the file)."),
        click.option("--arch", help="Architecture (yolov8n, yolov8s, …, yolov5s, …); read from the checkpoint when it says."),
        click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/yolo-ARCH]."),
        click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out."),
        click.option("--imgsz", default=640, show_default=True, type=int, help="Square input size, a multiple of 32."),
        click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21)),
        click.option("--dynamic-batch", is_flag=True, help="Export with a dynamic batch axis (default: batch 1)."),
        *PRECISION_OPTIONS,
        click.option("--score-threshold", default=0.25, show_default=True, type=float),
        click.option("--iou-threshold", default=0.7, show_default=True, type=float),
        click.option("--max-detections", default=300, show_default=True, type=int),
    ),
)


def export_options(options: Options) -> YoloExportOptions:
    """The exporter's options for CLI-level ``options`` (precision checked)."""
    precision = precision_from(options)
    out = default_out(options.out, f"yolo-{options.arch or Path(options.checkpoint).stem}")
    return YoloExportOptions(out=out, precision=precision, parity_source=options.val, **own_fields(options, "out"))


def export(options: Options) -> ExportReport:
    """Write the bundle `vlexport yolo` writes for these options (see :func:`vlexport.export.exporter.export_model`)."""
    return export_yolo(export_options(options))


def create_model(preset: str, **kwargs: Any) -> nn.Module:
    """The detection network of an architecture (``tiny``: YOLOv8n), random weights unless ``checkpoint`` is given."""
    from vlexport.models.common.backbones import LightweightVisualBackbone

    return LightweightVisualBackbone("yolov8n" if preset == "tiny" else preset, **kwargs).eval()


class YoloDetectorGraph(nn.Module):
    """Export wrapper: image → (boxes xyxy, best class score, class id) from the Detect head.

    The best score is ``sigmoid(max_c logit_c)`` (sigmoid is monotonic, so the max is taken on
    the logits and only one sigmoid per anchor is computed). The max runs per level on the class
    branch's own ``[B, C, H, W]`` output, before the levels are joined: no copy of the class maps,
    and in the cpu-target INT8 graph it reduces the uint8 codes along onnxruntime's channels-last
    layout (:func:`vlexport.calibration.qdq_passes.integer_reductions`).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor):
        feats = self.backbone(images)
        boxes = self.backbone.box_regression(feats)
        head = self.backbone.detect
        best = [head.cv3[i](f).max(dim=1) for i, f in enumerate(feats)]  # per level: [B, H, W] twice
        top = torch.cat([v.flatten(1) for v, _ in best], 1)  # [B, N], levels in order, cells row-major
        class_ids = torch.cat([k.flatten(1) for _, k in best], 1)
        return boxes, torch.sigmoid(top), class_ids.to(torch.int32)

    def reference(self, images: torch.Tensor):
        """Ultralytics' own forward (xywh boxes, sigmoid scores), reduced to the same outputs."""
        y = self.backbone.net(images)
        y = y[0] if isinstance(y, (tuple, list)) else y  # [B, 4 + nc, N]
        xy, wh = y[:, :2], y[:, 2:4]
        boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1).transpose(1, 2)
        scores, class_ids = y[:, 4:].max(dim=1)
        return boxes, scores, class_ids.to(torch.int32)


def detect_arch(checkpoint: Path, trust: bool) -> str:
    """The architecture name (e.g. ``yolov8n``) recorded in an Ultralytics checkpoint."""
    from vlexport.models.common.backbones import BACKBONE_NAMES, load_checkpoint_file

    obj = load_checkpoint_file(checkpoint, trust=trust, what="YOLO checkpoint")
    model = obj.get("ema") or obj.get("model") if isinstance(obj, dict) else None
    yaml_file = str((getattr(model, "yaml", None) or {}).get("yaml_file", ""))
    arch = Path(yaml_file).stem.replace("yolov5su", "yolov5s").removesuffix("u")
    if arch not in BACKBONE_NAMES or arch == "simple":
        raise CheckpointError(
            f"cannot tell the architecture of {checkpoint} (yaml {yaml_file!r}); pass --arch "
            f"({', '.join(n for n in BACKBONE_NAMES if n != 'simple')})"
        )
    return arch


def build_plan(opts: YoloExportOptions | Options) -> ExportPlan:
    """Load the checkpoint and describe the `detector` part."""
    if isinstance(opts, Options):
        opts = export_options(opts)
    from vlexport.models.common.backbones import LightweightVisualBackbone

    if opts.imgsz < 32 or opts.imgsz % 32:
        raise UsageError(f"--imgsz must be a multiple of 32 and at least 32, got {opts.imgsz}")
    if not Path(opts.checkpoint).is_file():
        raise UsageError(f"--checkpoint {opts.checkpoint}: no such file")
    arch = opts.arch
    if arch is None:
        obj_is_state_dict = _is_plain_state_dict(opts.checkpoint)
        arch = "yolov8n" if obj_is_state_dict else detect_arch(opts.checkpoint, opts.trust_checkpoint)
    log.info("loading %s from %s…", arch, opts.checkpoint)
    backbone = LightweightVisualBackbone(arch, checkpoint=opts.checkpoint, trust_checkpoint=opts.trust_checkpoint).eval()
    names = backbone.source_names or [f"class{i}" for i in range(backbone.num_source_classes)]
    size = opts.imgsz
    preprocess = yolo_preprocess(size)
    images, source = parity_batch(preprocess, opts.parity_source, opts.parity_count)
    batch: int | str = "batch" if opts.dynamic_batch else 1
    graph = YoloDetectorGraph(backbone).eval()
    detector = Part(
        name="detector",
        module=graph,
        reference=graph.reference,
        io=PartSignature(inputs=(TensorSpec("images", "float32", (batch, 3, size, size)),),
                  outputs=(TensorSpec("boxes", "float32", (batch, "anchors", 4)),
                           TensorSpec("scores", "float32", (batch, "anchors")),
                           TensorSpec("class_ids", "int32", (batch, "anchors")))),
        make_inputs=lambda x: (x,),
        tolerances={
            "fp32": {"boxes": OutputTolerance(max_abs=1e-2), "scores": OutputTolerance(max_abs=1e-4),
                     "class_ids": OutputTolerance(min_agreement=0.99)},
            "fp16": {"boxes": OutputTolerance(min_cosine=0.999), "scores": OutputTolerance(min_cosine=0.999)},
        },
        quantize=True,
    )
    provenance: dict[str, Any] = {"checkpoint": str(opts.checkpoint), "checkpoint_sha256": sha256_file(opts.checkpoint),
                                  "arch": arch, "classes_from": "checkpoint"}
    return ExportPlan(
        family="yolo", task="detect", preset=arch, parts=[detector], parity_images=images, parity_source=source,
        preprocess=preprocess,
        postprocess={"score_threshold": opts.score_threshold, "iou_threshold": opts.iou_threshold,
                     "max_detections": opts.max_detections, "class_agnostic": False},
        vocabulary={"classes": names, "templates": None, "mode": "closed"},
        provenance=provenance, model={"arch": arch, "num_classes": len(names)},
    )


def _is_plain_state_dict(path: Path) -> bool:
    """True for a ``{"state_dict", "names"}`` file (loads without unpickling code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an Ultralytics pickle or a corrupt file: the backbone loader reports which
        return False
    return isinstance(obj, dict) and "state_dict" in obj


def export_yolo(opts: YoloExportOptions) -> ExportReport:
    """Build the plan and write the bundle (see :func:`write_bundle`)."""
    plan = build_plan(opts)
    return write_bundle(plan, opts.out, precision=opts.precision, opset=opts.opset, overwrite=opts.overwrite)


# -- eager rebuild (vlexport bench) -----------------------------------------------------------
def eager_parts(bundle: Bundle) -> dict[str, nn.Module]:
    """The ``detector`` part of an opened YOLO bundle as an eval-mode eager module.

    A head with another class count than the architecture's own needs the checkpoint it was
    exported from; without it (or without ultralytics) this raises
    :class:`~vlexport.errors.EagerRebuildError`.
    """
    from vlexport.errors import EagerRebuildError
    from vlexport.models.common.backbones import LightweightVisualBackbone

    model = bundle.manifest.get("model") or {}
    provenance = bundle.manifest.get("provenance") or {}
    arch = model.get("arch") or provenance.get("arch") or bundle.manifest.get("preset")
    backbone = LightweightVisualBackbone(arch)
    if backbone.name != arch:
        raise EagerRebuildError(f"rebuilding {arch} needs ultralytics (pip install ultralytics)")
    classes = model.get("num_classes")
    if classes is not None and backbone.num_source_classes != classes:
        # The class branch is as wide as the checkpoint's class list: only the checkpoint knows it.
        ckpt = provenance.get("checkpoint")
        if not ckpt or not Path(ckpt).is_file():
            raise EagerRebuildError(f"the {classes}-class {arch} head needs its checkpoint, and {ckpt} no longer exists")
        try:
            backbone = LightweightVisualBackbone(arch, checkpoint=ckpt)
        except CheckpointError as e:
            raise EagerRebuildError(f"cannot rebuild the {classes}-class {arch} head from {ckpt}: {e}") from e
    return {"detector": YoloDetectorGraph(backbone.eval()).eval()}
