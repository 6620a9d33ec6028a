"""The KDEOV family: a CLIP-distilled YOLO student → `detector`, `image_encoder`, optional `text_encoder`."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import UsageError
from vlexport.export.part import OutputTolerance, Part
from vlexport.export.pipeline import ExportPlan, ExportReport, PrecisionOptions, write_bundle
from vlexport.export.samples import parity_batch, yolo_preprocess
from vlexport.runtime.bundle import sha256_file
from vlexport.runtime.spec import PartIO, TensorSpec

log = logging.getLogger("vlexport")

VOCAB_MODES = ("baked", "input")
BOX_SOURCES = ("grid", "yolo")


@dataclass
class KDEOVExportOptions:
    """Every knob of `vlexport kdeov`; ``None`` means "the preset's (or checkpoint's) value"."""

    out: Path
    preset: str = "yolov8n-vitb32"
    checkpoint: Path | None = None
    backbone: str | None = None
    backbone_weights: Path | None = None
    trust_checkpoint: bool = False
    imgsz: int | None = None
    classes: list[str] | None = None
    templates: str = "imagenet80"
    clip_model: str | None = None
    clip_pretrained: str | None = None
    box_source: str | None = None
    fp16: bool = False
    opset: int = 17
    dynamic_batch: bool = False
    with_text_encoder: bool = False
    vocab_mode: str = "baked"
    parity_source: str | None = None
    parity_count: int = 4
    score_threshold: float = 0.25
    iou_threshold: float = 0.5
    max_detections: int = 300
    overwrite: bool = False
    precision: PrecisionOptions | None = None  # INT8 calibration and gate; ``fp16`` above is the shortcut


def folded_similarity(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm, text: torch.Tensor) -> torch.Tensor:
    """``text @ normalize(GroupNorm(conv(x)))`` per location, without computing the D-channel map.

    ``x`` [B, Cin, H, W] feeds a 1x1 ``conv`` (Cin → D) and a ``GroupNorm``; ``text`` is [C, D].
    GroupNorm's statistics are linear/quadratic in ``x``: from the spatial mean x̄ and second
    moment S = X Xᵀ / HW (the statistics derived in float64, so E[y²] − E[y]² does not cancel badly) we get
    per-sample scales ``a`` and shifts ``b`` with ``GN(conv(x)) = W' x + c`` where
    ``W' = a ⊙ W`` and ``c = a ⊙ bias + b``. Then the similarities are ``(T W') x + T c`` and the
    squared norms the quadratic form ``xᵀ W'ᵀW' x + 2 cᵀW' x + |c|²``: GEMMs of width Cin
    (64 for YOLOv8n's P3) instead of D (512). Returns [B, C, HW].
    """
    b, cin = x.shape[0], x.shape[1]
    d, groups = conv.out_channels, norm.num_groups
    w = conv.weight.reshape(d, cin)
    bias = conv.bias if conv.bias is not None else torch.zeros(d, dtype=x.dtype, device=x.device)
    xf = x.flatten(2)  # [B, Cin, HW]
    hw = xf.shape[2]
    # The moments are sums over HW done in float32 GEMMs; everything derived from them (tiny
    # [Cin, Cin] matrices) is float64.
    mean_x = xf.mean(dim=2).double()  # [B, Cin]
    second = (torch.matmul(xf, xf.transpose(1, 2)) / hw).double()  # [B, Cin, Cin]
    w64, bias64 = w.double(), bias.double()
    mean_y = torch.matmul(mean_x, w64.t()) + bias64  # [B, D]: E[y_c]
    sq_y = ((torch.matmul(w64, second) * w64).sum(-1)  # [B, D]: E[y_c^2]
            + 2 * bias64 * torch.matmul(mean_x, w64.t()) + bias64 * bias64)
    mu = mean_y.reshape(b, groups, -1).mean(-1, keepdim=True)
    var = sq_y.reshape(b, groups, -1).mean(-1, keepdim=True) - mu * mu
    scale = (1.0 / torch.sqrt(var + norm.eps)).expand(-1, -1, d // groups).reshape(b, d)  # [B, D]
    shift = (-mu * (1.0 / torch.sqrt(var + norm.eps))).expand(-1, -1, d // groups).reshape(b, d)
    gamma = norm.weight.double() if norm.affine else torch.ones(d, dtype=torch.float64)
    beta = norm.bias.double() if norm.affine else torch.zeros(d, dtype=torch.float64)
    a = gamma * scale  # GN(y)_c = a_c y_c + (gamma_c shift_c + beta_c)
    w_eff = (a.unsqueeze(-1) * w64).to(x.dtype)  # [B, D, Cin]
    c_eff = (a * bias64 + gamma * shift + beta).to(x.dtype)  # [B, D]
    sim = torch.matmul(torch.matmul(text, w_eff), xf) + torch.matmul(c_eff, text.t()).unsqueeze(-1)  # [B, C, HW]
    q = torch.matmul(w_eff.transpose(1, 2), w_eff)  # [B, Cin, Cin]
    lin = 2.0 * torch.matmul(c_eff.unsqueeze(1), w_eff)  # [B, 1, Cin]
    qx = torch.matmul(q, xf)  # [B, Cin, HW]
    sq_norm = (torch.matmul(torch.ones_like(lin), qx * xf) + torch.matmul(lin, xf)
               + (c_eff * c_eff).sum(-1, keepdim=True).unsqueeze(-1))  # [B, 1, HW]
    return sim / sq_norm.clamp_min(0).sqrt().clamp_min(1e-12)


class DetectorGraph(nn.Module):
    """Export wrapper: image → (boxes, best score, class id); text embeddings baked or as an input.

    It computes exactly ``detect_raw`` followed by a max over classes, rearranged for
    inference (parity against ``detect_raw`` is checked at every export):

    * per level, the similarities come from :func:`folded_similarity`, which never builds
      the [B, 512, H, W] projected map;
    * the best class's softmax probability is ``1 / sum_c exp(l_c - l_max)``, without
      materialising the probabilities.
    """

    def __init__(self, model: nn.Module, text_embeddings: np.ndarray, baked: bool):
        super().__init__()
        self.model = model
        self.baked = baked
        self.register_buffer("text_embeddings", torch.from_numpy(np.ascontiguousarray(text_embeddings, dtype=np.float32)))

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor | None = None):
        m = self.model
        emb = self.text_embeddings if self.baked else text_embeddings
        text = F.normalize(emb, dim=-1) * m.logit_scale.exp()  # [C, D], a constant when baked
        feats = m.backbone(images)
        logits = torch.cat([folded_similarity(f, p.conv, p.norm, text)
                            for p, f in zip(m.spatial_projections, feats)], 2)  # [B, C, N]
        top, class_ids = logits.max(dim=1)
        scores = 1.0 / torch.exp(logits - top.unsqueeze(1)).sum(dim=1)
        if m.config.box_source == "yolo":
            boxes = m.backbone.box_regression(feats)
        else:
            boxes = m.grid_boxes(feats).unsqueeze(0).expand(images.shape[0], -1, -1)
        return boxes, scores, class_ids.to(torch.int32)

    def reference(self, images: torch.Tensor, text_embeddings: torch.Tensor | None = None):
        """The model's own eager path (``detect_raw`` + max over classes), for benchmarks and tests."""
        emb = self.text_embeddings if self.baked else text_embeddings
        boxes, probs = self.model.detect_raw(images, emb)
        scores, class_ids = probs.max(dim=-1)
        return boxes, scores, class_ids.to(torch.int32)


class ImageEncoderGraph(nn.Module):
    """Export wrapper: image → L2-normalised embedding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


def _check_options(opts: KDEOVExportOptions) -> None:
    if opts.vocab_mode not in VOCAB_MODES:
        raise UsageError(f"unknown --vocab-mode {opts.vocab_mode!r}; choose one of {', '.join(VOCAB_MODES)}")
    if opts.box_source is not None and opts.box_source not in BOX_SOURCES:
        raise UsageError(f"unknown --boxes {opts.box_source!r}; choose one of {', '.join(BOX_SOURCES)}")
    if opts.imgsz is not None and (opts.imgsz < 32 or opts.imgsz % 32):
        raise UsageError(f"--imgsz must be a multiple of 32 and at least 32, got {opts.imgsz}")
    if not 0.0 <= opts.score_threshold <= 1.0 or not 0.0 <= opts.iou_threshold <= 1.0:
        raise UsageError("--score-threshold and --iou-threshold must lie in [0, 1]")
    if opts.max_detections < 1:
        raise UsageError(f"--max-detections must be at least 1, got {opts.max_detections}")
    for p, flag in ((opts.checkpoint, "--checkpoint"), (opts.backbone_weights, "--backbone-weights")):
        if p is not None and not Path(p).is_file():
            raise UsageError(f"{flag} {p}: no such file")


def resolve_config(opts: KDEOVExportOptions):
    """The model config: preset, then the checkpoint's own config, then explicit options."""
    from vlexport.models.kdeov import KDEOV_PRESETS, load_kdeov_checkpoint

    if opts.preset not in KDEOV_PRESETS:
        raise UsageError(f"unknown kdeov preset {opts.preset!r}; choose one of {', '.join(KDEOV_PRESETS)}")
    config = KDEOV_PRESETS[opts.preset]
    if opts.checkpoint is not None:
        config, _ = load_kdeov_checkpoint(opts.checkpoint)
    overrides = {
        "backbone": opts.backbone, "image_size": opts.imgsz, "clip_model": opts.clip_model,
        "clip_pretrained": opts.clip_pretrained, "box_source": opts.box_source,
    }
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def build_plan(opts: KDEOVExportOptions) -> ExportPlan:
    """Load/build everything for a KDEOV export and describe its parts."""
    from vlexport.models.clip_towers import FrozenCLIPTextEncoder
    from vlexport.models.kdeov import build_kdeov
    from vlexport.models.text import COCO80_CLASSES, TextEmbeddingCache, build_text_embeddings, resolve_templates

    _check_options(opts)
    config = resolve_config(opts)
    classes = list(opts.classes) if opts.classes is not None else list(COCO80_CLASSES)
    if not classes:
        raise UsageError('the vocabulary is empty: pass --classes "person,car" or --vocab FILE')
    templates_id, templates = resolve_templates(opts.templates)
    notes: list[str] = []

    log.info("loading the CLIP text tower %s (%s)…", config.clip_model, config.clip_pretrained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text_encoder = FrozenCLIPTextEncoder(config.clip_model, config.clip_pretrained, allow_random=True)
    notes += [str(w.message) for w in caught if "RANDOM" in str(w.message).upper()]
    if not text_encoder.is_pretrained:
        notes.append(f"text tower {config.clip_model} is UNTRAINED (random weights): class scores are meaningless")

    log.info("building the %s student (backbone %s, %dx%d)…", opts.preset, config.backbone, config.image_size, config.image_size)
    model = build_kdeov(config, checkpoint=opts.checkpoint, backbone_weights=opts.backbone_weights,
                        trust_checkpoint=opts.trust_checkpoint, text_encoder=text_encoder).eval()
    if opts.checkpoint is None:
        notes.append("no --checkpoint: the student's projection heads are untrained (random weights)")

    log.info("encoding %d class name(s) x %d template(s)…", len(classes), len(templates))
    emb = build_text_embeddings(text_encoder, classes, templates, templates_id, TextEmbeddingCache())
    log.info("text embeddings: %d from cache, %d encoded", emb.cached, emb.encoded)
    text_embeddings = emb.embeddings

    size = config.image_size
    preprocess = yolo_preprocess(size)
    images, source = parity_batch(preprocess, opts.parity_source, opts.parity_count)

    batch: int | str = "batch" if opts.dynamic_batch else 1
    baked = opts.vocab_mode == "baked"
    det_inputs = [TensorSpec("images", "float32", (batch, 3, size, size))]
    if not baked:
        det_inputs.append(TensorSpec("text_embeddings", "float32", ("num_classes", text_encoder.embed_dim)))
    det_io = PartIO(
        inputs=tuple(det_inputs),
        outputs=(TensorSpec("boxes", "float32", (batch, "anchors", 4)),
                 TensorSpec("scores", "float32", (batch, "anchors")),
                 TensorSpec("class_ids", "int32", (batch, "anchors"))),
    )
    emb_t = torch.from_numpy(text_embeddings)
    detector_graph = DetectorGraph(model, text_embeddings, baked).eval()
    detector = Part(
        name="detector",
        module=detector_graph,
        reference=detector_graph.reference,
        io=det_io,
        make_inputs=(lambda x: (x,)) if baked else (lambda x: (x, emb_t)),
        tolerances={
            "fp32": {"boxes": OutputTolerance(max_abs=1e-2), "scores": OutputTolerance(max_abs=1e-4),
                     "class_ids": OutputTolerance(min_agreement=0.99)},
            "fp16": {"boxes": OutputTolerance(min_cosine=0.999), "scores": OutputTolerance(min_cosine=0.999)},
        },
        quantize=True,
    )
    encoder = Part(
        name="image_encoder",
        module=ImageEncoderGraph(model),
        io=PartIO(inputs=(TensorSpec("images", "float32", (batch, 3, size, size)),),
                  outputs=(TensorSpec("embeddings", "float32", (batch, text_encoder.embed_dim)),)),
        make_inputs=lambda x: (x,),
        tolerances={"fp32": {"embeddings": OutputTolerance(max_abs=1e-4)},
                    "fp16": {"embeddings": OutputTolerance(min_cosine=0.999)}},
    )
    parts = [detector, encoder]
    if opts.with_text_encoder:
        parts.append(_text_encoder_part(text_encoder, classes, templates))

    provenance: dict[str, Any] = {
        "checkpoint": str(opts.checkpoint) if opts.checkpoint else None,
        "checkpoint_sha256": sha256_file(opts.checkpoint) if opts.checkpoint else None,
        "backbone_weights": str(opts.backbone_weights) if opts.backbone_weights else None,
        "backbone_weights_sha256": sha256_file(opts.backbone_weights) if opts.backbone_weights else None,
        "student_trained": opts.checkpoint is not None,
        "text_encoder": {
            "model": text_encoder.model_name, "pretrained": text_encoder.pretrained,
            "weights_sha256": text_encoder.weights_sha256, "weights_source": text_encoder.weights_source,
            "trained": bool(text_encoder.is_pretrained),
        },
    }
    for note in notes:
        log.warning("!!! %s", note)
    return ExportPlan(
        family="kdeov", task="detect", preset=opts.preset if opts.checkpoint is None else "checkpoint", parts=parts,
        parity_images=images, parity_source=source, preprocess=preprocess,
        postprocess={"score_threshold": opts.score_threshold, "iou_threshold": opts.iou_threshold,
                     "max_detections": opts.max_detections, "class_agnostic": False},
        vocabulary={"classes": classes, "templates": templates_id, "num_templates": len(templates),
                    "mode": opts.vocab_mode, "embed_dim": int(text_embeddings.shape[1])},
        vocab_arrays=(classes, text_embeddings),
        provenance=provenance,
        model={"config": config.to_dict(), "box_source": config.box_source},
        warnings=notes,
    )


class TextEncoderGraph(nn.Module):
    """Export wrapper: token ids → L2-normalised text embedding (one prompt per row)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens)


def _text_encoder_part(text_encoder, classes: list[str], templates: tuple[str, ...]) -> Part:
    prompts = [templates[0].format(c) for c in classes[:8]]
    tokens = text_encoder.tokenize(prompts)
    return Part(
        name="text_encoder",
        module=TextEncoderGraph(text_encoder),
        io=PartIO(inputs=(TensorSpec("tokens", "int64", ("prompts", int(tokens.shape[1]))),),
                  outputs=(TensorSpec("embeddings", "float32", ("prompts", text_encoder.embed_dim)),)),
        make_inputs=lambda _images: (tokens,),
        tolerances={"fp32": {"embeddings": OutputTolerance(max_abs=1e-4)},
                    "fp16": {"embeddings": OutputTolerance(min_cosine=0.999)}},
    )


def export_kdeov(opts: KDEOVExportOptions) -> ExportReport:
    """Build the plan and write the bundle (see :func:`write_bundle`)."""
    precision = opts.precision or PrecisionOptions(fp16=opts.fp16)
    precision.check()  # before the slow model loading
    plan = build_plan(opts)
    return write_bundle(plan, opts.out, precision=precision, opset=opts.opset, overwrite=opts.overwrite)
