"""The `sclip` family: training-free open-vocabulary segmentation → part `segmenter`.

The graph takes a batch of normalised sliding-window crops and returns their cosine logits
upsampled to the crop size, with the class text embeddings baked in. Resizing, cutting the
windows, stitching, temperature, softmax, synonyms, area and probability thresholds and
background are done by the runtime from the manifest, exactly as the reference's
``forward_slide`` + ``postprocess_result``. The crops' height and width are dynamic axes: a frame
whose resized short side is below the crop (long-side cap) is cut into smaller windows, as SCLIP does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from vlexport.errors import UsageError
from vlexport.export.part import OutputTolerance, Part
from vlexport.export.bundle_export import ExportPlan, ExportReport, PrecisionOptions, write_bundle
from vlexport.export.command import (PRECISION_OPTIONS, FamilyCommand, PrecisionFields, clip_activation_option,
                                     default_out, own_fields, precision_from)
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.spec import PartSignature, TensorSpec

log = logging.getLogger("vlexport")


@dataclass
class SCLIPExportOptions:
    """Every knob of `vlexport sclip`; ``None`` means the preset's value."""

    out: Path
    preset: str = "vit-b16"
    classes: list[str] | None = None
    templates: str = "imagenet80"
    clip_model: str | None = None
    clip_pretrained: str | None = None
    clip_activation: str | None = None
    short_side: int | None = None
    max_long_side: int | None = None
    slide_crop: int | None = None
    slide_stride: int | None = None
    pamr_steps: int = 0
    pamr_in: str = "runtime"  # "runtime" (numpy) or "graph" (an exported `refiner` part)
    logit_scale: float | None = None
    prob_threshold: float | None = None
    area_threshold: float | None = None
    background_index: int | None = None
    opset: int = 17
    parity_source: str | None = None
    parity_count: int = 2
    overwrite: bool = False
    precision: PrecisionOptions | None = None


@dataclass(kw_only=True)
class Options(PrecisionFields):
    """The options of `vlexport sclip`, as typed fields with the CLI's defaults (for :func:`export`)."""

    preset: str = "vit-b16"
    classes: str | None = None  # "," between classes, "|" between the synonyms of one class
    vocab: Path | None = None  # one class per line, synonyms separated by ", "
    templates: str = "imagenet80"
    clip_model: str | None = None
    clip_pretrained: str | None = None
    clip_activation: str | None = None
    short_side: int | None = None
    max_long_side: int | None = None
    slide_crop: int | None = None
    slide_stride: int | None = None
    pamr_steps: int = 0
    pamr_in: str = "runtime"
    logit_scale: float | None = None
    prob_threshold: float | None = None
    area_threshold: float | None = None
    background_index: int | None = None
    out: Path | None = None  # bundles/sclip-PRESET
    overwrite: bool = False
    opset: int = 17


COMMAND = FamilyCommand(
    help="""Export SCLIP open-vocabulary segmentation (part: segmenter, text embeddings baked in).

    \b
    Examples:
      vlexport sclip --vocab cls_voc21.txt --logit-scale 65 --background-index 0 --prob-threshold 0.1 \\
          --area-threshold 0.1 --fp16                                   # SCLIP's VOC21 configuration
      vlexport sclip --preset tiny --classes "sky|clouds,tree,person" --out /tmp/seg   # seconds, random weights
    """,
    options=(
        click.option("--preset", default="vit-b16", show_default=True, help="tiny, vit-b16 (ViT-B/16), vit-l14-336."),
        click.option("--classes", help='Classes separated by ","; synonyms of one class separated by "|", e.g. '
                                       '"background|sky|wall,cat,dog" (3 classes, the first with 3 synonyms: the same as a '
                                       '--vocab line "background, sky, wall").'),
        click.option("--vocab", type=click.Path(path_type=Path), help='One class per line; synonyms on one line separated by ", ".'),
        click.option("--templates", default="imagenet80", show_default=True, help="imagenet80, single, or a file (one per line, with {})."),
        click.option("--clip-model", help="open_clip model (default: the preset's)."),
        click.option("--clip-pretrained", help="open_clip pretrained tag or a local weights file (default: openai)."),
        clip_activation_option,
        click.option("--imgsz", "short_side", type=int, help="Short side the image is resized to (default 336)."),
        click.option("--max-long-side", type=click.IntRange(1),
                     help="Cap on the long side after that resize: scale = min(imgsz / short side, this / long side) "
                          "(default 2048, as SCLIP's Resize(scale=(2048, 336)))."),
        click.option("--slide-crop", type=int, help="Sliding-window crop (default 224)."),
        click.option("--slide-stride", type=int, help="Sliding-window stride (default 112)."),
        click.option("--pamr-steps", default=0, show_default=True, type=click.IntRange(0), help="PAMR refinement iterations (0: off, as SCLIP's configs)."),
        click.option("--pamr-in", default="runtime", show_default=True, type=click.Choice(["runtime", "graph"]),
                     help="Run PAMR in the runtime (numpy) or as an exported `refiner` graph (see benchmarks/bench_sclip_slide.py)."),
        click.option("--logit-scale", type=float, help="Temperature before the softmax (default 40)."),
        click.option("--prob-threshold", type=float, help="Pixels below this probability go to --background-index."),
        click.option("--area-threshold", type=float,
                     help="Drop classes (not the background) whose argmax area is at most this fraction of the non-background "
                          "pixels, as SCLIP's area_thd (0.1 for VOC21); needs --background-index."),
        click.option("--background-index", type=int, help="Class index that collects uncertain pixels (e.g. 0 for VOC)."),
        click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/sclip-PRESET]."),
        click.option("--overwrite", is_flag=True),
        click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21)),
        *PRECISION_OPTIONS,
    ),
)


def export_options(options: Options) -> SCLIPExportOptions:
    """The exporter's options for CLI-level ``options`` (precision checked, then the vocabulary parsed)."""
    from vlexport.models.clip.text import parse_vocabulary
    from vlexport.models.sclip.vocabulary import classes_from_option

    precision = precision_from(options)
    names, vocab = options.classes, options.vocab
    # --classes: "," between classes, "|" between the synonyms of one class (SCLIP-only syntax).
    classes = classes_from_option(names) if names is not None and vocab is None else parse_vocabulary(names, vocab)
    return SCLIPExportOptions(out=default_out(options.out, f"sclip-{options.preset}"), classes=classes,
                              precision=precision, parity_source=options.val,
                              **own_fields(options, "out", "classes", "vocab"))


def export(options: Options) -> ExportReport:
    """Write the bundle `vlexport sclip` writes for these options (see :func:`vlexport.export.exporter.export_model`)."""
    return export_sclip(export_options(options))


def _segmenter(opts: SCLIPExportOptions):
    from vlexport.models.sclip.config import SCLIP_PRESETS
    from vlexport.models.sclip.model import SCLIPSegmenter
    from vlexport.models.clip.text import TextEmbeddingCache, resolve_templates

    if opts.preset not in SCLIP_PRESETS:
        raise UsageError(f"unknown sclip preset {opts.preset!r}; choose one of {', '.join(SCLIP_PRESETS)}")
    if opts.pamr_in not in ("runtime", "graph"):
        raise UsageError(f"--pamr-in must be runtime or graph, got {opts.pamr_in!r}")
    overrides = {k: v for k, v in {
        "clip_model": opts.clip_model, "clip_pretrained": opts.clip_pretrained,
        "clip_activation": opts.clip_activation, "short_side": opts.short_side,
        "max_long_side": opts.max_long_side,
        "slide_crop": opts.slide_crop, "slide_stride": opts.slide_stride, "logit_scale": opts.logit_scale,
        "prob_threshold": opts.prob_threshold, "area_threshold": opts.area_threshold,
        "pamr_steps": opts.pamr_steps or None}.items() if v is not None}
    templates_id, templates = resolve_templates(opts.templates)
    classes = opts.classes or []
    if not classes:
        raise UsageError('the vocabulary is empty: pass --classes "sky|clouds,tree,person" or --vocab FILE '
                         '(one class per line; synonyms on one line separated by ", ")')
    log.info("building SCLIP %s and encoding %d class line(s) x %d template(s)…", opts.preset, len(classes), len(templates))
    seg = SCLIPSegmenter.from_preset(opts.preset, classes, templates=templates, cache=TextEmbeddingCache(), **overrides)
    cfg = seg.config
    if cfg.slide_stride > cfg.slide_crop or cfg.slide_crop > cfg.short_side:
        raise UsageError(f"need slide_stride <= slide_crop <= short side, got {cfg.slide_stride}, {cfg.slide_crop}, "
                         f"{cfg.short_side}")
    return seg, templates_id, len(templates)


def build_plan(opts: SCLIPExportOptions | Options) -> ExportPlan:
    """Build the segmenter and describe the `segmenter` part and the runtime's settings."""
    if isinstance(opts, Options):
        opts = export_options(opts)
    from vlexport.data.readers import parity_frames, synthetic_images
    from vlexport.models.sclip.windows import window_grid

    seg, templates_id, n_templates = _segmenter(opts)
    cfg = seg.config
    if opts.background_index is not None and not 0 <= opts.background_index < seg.num_classes:
        raise UsageError(f"--background-index must be a class index (0..{seg.num_classes - 1})")
    if cfg.area_threshold > 0 and opts.background_index is None:
        raise UsageError("--area-threshold needs a background class (the classes below the threshold give their "
                         "pixels to the others, background included); pass --background-index, e.g. 0 for VOC21")
    crop = cfg.slide_crop

    def frame_to_crops(frame: np.ndarray) -> torch.Tensor:
        # What the runtime feeds the graph: short-side resize, normalise, every sliding window.
        x, _ = seg.preprocess(frame)
        h, w = x.shape[-2:]
        return torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in window_grid(h, w, crop, cfg.slide_stride)])

    if opts.parity_source:
        frames, label = parity_frames(opts.parity_source, opts.parity_count).frames, str(opts.parity_source)
    else:
        frames, label = synthetic_images(opts.parity_count, seed=0), "synthetic(seed=0)"
    crops = torch.cat([frame_to_crops(f) for f in frames])
    q = int(seg.text_embeddings.shape[0])
    part = Part(
        name="segmenter",
        module=seg.crop_part(),
        # Crops are slide_crop x slide_crop, except for frames whose resized side is shorter than
        # the crop (the long-side cap): their windows are min(crop, H) x min(crop, W), as in SCLIP,
        # so the crop's height and width are dynamic axes (positional interpolation in-graph).
        io=PartSignature(inputs=(TensorSpec("crops", "float32", ("crops", 3, "crop_height", "crop_width")),),
                  outputs=(TensorSpec("logits", "float32", ("crops", q, "crop_height", "crop_width")),)),
        make_inputs=lambda x: (x,),
        tolerances={"fp32": {"logits": OutputTolerance(max_abs=1e-3, min_agreement=0.999, argmax_axis=1)},
                    "fp16": {"logits": OutputTolerance(min_cosine=0.999)}},
        quantize=True,
    )
    parts = [part]
    if cfg.pamr_steps > 0 and opts.pamr_in == "graph":
        parts.append(_refiner_part(seg))
    return ExportPlan(
        family="sclip", task="segment", preset=opts.preset, parts=parts, parity_images=crops,
        parity_source=label,
        preprocess={"resize": "short_side", "short_side": cfg.short_side, "max_long_side": cfg.max_long_side,
                    "color": "RGB", "scale": 1.0, "mean": list(cfg.mean), "std": list(cfg.std)},
        postprocess={},
        vocabulary={"classes": list(seg.class_names), "queries": list(seg.queries), "templates": templates_id,
                    "num_templates": n_templates, "mode": "baked"},
        vocab_arrays=(list(seg.queries), seg.text_embeddings.cpu().numpy()),
        provenance={"text_encoder": seg.loaded.provenance},
        model={"config": _jsonable(cfg)},
        warnings=[] if seg.loaded.is_pretrained else
        [f"CLIP {cfg.clip_model} is UNTRAINED (random weights): segmentations are meaningless"],
        frame_to_tensor=frame_to_crops,
        extra_manifest={"segment": {
            "slide_crop": crop, "slide_stride": cfg.slide_stride, "logit_scale": cfg.logit_scale,
            "prob_threshold": cfg.prob_threshold, "area_threshold": cfg.area_threshold,
            "background_index": opts.background_index, "patch_size": seg.patch_size,
            "query_to_class": [int(i) for i in seg.query_to_class.tolist()],
            "pamr": {"steps": cfg.pamr_steps, "dilations": list(cfg.pamr_dilations), "where": opts.pamr_in}}},
    )


class _Refiner(torch.nn.Module):
    """Export wrapper: PAMR(guide [1, 3, H, W], mask [1, Q, H, W]) -> refined mask."""

    def __init__(self, pamr: torch.nn.Module):
        super().__init__()
        self.pamr = pamr

    def forward(self, guide: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pamr(guide, mask)


def _refiner_part(seg) -> Part:
    from vlexport.models.sclip.pamr import PAMR

    cfg = seg.config
    q = int(seg.text_embeddings.shape[0])
    return Part(
        name="refiner",
        module=_Refiner(PAMR(cfg.pamr_steps, cfg.pamr_dilations)).eval(),
        io=PartSignature(inputs=(TensorSpec("guide", "float32", (1, 3, "height", "width")),
                          TensorSpec("mask", "float32", (1, q, "height", "width"))),
                  outputs=(TensorSpec("refined", "float32", (1, q, "height", "width")),)),
        # Parity on a crop and its own logits: what the runtime feeds at the source size.
        make_inputs=lambda x: (x[:1], seg.crop_logits(x[:1]).detach()),
        tolerances={"fp32": {"refined": OutputTolerance(max_abs=1e-3, min_agreement=0.999, argmax_axis=1)},
                    "fp16": {"refined": OutputTolerance(min_cosine=0.999)}},
    )


def _jsonable(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def export_sclip(opts: SCLIPExportOptions) -> ExportReport:
    """Build the plan and write the bundle (see :func:`write_bundle`)."""
    precision = opts.precision or PrecisionOptions()
    precision.check()
    plan = build_plan(opts)
    return write_bundle(plan, opts.out, precision=precision, opset=opts.opset, overwrite=opts.overwrite)


# -- eager rebuild (vlexport bench) -----------------------------------------------------------
def eager_parts(bundle: Bundle) -> dict[str, torch.nn.Module]:
    """The ``segmenter`` part (crops -> logits) of an opened SCLIP bundle as an eval-mode eager module.

    Random CLIP weights (the same latency) with the activation the bundle was exported with, and
    the bundle's vocabulary embeddings.
    """
    from vlexport.export.eager import config_from_dict, manifest_model_config
    from vlexport.models.clip.towers import load_clip_model
    from vlexport.models.sclip.model import SCLIPConfig, SCLIPSegmenter

    data = manifest_model_config(bundle)
    legacy = data.pop("quick_gelu", None)  # bundles from before the loader decided the activation
    tower = (bundle.manifest.get("provenance") or {}).get("text_encoder") or {}
    activation = tower.get("activation") or ("quickgelu" if legacy else "auto")
    config = config_from_dict(SCLIPConfig, {**data, "clip_pretrained": None, "clip_activation": activation})
    seg = SCLIPSegmenter(load_clip_model(config.clip_model, None, activation=activation, allow_random=True), config)
    seg.text_embeddings = torch.from_numpy(np.ascontiguousarray(bundle.load_vocab()["embeddings"], np.float32))
    return {"segmenter": seg.crop_part().eval()}
