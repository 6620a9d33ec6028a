"""The `detr` family: DETR (Carion et al. 2020), optionally with its mask head → part `detector`.

The graph takes one image resized by DETR's rule (short side ``size``, long side at most
``max_size``, no padding, so height and width are dynamic) and the source size, and returns the
official ``PostProcess`` for every query: ``boxes`` xyxy in source pixels, ``scores`` and
``labels`` (the best real class after a softmax over all classes, no-object included), plus
``masks`` (sigmoid probabilities at a quarter of the input resolution) for segmentation models.
The score threshold and the mask resizing are the runtime's (:class:`vlexport.runtime.tasks.detr.DetrTask`).

Parity runs on real frames at their own sizes (each its own batch of one); a family check
(``validation.detr``) additionally measures, per precision, normalised box errors, finiteness of
every output and whether the top-scoring queries and their boxes survive FP16.

With its CLI declaration (``Options``, ``COMMAND``, :func:`export`, as every family's, see
:mod:`vlexport.registry`) beside its samples and family check, this is a little over 500 lines of one job.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import cv2
import numpy as np
import torch
from torch import nn

from vlexport.errors import UsageError
from vlexport.export.part import OutputTolerance, Part
from vlexport.export.bundle_export import ExportPlan, ExportReport, PrecisionOptions, write_bundle
from vlexport.export.command import PRECISION_OPTIONS, FamilyCommand, PrecisionFields, default_out, own_fields, precision_from
from vlexport.export.provenance import checkpoint_provenance
from vlexport.runtime.detr_preprocess import IMAGENET_MEAN, IMAGENET_STD, detr_preprocess
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.spec import PartSignature, TensorSpec

log = logging.getLogger("vlexport")

__all__ = ["COMMAND", "DETRExportOptions", "DetrSamples", "DetectorGraph", "Options", "build_plan", "compare_detr_outputs",
           "export", "export_detr", "export_options"]

#: FP32 parity: largest box error as a fraction of the source image's side, and largest score error.
FP32_BOX_TOL = 1e-4
FP32_SCORE_TOL = 1e-4
#: FP16: the top-K queries by FP32 score (K = min(10, queries // 2)) must stay the top-K …
TOPK = 10
#: … up to scores closer than this (FP16 keeps about three significant digits: such queries have no
#: defined order in FP16) …
TOPK_TIE = 1e-3
#: … and each of them keep its box (IoU with the FP32 box above this).
TOPK_MIN_IOU = 0.9
#: Calibration frames are centre-cropped to this aspect ratio (w/h) before DETR's resize, so that
#: they all give one input shape: onnxruntime's histogram calibrators stack the activations of
#: several inputs and cannot take differently sized ones.
CALIB_ASPECT = 4 / 3


@dataclass
class DETRExportOptions:
    """Every knob of `vlexport detr`.

    Without ``checkpoint`` the ``preset``'s architecture is built with random weights (a loud
    warning goes to the manifest). With one, the architecture comes from the file (``preset`` is
    ignored) and ``dilation`` (None: the file's ``args`` or the default, no dilation) tells DC5
    models apart, which their weights alone cannot. ``classes`` name the model's class ids
    (default: COCO's 91 category ids for 91 classes, else ``class{i}``).
    """

    out: Path
    preset: str = "r50"
    checkpoint: Path | None = None
    trust_checkpoint: bool = False
    dilation: bool | None = None
    size: int = 800
    max_size: int = 1333
    score_threshold: float = 0.7  # the official demo's
    classes: list[str] | None = None
    parity_source: str | None = None
    parity_count: int = 2
    opset: int = 17
    overwrite: bool = False
    precision: PrecisionOptions | None = None


@dataclass(kw_only=True)
class Options(PrecisionFields):
    """The options of `vlexport detr`, as typed fields with the CLI's defaults (for :func:`export`)."""

    preset: str = "r50"
    checkpoint: Path | None = None
    trust_checkpoint: bool = False
    dilation: bool | None = None
    size: int = 800
    max_size: int = 1333
    score_threshold: float = 0.7
    classes: str | None = None  # "name0,name1,…": one per class id
    out: Path | None = None  # bundles/detr-PRESET (the checkpoint's name with one)
    overwrite: bool = False
    opset: int = 17


COMMAND = FamilyCommand(
    help="""Export DETR (part: detector; masks too for segmentation models). No NMS: queries above
    --score-threshold are the detections.

    \b
    Examples:
      vlexport detr --checkpoint detr-r50-e632da11.pth --fp16 --val coco128/images/train2017
      vlexport detr --checkpoint detr-r50-dc5-f0fb7ef5.pth --dilation --out bundles/detr-r50-dc5
      vlexport detr --checkpoint detr-r50-e632da11.pth --int8 --calib coco128/images/train2017 --calib-size 32
      vlexport detr --preset tiny --size 256 --max-size 400 --out /tmp/detr   # seconds, random weights
      vlexport run bundles/detr-r50 --source bus.jpg --save bus_detr.jpg
    """,
    options=(
        click.option("--preset", default="r50", show_default=True,
                     help="Architecture without --checkpoint: tiny, tiny-segm, r50, r50-dc5, r101, r101-dc5, r50-panoptic, …"),
        click.option("--checkpoint", type=click.Path(path_type=Path),
                     help="Official DETR checkpoint ({'model': state_dict, 'args': …}, e.g. detr-r50-e632da11.pth) or a bare "
                          "state dict; its architecture replaces --preset."),
        click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a checkpoint that is more than tensors (runs code from the file)."),
        click.option("--dilation/--no-dilation", default=None,
                     help="DC5 (dilated layer4) or not, for checkpoints without 'args' [default: the file's args, else no]."),
        click.option("--size", default=800, show_default=True, type=click.IntRange(32), help="Short side after resizing."),
        click.option("--max-size", default=1333, show_default=True, type=click.IntRange(32), help="Longest side after resizing."),
        click.option("--score-threshold", default=0.7, show_default=True, type=click.FloatRange(0, 1),
                     help="Queries scoring above this are kept at run time (the official demo's 0.7)."),
        click.option("--classes", help="Comma-separated name of every class id [default: COCO's 91 category ids for 91 classes]."),
        click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/detr-PRESET]."),
        click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out."),
        click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21), help="ONNX opset."),
        *PRECISION_OPTIONS,
    ),
)


def export_options(options: Options) -> DETRExportOptions:
    """The exporter's options for CLI-level ``options`` (precision checked, then the class names)."""
    precision = precision_from(options)
    classes = options.classes
    names = None if classes is None else [c.strip() for c in classes.split(",")]
    if names is not None and not all(names):
        raise UsageError(f"--classes has an empty name in {classes!r}: give one name per class id, comma-separated")
    preset = options.preset if options.checkpoint is None else Path(options.checkpoint).stem
    return DETRExportOptions(out=default_out(options.out, f"detr-{preset}"), classes=names, precision=precision,
                             parity_source=options.val, **own_fields(options, "out", "classes"))


def export(options: Options) -> ExportReport:
    """Write the bundle `vlexport detr` writes for these options (see :func:`vlexport.export.exporter.export_model`)."""
    return export_detr(export_options(options))


# --------------------------------------------------------------------------------------------
# Samples: pre-processed frames of different sizes, each with its source size
# --------------------------------------------------------------------------------------------


class DetrSamples:
    """Pre-processed frames (``[1, 3, H_i, W_i]`` each) and their source sizes ``(w, h)``.

    DETR's inputs differ in size from frame to frame, so they cannot be stacked into one tensor;
    this sequence stands where the pipeline expects a batch (:attr:`ExportPlan.parity_images`, the
    result of ``frame_to_tensor``): ``shape[0]`` is the number of frames and slicing gives
    :class:`DetrSamples` again, which the part's ``make_inputs`` turns into (images, orig_size).
    """

    def __init__(self, images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]):
        if len(images) != len(sizes):
            raise ValueError(f"{len(images)} images but {len(sizes)} sizes")
        self.images = [im if im.dim() == 4 else im.unsqueeze(0) for im in images]
        self.sizes = [(int(w), int(h)) for w, h in sizes]

    @classmethod
    def from_frames(cls, frames: Sequence[np.ndarray], size: int, max_size: int) -> DetrSamples:
        """Pre-process BGR frames exactly as the runtime does."""
        images, sizes = [], []
        for frame in frames:
            x, _ = detr_preprocess(frame, size, max_size)
            images.append(torch.from_numpy(x))
            sizes.append((frame.shape[1], frame.shape[0]))
        return cls(images, sizes)

    @property
    def shape(self) -> tuple[int]:
        return (len(self.images),)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: slice) -> DetrSamples:
        if not isinstance(index, slice):
            raise TypeError("DetrSamples are indexed by slices (they stand for a batch)")
        return DetrSamples(self.images[index], self.sizes[index])

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph's inputs for a single frame: (images [1,3,H,W], orig_size [1,2] = source (w, h))."""
        if len(self.images) != 1:
            raise ValueError(f"the DETR graph takes one frame at a time, got {len(self.images)}")
        w, h = self.sizes[0]
        return self.images[0], torch.tensor([[w, h]], dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# The exported module
# --------------------------------------------------------------------------------------------


class DetectorGraph(nn.Module):
    """Export wrapper: (images, orig_size) → boxes, scores, labels[, masks], the official PostProcess."""

    def __init__(self, model: nn.Module, masks: bool):
        super().__init__()
        self.model = model
        self.masks = masks

    def forward(self, images: torch.Tensor, orig_size: torch.Tensor):
        out = self.model(images)
        prob = out["pred_logits"].softmax(-1)
        scores, labels = prob[..., :-1].max(-1)  # no-object is dropped after the softmax
        cx, cy, w, h = out["pred_boxes"].unbind(-1)
        xyxy = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
        scale = orig_size.repeat(1, 2).unsqueeze(1)  # [B, 1, 4]: (w, h, w, h)
        result = (xyxy * scale, scores, labels)
        if self.masks:
            result += (out["pred_masks"].sigmoid(),)
        return result

    def reference(self, images: torch.Tensor, orig_size: torch.Tensor):
        """The model's eager path followed by :func:`vlexport.models.detr.model.detr_postprocess` (parity reference)."""
        from vlexport.models.detr.model import detr_postprocess

        out = self.model(images)
        scores, labels, boxes = detr_postprocess(out["pred_logits"], out["pred_boxes"], orig_size.flip(-1))
        result = (boxes, scores, labels)
        if self.masks:
            result += (out["pred_masks"].sigmoid(),)
        return result


# --------------------------------------------------------------------------------------------
# Building the plan
# --------------------------------------------------------------------------------------------


def _check_options(opts: DETRExportOptions) -> None:
    for name in ("size", "max_size", "parity_count"):
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if opts.size < 32:
        raise UsageError(f"--size {opts.size} is too small: DETR's backbone has stride 32 (use at least 32)")
    if opts.max_size < opts.size:
        raise UsageError(f"--max-size ({opts.max_size}) must be at least --size ({opts.size})")
    if not 0.0 <= opts.score_threshold <= 1.0:
        raise UsageError(f"--score-threshold must lie in [0, 1], got {opts.score_threshold}")


def _load_model(opts: DETRExportOptions) -> tuple[nn.Module, Any, str, dict[str, Any], list[str]]:
    """(model in eval mode, its config, preset label, provenance, warnings)."""
    from vlexport.models.detr.model import DETR_PRESETS, build_detr
    from vlexport.models.detr.checkpoint import load_detr_checkpoint

    overrides = {} if opts.dilation is None else {"dilation": bool(opts.dilation)}
    notes: list[str] = []
    if opts.checkpoint is None:
        if opts.preset not in DETR_PRESETS:
            raise UsageError(f"unknown DETR preset {opts.preset!r}; choose one of {', '.join(DETR_PRESETS)}")
        torch.manual_seed(0)  # random weights, but the same ones on every run
        model = build_detr(opts.preset, **overrides).eval()
        config = model.config
        notes.append(f"no --checkpoint: DETR {opts.preset} has RANDOM weights, its detections are meaningless")
        provenance: dict[str, Any] = checkpoint_provenance(None, seed=0)
        return model, config, opts.preset, provenance, notes
    model, config, report = load_detr_checkpoint(opts.checkpoint, trust=opts.trust_checkpoint, **overrides)
    log.info("loaded %s", report.summary())
    notes += list(report.warnings)
    if "dilation" in report.assumed:
        notes.append(f"{Path(opts.checkpoint).name} does not record dilation: assumed none; "
                     "pass --dilation for a DC5 model")
    provenance = {
        **checkpoint_provenance(opts.checkpoint),
        "checkpoint_report": {"entries": report.entries, "parameters": report.parameters,
                              "from_args": list(report.from_args), "assumed": list(report.assumed),
                              "dropped": len(report.dropped)},
    }
    return model.eval(), config, "checkpoint", provenance, notes


def _class_names(opts: DETRExportOptions, num_classes: int) -> list[str]:
    from vlexport.models.clip.text import COCO91_CLASSES

    if opts.classes is not None:
        names = [str(c) for c in opts.classes]
        if len(names) != num_classes:
            raise UsageError(f"--classes names {len(names)} class(es) but the model predicts {num_classes} "
                             f"class ids (0..{num_classes - 1}); give one name per id")
        return names
    if num_classes == len(COCO91_CLASSES):
        return list(COCO91_CLASSES)
    return [f"class{i}" for i in range(num_classes)]


def _parity_frames(opts: DETRExportOptions) -> tuple[list[np.ndarray], str]:
    from vlexport.data.readers import parity_frames, synthetic_images

    if opts.parity_source:
        return parity_frames(opts.parity_source, opts.parity_count).frames, str(opts.parity_source)
    # Two aspect ratios, so that the dynamic height and width are exercised.
    frames = synthetic_images(opts.parity_count, seed=0)
    frames = [f if i % 2 == 0 else np.ascontiguousarray(f.transpose(1, 0, 2)) for i, f in enumerate(frames)]
    return frames, "synthetic(seed=0)"


def _common_size(frames: list[np.ndarray]) -> list[np.ndarray]:
    """The frames resized to the first one's size (mask outputs of one size concatenate in the parity)."""
    h, w = frames[0].shape[:2]
    return [f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames]


def _centre_crop(frame: np.ndarray, aspect: float) -> np.ndarray:
    h, w = frame.shape[:2]
    if w / h > aspect:
        cw = max(1, round(h * aspect))
        x0 = (w - cw) // 2
        return frame[:, x0:x0 + cw]
    ch = max(1, round(w / aspect))
    y0 = (h - ch) // 2
    return frame[y0:y0 + ch]


def build_plan(opts: DETRExportOptions | Options) -> ExportPlan:
    """Load or build the model and describe the `detector` part, its checks and the runtime's settings."""
    if isinstance(opts, Options):
        opts = export_options(opts)
    _check_options(opts)
    model, config, preset, provenance, notes = _load_model(opts)
    classes = _class_names(opts, config.num_classes)
    masks = bool(config.masks)
    frames, source = _parity_frames(opts)
    # Each frame at its own size for detection; the mask parity concatenates outputs, so a segmentation
    # model's parity frames share one size (validation.detr checks every frame at its own size).
    parity_frames = _common_size(frames) if masks else frames
    samples = DetrSamples.from_frames(parity_frames, opts.size, opts.max_size)
    if masks and any(f.shape != frames[0].shape for f in frames):
        source += f" (resized to {frames[0].shape[1]}x{frames[0].shape[0]} for the mask parity)"
    graph = DetectorGraph(model, masks).eval()
    q = config.num_queries
    outputs = [TensorSpec("boxes", "float32", (1, q, 4)), TensorSpec("scores", "float32", (1, q)),
               TensorSpec("labels", "int64", (1, q))]
    if masks:
        outputs.append(TensorSpec("masks", "float32", (1, q, "mask_height", "mask_width")))
    # Boxes are in source pixels: the FP32 tolerance is FP32_BOX_TOL of the largest parity image's side.
    box_tol = FP32_BOX_TOL * max(max(w, h) for w, h in samples.sizes)
    fp32 = {"boxes": OutputTolerance(max_abs=box_tol), "scores": OutputTolerance(max_abs=FP32_SCORE_TOL),
            "labels": OutputTolerance(min_agreement=0.99)}
    fp16 = {"boxes": OutputTolerance(min_cosine=0.999), "scores": OutputTolerance(min_cosine=0.99)}
    if masks:
        fp32["masks"] = OutputTolerance(max_abs=1e-3)
        fp16["masks"] = OutputTolerance(min_cosine=0.99)
    part = Part(
        name="detector",
        module=graph,
        reference=graph.reference,
        io=PartSignature(inputs=(TensorSpec("images", "float32", (1, 3, "height", "width")),
                          TensorSpec("orig_size", "float32", (1, 2))),
                  outputs=tuple(outputs)),
        make_inputs=lambda s: s.inputs(),
        tolerances={"fp32": fp32, "fp16": fp16},
        quantize=True,
    )

    def calibration_sample(frame: np.ndarray) -> DetrSamples:
        crop = _centre_crop(frame, CALIB_ASPECT)
        return DetrSamples.from_frames([crop], opts.size, opts.max_size)

    for note in notes:
        log.warning("%s" if note.startswith("!!!") else "!!! %s", note)
    return ExportPlan(
        family="detr", task="detect", preset=preset, parts=[part],
        parity_images=samples,  # type: ignore[arg-type]  # a batch of differently sized frames
        parity_source=source,
        preprocess={"resize": "detr", "short_side": opts.size, "max_size": opts.max_size,
                    "interpolation": "bilinear", "padding": "none", "color": "RGB",
                    "scale": 1.0 / 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        postprocess={"type": "detr", "score_threshold": float(opts.score_threshold), "masks": masks,
                     "mask_threshold": 0.5, "boxes": "xyxy source pixels, not clipped", "nms": False},
        vocabulary={"classes": classes, "mode": "fixed", "label_space": "class ids of the model"},
        provenance=provenance,
        model={"config": dataclasses.asdict(config), "num_queries": q,
               "calibration_input": f"frames centre-cropped to {CALIB_ASPECT:.4g} (w/h), then DETR's resize"},
        warnings=notes,
        frame_to_tensor=calibration_sample,  # type: ignore[arg-type]
        checks=[_family_check(graph, frames, opts, masks)],
    )


# --------------------------------------------------------------------------------------------
# The family check: every frame at its own size, every precision
# --------------------------------------------------------------------------------------------


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of matching rows of two ``[K, 4]`` xyxy arrays."""
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)

    def area(x: np.ndarray) -> np.ndarray:
        return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)

    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)


def compare_detr_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], source_wh: tuple[int, int],
                         k: int | None = None) -> dict[str, Any]:
    """Agreement of one frame's outputs (``got``, e.g. FP16) with the reference (FP32 PyTorch).

    Returns box errors in pixels and as a fraction of the source size (x / W, y / H), the score
    error, label agreement, whether every output is finite, the top-K agreement (exact, and up to
    scores closer than :data:`TOPK_TIE`) and the smallest IoU of a top-K query's box with its reference.
    """
    w, h = source_wh
    finite = all(bool(np.isfinite(v).all()) for v in got.values() if v.dtype.kind == "f")
    rb, gb = ref["boxes"][0].astype(np.float64), got["boxes"][0].astype(np.float64)
    rs, gs = ref["scores"][0].astype(np.float64), got["scores"][0].astype(np.float64)
    q = rs.shape[0]
    k = k if k is not None else min(TOPK, max(1, q // 2))
    figures: dict[str, Any] = {"finite": finite, "source": [int(w), int(h)], "k": k}
    if not finite:
        return figures
    norm = np.array([w, h, w, h], np.float64)
    figures["boxes_max_abs_px"] = float(np.abs(rb - gb).max())
    figures["boxes_max_abs_norm"] = float((np.abs(rb - gb) / norm).max())
    figures["scores_max_abs"] = float(np.abs(rs - gs).max())
    figures["labels_agreement"] = float((ref["labels"] == got["labels"]).mean())
    ref_top = np.argsort(-rs, kind="stable")[:k]
    got_top = np.argsort(-gs, kind="stable")[:k]
    figures["topk_exact"] = float(len(set(ref_top) & set(got_top)) / k)
    # A query that replaced one of the reference's top K is acceptable when its reference score ties
    # (within TOPK_TIE) the K-th best reference score.
    kth = rs[ref_top[-1]]
    ok = [i in set(ref_top) or rs[i] >= kth - TOPK_TIE for i in got_top]
    figures["topk_agreement"] = float(np.mean(ok))
    figures["topk_min_iou"] = float(_box_iou(rb[ref_top], gb[ref_top]).min())
    if "masks" in ref:
        figures["masks_max_abs"] = float(np.abs(ref["masks"].astype(np.float64) - got["masks"]).max())
    return figures


def _worst(per_image: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary over frames: worst value of each figure."""
    out: dict[str, Any] = {"finite": all(f["finite"] for f in per_image)}
    for key, pick in (("boxes_max_abs_px", max), ("boxes_max_abs_norm", max), ("scores_max_abs", max),
                      ("masks_max_abs", max), ("labels_agreement", min), ("topk_exact", min),
                      ("topk_agreement", min), ("topk_min_iou", min)):
        values = [f[key] for f in per_image if key in f]
        if values:
            out[key] = pick(values)
    return out


def _family_check(graph: DetectorGraph, frames: list[np.ndarray], opts: DETRExportOptions,
                  masks: bool) -> Callable[[dict[str, dict[str, Path]]], tuple[str, dict[str, Any], list[str]]]:
    samples = DetrSamples.from_frames(frames, opts.size, opts.max_size)
    names = ["boxes", "scores", "labels"] + (["masks"] if masks else [])

    def check(files: dict[str, dict[str, Path]]) -> tuple[str, dict[str, Any], list[str]]:
        from vlexport.runtime.backends.onnxruntime import OrtBackend

        refs = []
        with torch.no_grad():
            for i in range(len(samples)):
                out = graph.reference(*samples[i:i + 1].inputs())
                refs.append({n: t.numpy() for n, t in zip(names, out)})
        figures: dict[str, Any] = {"images": [list(s) for s in samples.sizes],
                                   "tolerances": {"fp32_boxes_norm": FP32_BOX_TOL, "fp32_scores": FP32_SCORE_TOL,
                                                  "topk": TOPK, "topk_tie": TOPK_TIE, "topk_min_iou": TOPK_MIN_IOU}}
        problems: list[str] = []
        for precision, path in files["detector"].items():
            per_image = []
            with OrtBackend(path, providers=["CPUExecutionProvider"]) as backend:
                for i, ref in enumerate(refs):
                    images, orig = samples[i:i + 1].inputs()
                    got = backend.infer({"images": images.numpy(), "orig_size": orig.numpy()})
                    per_image.append(compare_detr_outputs(ref, got, samples.sizes[i]))
            worst = _worst(per_image)
            figures[precision] = {**worst, "per_image": per_image}
            where = f"detector/{precision}"
            if not worst["finite"]:
                problems.append(f"{where}: NaN or Inf in an output on a real frame")
                continue
            if precision == "fp32":
                if worst["boxes_max_abs_norm"] > FP32_BOX_TOL:
                    problems.append(f"{where}: box error {worst['boxes_max_abs_norm']:.3g} of the image size "
                                    f"> {FP32_BOX_TOL:g}")
                if worst["scores_max_abs"] > FP32_SCORE_TOL:
                    problems.append(f"{where}: score error {worst['scores_max_abs']:.3g} > {FP32_SCORE_TOL:g}")
            elif precision == "fp16":
                if worst["topk_agreement"] < 1.0:
                    problems.append(f"{where}: the top-scoring queries differ from FP32's "
                                    f"(agreement {worst['topk_agreement']:.2f})")
                if worst["topk_min_iou"] <= TOPK_MIN_IOU:
                    problems.append(f"{where}: a top-scoring box moved (IoU {worst['topk_min_iou']:.3f} with FP32's "
                                    f"<= {TOPK_MIN_IOU})")
        return "detr", figures, problems

    return check


def export_detr(opts: DETRExportOptions) -> ExportReport:
    """Build the plan and write the bundle (see :func:`write_bundle`)."""
    precision = opts.precision or PrecisionOptions()
    precision.check()  # before the slow model loading
    plan = build_plan(opts)
    return write_bundle(plan, opts.out, precision=precision, opset=opts.opset, overwrite=opts.overwrite)


# -- eager rebuild (vlexport bench) -----------------------------------------------------------
def eager_parts(bundle: Bundle) -> dict[str, nn.Module]:
    """The ``detector`` part (with the official post-process) of an opened DETR bundle, eval mode."""
    from vlexport.export.eager import config_from_manifest
    from vlexport.models.detr.model import DETRConfig, build_detr

    config = config_from_manifest(DETRConfig, bundle)
    return {"detector": DetectorGraph(build_detr(config).eval(), bool(config.masks)).eval()}
