"""The KDEOV family: a CLIP-distilled YOLO student → `detector`, `image_encoder`, optional `text_encoder`.

Its CLI (``Options``, ``COMMAND``, :func:`export`) sits beside the plan builder, as every family's
does (see :mod:`vlexport.registry`); with the text tower's graph and tokenizer files that makes a
little over 500 lines of one job, the KDEOV export.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import UsageError
from vlexport.export.part import OutputTolerance, Part
from vlexport.export.bundle_export import ExportPlan, ExportReport, PrecisionOptions, write_bundle
from vlexport.export.command import (PRECISION_OPTIONS, FamilyCommand, PrecisionFields, clip_activation_option,
                                     default_out, own_fields, parse_classes, precision_from)
from vlexport.export.provenance import checkpoint_provenance
from vlexport.export.samples import parity_batch, yolo_preprocess
from vlexport.models.kdeov.checkpoint import KDEOVCheckpoint
from vlexport.models.kdeov.heads import best_folded_similarity
from vlexport.runtime.bundle import Bundle, sha256_file
from vlexport.runtime.spec import PartSignature, TensorSpec

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
    clip_activation: str | None = None
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


@dataclass(kw_only=True)
class Options(PrecisionFields):
    """The options of `vlexport kdeov`, as typed fields with the CLI's defaults (for :func:`export`)."""

    preset: str = "yolov8n-vitb32"
    checkpoint: Path | None = None
    backbone: str | None = None
    backbone_weights: Path | None = None
    trust_checkpoint: bool = False
    out: Path | None = None  # bundles/kdeov-PRESET
    overwrite: bool = False
    imgsz: int | None = None
    classes: str | None = None  # "person,car,dog"; None (and no vocab): the 80 COCO names
    vocab: Path | None = None  # one class name per line
    templates: str = "imagenet80"
    clip_model: str | None = None
    clip_pretrained: str | None = None
    clip_activation: str | None = None
    box_source: str | None = None
    opset: int = 17
    dynamic_batch: bool = False
    with_text_encoder: bool = False
    vocab_mode: str = "baked"
    score_threshold: float = 0.25
    iou_threshold: float = 0.5
    max_detections: int = 300


COMMAND = FamilyCommand(
    help="""Export a KDEOV open-vocabulary detector (parts: detector, image_encoder[, text_encoder]).

    \b
    Examples:
      vlexport kdeov --fp16
      vlexport kdeov --classes "person,bus,car" --out bundles/street --fp16
      vlexport kdeov --backbone-weights yolov8n.pt --trust-checkpoint --boxes yolo
      vlexport kdeov --preset tiny --out /tmp/tiny      # seconds, random weights (tests)
    """,
    options=(
        click.option("--preset", default="yolov8n-vitb32", show_default=True,
                     help="Model preset: tiny, yolov8n-vitb32, yolov5s-vitb32."),
        click.option("--checkpoint", type=click.Path(path_type=Path), help="KDEOV student checkpoint (from `vlexport train-kdeov`)."),
        click.option("--backbone", type=click.Choice(["yolov8n", "yolov5s", "simple"]), help="Student backbone (default: the preset's)."),
        click.option("--backbone-weights", type=click.Path(path_type=Path),
                     help="Ultralytics detection checkpoint to initialise the backbone (and its box head)."),
        click.option("--trust-checkpoint", is_flag=True, help="Allow loading pickled (Ultralytics) checkpoints: runs code from the file."),
        click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/kdeov-PRESET]."),
        click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out."),
        click.option("--imgsz", type=int, help="Square input size, a multiple of 32 (default: the preset's)."),
        click.option("--classes", help='Comma-separated class names, e.g. "person,car,dog" [default: the 80 COCO names].'),
        click.option("--vocab", type=click.Path(path_type=Path), help="File with one class name per line."),
        click.option("--templates", default="imagenet80", show_default=True,
                     help="Prompt templates: imagenet80 (the 80 CLIP ImageNet templates), single, or a file (one per line, with {})."),
        click.option("--clip-model", help="open_clip model of the frozen text tower (default: the preset's, ViT-B-32)."),
        click.option("--clip-pretrained", help="open_clip pretrained tag or a local weights file (default: openai)."),
        clip_activation_option,
        click.option("--boxes", "box_source", type=click.Choice(["grid", "yolo"]),
                     help="Box source: grid default boxes, or the YOLOv8 head's own regression."),
        click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21), help="ONNX opset."),
        click.option("--dynamic-batch", is_flag=True, help="Export with a dynamic batch axis (default: batch 1)."),
        click.option("--with-text-encoder", is_flag=True, help="Also export the text tower as part `text_encoder`."),
        click.option("--vocab-mode", type=click.Choice(["baked", "input"]), default="baked", show_default=True,
                     help="baked: class embeddings are a graph constant; input: a graph input (swap vocabularies without re-export)."),
        *PRECISION_OPTIONS,
        click.option("--score-threshold", default=0.25, show_default=True, type=float),
        click.option("--iou-threshold", default=0.5, show_default=True, type=float),
        click.option("--max-detections", default=300, show_default=True, type=int),
    ),
)


def export_options(options: Options) -> KDEOVExportOptions:
    """The exporter's options for CLI-level ``options`` (vocabulary parsed, precision checked)."""
    classes = parse_classes(options.classes, options.vocab)
    precision = precision_from(options)
    return KDEOVExportOptions(out=default_out(options.out, f"kdeov-{options.preset}"), classes=classes,
                              fp16=precision.fp16, precision=precision, parity_source=options.val,
                              **own_fields(options, "out", "classes", "vocab"))


def export(options: Options) -> ExportReport:
    """Write the bundle `vlexport kdeov` writes for these options (see :func:`vlexport.export.exporter.export_model`)."""
    return export_kdeov(export_options(options))


def create_model(preset: str, **kwargs: Any) -> nn.Module:
    """A KDEOV model of a preset (``vlexport.registry.create_model("kdeov", preset)``), with the
    preset's CLIP text tower unless ``text_encoder`` is given (random weights when they are not cached)."""
    from vlexport.models.clip.towers import FrozenCLIPTextEncoder
    from vlexport.models.kdeov.config import KDEOV_PRESETS
    from vlexport.models.kdeov.model import build_kdeov

    config = KDEOV_PRESETS[preset]
    if "text_encoder" not in kwargs:
        kwargs["text_encoder"] = FrozenCLIPTextEncoder(config.clip_model, config.clip_pretrained, allow_random=True)
    return build_kdeov(config, **kwargs)


class DetectorGraph(nn.Module):
    """Export wrapper: image → (boxes, best score, class id); text embeddings baked or as an input.

    It computes exactly ``detect_raw`` followed by a max over classes, rearranged for
    inference (parity against ``detect_raw`` is checked at every export):

    * per level, the best class and its similarity come from :func:`best_folded_similarity`, which
      never builds the [B, 512, H, W] projected map and costs one GEMM of width 81 per class;
    * scores are per-class sigmoids of ``s * cos + b`` with ``s > 0``: the best class is the
      largest cosine, and only its logit goes through the sigmoid.
    """

    def __init__(self, model: nn.Module, text_embeddings: np.ndarray, baked: bool):
        super().__init__()
        self.model = model
        self.baked = baked
        self.register_buffer("text_embeddings", torch.from_numpy(np.ascontiguousarray(text_embeddings, dtype=np.float32)))

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor | None = None):
        m = self.model
        emb = self.text_embeddings if self.baked else text_embeddings
        text = F.normalize(emb, dim=-1)  # [C, D], a constant when baked
        feats = m.backbone(images)
        best = [best_folded_similarity(f, p.conv, p.norm, text, m.region_norm_floor)
                for p, f in zip(m.spatial_projections, m.region_features(feats))]
        top = torch.cat([b[0] for b in best], 1)  # [B, N]
        class_ids = torch.cat([b[1] for b in best], 1)
        scores = torch.sigmoid(m.region_logit_scale.exp() * top + m.region_bias)
        return m._boxes(feats), scores, class_ids.to(torch.int32)

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
    return _resolve(opts)[0]


def _resolve(opts: KDEOVExportOptions) -> tuple[Any, KDEOVCheckpoint | None]:
    """The model config (see :func:`resolve_config`) and the checkpoint, read here once for the whole export."""
    from vlexport.models.kdeov.config import KDEOV_PRESETS

    if opts.preset not in KDEOV_PRESETS:
        raise UsageError(f"unknown kdeov preset {opts.preset!r}; choose one of {', '.join(KDEOV_PRESETS)}")
    config = KDEOV_PRESETS[opts.preset]
    checkpoint = None
    if opts.checkpoint is not None:
        checkpoint = KDEOVCheckpoint.read(opts.checkpoint)
        config = checkpoint.config
    overrides = {
        "backbone": opts.backbone, "image_size": opts.imgsz, "clip_model": opts.clip_model,
        "clip_pretrained": opts.clip_pretrained, "box_source": opts.box_source,
        "clip_activation": opts.clip_activation,
    }
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None}), checkpoint


def build_plan(opts: KDEOVExportOptions | Options) -> ExportPlan:
    """Load/build everything for a KDEOV export and describe its parts."""
    if isinstance(opts, Options):
        opts = export_options(opts)
    from vlexport.models.clip.towers import FrozenCLIPTextEncoder
    from vlexport.models.kdeov.model import build_kdeov
    from vlexport.models.clip.text import COCO80_CLASSES, TextEmbeddingCache, build_text_embeddings, resolve_templates

    _check_options(opts)
    config, checkpoint = _resolve(opts)
    classes = list(opts.classes) if opts.classes is not None else list(COCO80_CLASSES)
    if not classes:
        raise UsageError('the vocabulary is empty: pass --classes "person,car" or --vocab FILE')
    templates_id, templates = resolve_templates(opts.templates)
    notes: list[str] = []

    log.info("loading the CLIP text tower %s (%s)…", config.clip_model, config.clip_pretrained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text_encoder = FrozenCLIPTextEncoder(config.clip_model, config.clip_pretrained,
                                             activation=config.clip_activation, allow_random=True)
    notes += [str(w.message) for w in caught if "RANDOM" in str(w.message).upper()]
    trained: dict[str, Any] = {}
    if checkpoint is not None:
        from vlexport.models.kdeov.detection_train import check_text_tower

        trained = checkpoint.extra
        check_text_tower(trained.get("text_tower"), text_encoder.loaded, opts.checkpoint)
    if not text_encoder.is_pretrained:
        notes.append(f"text tower {config.clip_model} is UNTRAINED (random weights): class scores are meaningless")

    log.info("building the %s student (backbone %s, %dx%d)…", opts.preset, config.backbone, config.image_size, config.image_size)
    model = build_kdeov(config, checkpoint=checkpoint, backbone_weights=opts.backbone_weights,
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
    det_io = PartSignature(
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
        io=PartSignature(inputs=(TensorSpec("images", "float32", (batch, 3, size, size)),),
                  outputs=(TensorSpec("embeddings", "float32", (batch, text_encoder.embed_dim)),)),
        make_inputs=lambda x: (x,),
        tolerances={"fp32": {"embeddings": OutputTolerance(max_abs=1e-4)},
                    "fp16": {"embeddings": OutputTolerance(min_cosine=0.999)}},
    )
    parts = [detector, encoder]
    extra_files: dict[str, Path] = {}
    extra_manifest: dict[str, Any] = {}
    vocab_extra: dict[str, Any] = {}
    if opts.with_text_encoder:
        parts.append(_text_encoder_part(text_encoder, classes, templates))
        # The runtime re-bakes class names with this part, its tokenizer and these templates (no torch).
        vocab_extra["prompt_templates"] = list(templates)
        shipped = _text_tokenizer_files(text_encoder, classes, templates, int(text_encoder.context_length))
        if shipped is None:
            notes.append(f"the tokenizer of CLIP {config.clip_model} is not CLIP's BPE: the runtime cannot "
                         "embed new class names with this text_encoder (it needs precomputed embeddings)")
        else:
            extra_files, extra_manifest["text_tokenizer"] = shipped

    provenance: dict[str, Any] = {
        **checkpoint_provenance(opts.checkpoint),
        "backbone_weights": str(opts.backbone_weights) if opts.backbone_weights else None,
        "backbone_weights_sha256": sha256_file(opts.backbone_weights) if opts.backbone_weights else None,
        "text_encoder": text_encoder.loaded.provenance,
        # What the student's detection path was trained on (absent for untrained or global-only students).
        "trained_vocabulary": trained.get("vocabulary"),
    }
    for note in notes:
        log.warning("%s" if note.startswith("!!!") else "!!! %s", note)
    return ExportPlan(
        family="kdeov", task="detect", preset=opts.preset if opts.checkpoint is None else "checkpoint", parts=parts,
        parity_images=images, parity_source=source, preprocess=preprocess,
        postprocess={"score_threshold": opts.score_threshold, "iou_threshold": opts.iou_threshold,
                     "max_detections": opts.max_detections, "class_agnostic": False,
                     # Each class scored on its own (the graph already outputs these scores).
                     "scoring": {"kind": "sigmoid",
                                 "formula": "sigmoid(logit_scale * dot(region, text) / sqrt(|region|^2 + norm_floor^2)"
                                            " + bias), unit text",
                                 "logit_scale": float(model.region_logit_scale.detach().exp()),
                                 "bias": float(model.region_bias.detach()),
                                 "norm_floor": float(model.region_norm_floor)}},
        vocabulary={"classes": classes, "templates": templates_id, "num_templates": len(templates),
                    "mode": opts.vocab_mode, "embed_dim": int(text_embeddings.shape[1]), **vocab_extra},
        vocab_arrays=(classes, text_embeddings),
        provenance=provenance,
        model={"config": config.to_dict(), "box_source": config.box_source},
        warnings=notes,
        extra_files=extra_files,
        extra_manifest=extra_manifest,
    )


class TextEncoderGraph(nn.Module):
    """Export wrapper: token ids → L2-normalised text embedding (one prompt per row).

    With ``any_length`` (a causal CLIP text tower pooled at the end-of-text token) the graph takes
    ``[prompts, length]`` for any length up to the context length: the runtime feeds each run only
    up to its longest prompt's end-of-text token, which is exact (the padding after it is never
    attended to) and several times faster than 77 tokens. Otherwise it takes the full context.
    """

    def __init__(self, encoder: nn.Module, any_length: bool = False):
        super().__init__()
        self.encoder = encoder
        self.any_length = any_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.any_length:
            return self.encoder(tokens)
        clip = self.encoder.clip
        length = tokens.shape[1]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        mask = clip.attn_mask[:length, :length].to(x.dtype)
        for block in clip.transformer.resblocks:
            x = x + block.ls_1(_causal_attention(block.attn, block.ln_1(x), mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # end-of-text has the largest id
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)


def _causal_attention(attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``attn(x, x, x, attn_mask=mask)`` of a batch-first self-attention, written out so that the
    exported graph keeps the sequence length dynamic (nn.MultiheadAttention's traces fix it)."""
    heads, dim = attn.num_heads, attn.embed_dim
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3D]
    qkv = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, L, d]
    weights = torch.softmax(torch.matmul(q * (dim // heads) ** -0.5, k.transpose(-2, -1)) + mask, dim=-1)
    out = torch.matmul(weights, v).transpose(1, 2).flatten(2)  # [B, L, D]
    return attn.out_proj(out)


def _any_length(text_encoder) -> bool:
    """Whether the text tower can run on token rows cut after their end-of-text token (see TextEncoderGraph):
    open_clip's CLIP text tower (causal mask, end-of-text pooling, plain batch-first residual blocks)."""
    from open_clip.transformer import ResidualAttentionBlock

    clip = text_encoder.clip
    if not (getattr(clip, "text_pool_type", None) == "argmax" and getattr(clip, "attn_mask", None) is not None
            and all(hasattr(clip, a) for a in ("token_embedding", "positional_embedding", "ln_final",
                                               "text_projection", "transformer"))):
        return False
    blocks = list(getattr(clip.transformer, "resblocks", []))
    return bool(blocks) and all(
        type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") and b.attn.batch_first
        and b.attn._qkv_same_embed_dim and b.attn.in_proj_bias is not None and b.attn.bias_k is None
        for b in blocks)


def _text_encoder_part(text_encoder, classes: list[str], templates: tuple[str, ...]) -> Part:
    prompts = [templates[0].format(c) for c in classes[:8]]
    tokens = text_encoder.tokenize(prompts)
    context = int(tokens.shape[1])
    any_length = _any_length(text_encoder)
    if any_length:
        # Parity on rows cut after the longest end-of-text, against the tower's own full-context forward.
        tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
    return Part(
        name="text_encoder",
        module=TextEncoderGraph(text_encoder, any_length),
        reference=(lambda t: text_encoder(F.pad(t, (0, context - t.shape[1])))) if any_length else None,
        io=PartSignature(inputs=(TensorSpec("tokens", "int64", ("prompts", "length" if any_length else context)),),
                  outputs=(TensorSpec("embeddings", "float32", ("prompts", text_encoder.embed_dim)),)),
        make_inputs=lambda _images: (tokens,),
        tolerances={"fp32": {"embeddings": OutputTolerance(max_abs=1e-4)},
                    "fp16": {"embeddings": OutputTolerance(min_cosine=0.999)}},
    )


#: Where a bundle keeps the CLIP tokenizer of its text_encoder part.
TEXT_TOKENIZER_DIR = "text_tokenizer"
_TOKENIZER_CHECK_PROMPTS = 2048


def _text_tokenizer_files(text_encoder, classes: list[str], templates: tuple[str, ...], context_length: int
                          ) -> tuple[dict[str, Path], dict[str, Any]] | None:
    """The CLIP tokenizer files and manifest section for the runtime's torch-free text encoder.

    None (the caller warns) when the tower's tokenizer is not open_clip's CLIP BPE. The files are
    checked to tokenise this export's prompts exactly as open_clip does; any difference is a bug
    and stops the export.
    """
    import open_clip.tokenizer as oct

    from vlexport.errors import ExportError
    from vlexport.runtime import clip_tokenizer as ct

    tok = text_encoder.tokenizer
    if (not isinstance(tok, oct.SimpleTokenizer) or getattr(tok, "reduction_fn", None) is not None
            or getattr(tok, "clean_fn", None) is not oct._clean_lower):
        return None
    bpe = Path(oct.default_bpe())
    vocab, merges = ct.clip_vocab_and_merges(bpe)
    if tok.encoder != vocab or tok.bpe_ranks != {m: i for i, m in enumerate(merges)}:
        return None
    folder = _tokenizer_folder(bpe)
    vocab_file, merges_file = ct.write_tokenizer_files(folder, bpe)
    ours = ct.CLIPTokenizer.from_files(vocab_file, merges_file, context_length=context_length, error=ExportError)
    per_class = max(1, _TOKENIZER_CHECK_PROMPTS // len(templates))
    prompts = [t.format(c) for c in classes[:per_class] for t in templates]
    want, got = text_encoder.tokenize(prompts).numpy(), ours(prompts)
    bad = [p for p, w, g in zip(prompts, want, got) if not np.array_equal(w, g)]
    if want.shape != got.shape or bad:
        raise ExportError(f"the bundled CLIP tokenizer disagrees with open_clip's on {len(bad)} prompt(s), "
                          f"e.g. {bad[:1]}; this is a vlexport bug, please report it")
    rel_vocab, rel_merges = f"{TEXT_TOKENIZER_DIR}/{ct.VOCAB_FILE}", f"{TEXT_TOKENIZER_DIR}/{ct.MERGES_FILE}"
    section = {"type": ct.TOKENIZER_TYPE, "vocab": rel_vocab, "merges": rel_merges, "context_length": context_length,
               "clean": "lower", "source": f"open_clip {bpe.name}"}
    return {rel_vocab: vocab_file, rel_merges: merges_file}, section


def _tokenizer_folder(bpe: Path) -> Path:
    """A folder for the tokenizer files: the cache (reused by later exports), else a temporary one."""
    import os
    import tempfile

    root = Path(os.environ.get("VLEXPORT_CACHE") or Path("~/.cache/vlexport").expanduser()).expanduser()
    folder = root / "clip_tokenizer" / sha256_file(bpe)[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-")
        probe.close()
        return folder
    except OSError:
        tmp = tempfile.TemporaryDirectory(prefix="vlexport-clip-tokenizer-")
        _TEMP_DIRS.append(tmp)  # removed at exit
        return Path(tmp.name)


_TEMP_DIRS: list[Any] = []


def export_kdeov(opts: KDEOVExportOptions) -> ExportReport:
    """Build the plan and write the bundle (see :func:`write_bundle`)."""
    precision = opts.precision or PrecisionOptions(fp16=opts.fp16)
    precision.check()  # before the slow model loading
    plan = build_plan(opts)
    return write_bundle(plan, opts.out, precision=precision, opset=opts.opset, overwrite=opts.overwrite)


# -- eager rebuild (vlexport bench) -----------------------------------------------------------
def eager_parts(bundle: Bundle) -> dict[str, nn.Module]:
    """The ``detector`` part of an opened KDEOV bundle as an eval-mode eager module, random weights.

    The vocabulary is the bundle's (baked or fed as an input, as exported). Raises
    :class:`~vlexport.errors.EagerRebuildError` when the backbone cannot be built here.
    """
    from vlexport.errors import EagerRebuildError
    from vlexport.export.eager import manifest_model_config
    from vlexport.models.kdeov.model import KDEOVConfig, build_kdeov

    config = KDEOVConfig.from_dict(manifest_model_config(bundle))
    model = build_kdeov(config)
    if model.backbone.name != config.backbone:
        raise EagerRebuildError(f"the {config.backbone} backbone needs ultralytics (pip install ultralytics)")
    baked = (bundle.manifest.get("vocabulary") or {}).get("mode", "baked") == "baked"
    return {"detector": DetectorGraph(model, bundle.load_vocab()["embeddings"], baked).eval()}
