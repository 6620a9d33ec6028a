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

import numpy as np
import torch

from vlexport.errors import UsageError
from vlexport.export.part import OutputTolerance, Part
from vlexport.export.bundle_export import ExportPlan, ExportReport, PrecisionOptions, write_bundle
from vlexport.runtime.spec import PartIO, TensorSpec

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


def build_plan(opts: SCLIPExportOptions) -> ExportPlan:
    """Build the segmenter and describe the `segmenter` part and the runtime's settings."""
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
        io=PartIO(inputs=(TensorSpec("crops", "float32", ("crops", 3, "crop_height", "crop_width")),),
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
        io=PartIO(inputs=(TensorSpec("guide", "float32", (1, 3, "height", "width")),
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
