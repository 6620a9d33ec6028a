"""The `captioner` family → parts ``encoder`` (image → prefix tokens + regions) and ``decoder``
(one GPT-2 step with an explicit KV cache), plus the tokenizer files.

Parity is checked twice: per part on one feed (the pipeline's check), and over a whole decode
(:func:`decode_parity`): the runtime's path — encoder graph, then the decoder graph fed its own
cache for ``parity_steps`` steps — against PyTorch's cached greedy decode, image by image.
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

DECODING_METHODS = ("greedy", "beam")


@dataclass
class CaptionerExportOptions:
    """Every knob of `vlexport captioner`; ``None`` means the preset's (or the checkpoint's) value."""

    out: Path
    preset: str = "vitb32-gpt2"
    checkpoint: Path | None = None  # from `vlexport train-captioner`
    clip_model: str | None = None
    clip_pretrained: str | None = None
    clip_activation: str | None = None
    gpt2_weights: str | None = None  # hub name in the local HF cache, folder or file
    tokenizer: str | None = None  # folder with vocab.json + merges.txt (or encoder.json + vocab.bpe)
    region_classes: list[str] | None = None
    max_length: int = 30
    method: str = "greedy"
    num_beams: int = 3
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    decoder_weight_bits: int = 8  # with --int8: the decoder's weight-only bits (8 or 4), gated
    parity_source: str | None = None
    parity_count: int = 2
    parity_steps: int = 20
    opset: int = 17
    overwrite: bool = False
    precision: PrecisionOptions | None = None

    def check(self) -> None:
        if self.max_length < 1:
            raise UsageError(f"--max-length must be at least 1, got {self.max_length}")
        if self.method not in DECODING_METHODS:
            raise UsageError(f"--method must be one of {', '.join(DECODING_METHODS)}, got {self.method!r}")
        if self.num_beams < 1:
            raise UsageError(f"--num-beams must be at least 1, got {self.num_beams}")
        if self.repetition_penalty <= 0:
            raise UsageError(f"--repetition-penalty must be positive, got {self.repetition_penalty}")
        if self.decoder_weight_bits not in (8, 4):
            raise UsageError(f"--decoder-bits must be 8 or 4, got {self.decoder_weight_bits}")
        if self.parity_steps < 1 or self.parity_count < 1:
            raise UsageError("parity needs at least one image and one step")


@dataclass(kw_only=True)
class Options(PrecisionFields):
    """The options of `vlexport captioner`, as typed fields with the CLI's defaults (for :func:`export`)."""

    preset: str = "vitb32-gpt2"
    checkpoint: Path | None = None
    clip_model: str | None = None
    clip_pretrained: str | None = None
    clip_activation: str | None = None
    gpt2_weights: str | None = None
    tokenizer: Path | None = None
    max_length: int = 30
    method: str = "greedy"
    num_beams: int = 3
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    decoder_weight_bits: int = 8
    parity_steps: int = 20
    out: Path | None = None  # bundles/captioner-PRESET (bundles/captioner-trained with a checkpoint)
    overwrite: bool = False
    opset: int = 17


COMMAND = FamilyCommand(
    help="""Export the captioner: part `encoder` (image → prefix tokens + regions) and part `decoder`
    (one GPT-2 step with an explicit KV cache), with the tokenizer.

    \b
    Examples:
      vlexport captioner --gpt2 gpt2 --fp16                     # real sizes, weights from the HF cache
      vlexport train-captioner --data coco128/data.yaml --limit 4 --preset tiny --out cap.pt
      vlexport captioner --checkpoint cap.pt --tokenizer assets/tokenizers/gpt2 --out bundles/cap
    """,
    options=(
        click.option("--preset", default="vitb32-gpt2", show_default=True, help="tiny, vitb32-gpt2 (CLIP ViT-B/32 + GPT-2 small)."),
        click.option("--checkpoint", type=click.Path(path_type=Path), help="Trained captioner (from `vlexport train-captioner`)."),
        click.option("--clip-model", help="open_clip vision tower (default: the preset's)."),
        click.option("--clip-pretrained", help="open_clip pretrained tag or a local weights file (default: openai)."),
        clip_activation_option,
        click.option("--gpt2", "gpt2_weights", help='GPT-2 weights: a hub name found in the local Hugging Face cache ("gpt2"), a folder or a file.'),
        click.option("--tokenizer", type=click.Path(path_type=Path),
                     help="Folder with GPT-2's vocab.json + merges.txt (or encoder.json + vocab.bpe) [default: the HF cache's gpt2]."),
        click.option("--max-length", default=30, show_default=True, type=int, help="Most tokens per caption."),
        click.option("--method", default="greedy", show_default=True, type=click.Choice(["greedy", "beam"]), help="Default decoding."),
        click.option("--num-beams", default=3, show_default=True, type=int),
        click.option("--length-penalty", default=1.0, show_default=True, type=float),
        click.option("--repetition-penalty", default=1.0, show_default=True, type=float),
        click.option("--decoder-bits", "decoder_weight_bits", default=8, show_default=True, type=click.Choice(["8", "4"]),
                     callback=lambda ctx, param, v: int(v),
                     help="With --int8: the decoder's weight-only bits (kept only if its greedy tokens still match PyTorch's)."),
        click.option("--parity-steps", default=20, show_default=True, type=int, help="Cached decode steps compared with PyTorch."),
        click.option("--out", type=click.Path(path_type=Path), help="Bundle folder [default: bundles/captioner-PRESET]."),
        click.option("--overwrite", is_flag=True),
        click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21)),
        *PRECISION_OPTIONS,
    ),
)


def export_options(options: Options) -> CaptionerExportOptions:
    """The exporter's options for CLI-level ``options`` (precision checked)."""
    precision = precision_from(options)
    out = default_out(options.out, f"captioner-{options.preset if not options.checkpoint else 'trained'}")
    return CaptionerExportOptions(out=out, precision=precision, parity_source=options.val,
                                  tokenizer=str(options.tokenizer) if options.tokenizer else None,
                                  **own_fields(options, "out", "tokenizer"))


def export(options: Options) -> ExportReport:
    """Write the bundle `vlexport captioner` writes for these options (see :func:`vlexport.export.exporter.export_model`)."""
    return export_captioner(export_options(options))


def _model(opts: CaptionerExportOptions):
    from vlexport.models.captioner.model import build_captioner, load_captioner

    if opts.checkpoint is not None:
        if any(v is not None for v in (opts.clip_model, opts.clip_pretrained, opts.clip_activation, opts.gpt2_weights)):
            raise UsageError("--checkpoint already fixes the CLIP tower and GPT-2; drop "
                             "--clip-model/--clip-pretrained/--clip-activation/--gpt2")
        return load_captioner(opts.checkpoint)
    overrides = {k: v for k, v in {"clip_model": opts.clip_model, "clip_pretrained": opts.clip_pretrained,
                                   "clip_activation": opts.clip_activation,
                                   "gpt2_weights": opts.gpt2_weights}.items() if v is not None}
    return build_captioner(opts.preset, **overrides).eval()


def _region_classes(opts: CaptionerExportOptions, n: int) -> list[str]:
    from vlexport.models.clip.text import COCO80_CLASSES

    if opts.region_classes is not None:
        if len(opts.region_classes) != n:
            raise UsageError(f"--region-classes has {len(opts.region_classes)} names but the model's class head has {n}")
        return list(opts.region_classes)
    return list(COCO80_CLASSES) if n == len(COCO80_CLASSES) else [f"class{i}" for i in range(n)]


def build_plan(opts: CaptionerExportOptions | Options) -> ExportPlan:
    """Build (or load) the captioner and describe its two parts, the tokenizer and the decoding settings."""
    if isinstance(opts, Options):
        opts = export_options(opts)
    from vlexport.data.readers import parity_frames, synthetic_images
    from vlexport.calibration.weight_only import quantize_weights
    from vlexport.models.captioner.model import CaptionDecoderStep, CaptionEncoderGraph
    from vlexport.models.captioner.gpt2 import empty_cache
    from vlexport.runtime.tasks.caption import clip_preprocess
    from vlexport.runtime.tokenizer import resolve_gpt2_tokenizer

    opts.check()
    tokenizer, vocab_file, merges_file = resolve_gpt2_tokenizer(opts.tokenizer)
    model = _model(opts)
    gcfg = model.gpt2.config
    if tokenizer.vocab_size != gcfg.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but GPT-2 has {gcfg.vocab_size}")
    p = model.num_queries
    if p + opts.max_length > gcfg.n_positions:
        raise UsageError(f"{p} prefix tokens + --max-length {opts.max_length} exceed GPT-2's {gcfg.n_positions} positions")
    enc = model.encoder
    size, mean, std = int(enc.image_size), tuple(enc.mean), tuple(enc.std)

    def frame_to_tensor(frame: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(clip_preprocess(frame, size, mean, std)[0])

    if opts.parity_source:
        frames, label = parity_frames(opts.parity_source, opts.parity_count).frames, str(opts.parity_source)
    else:
        frames, label = synthetic_images(opts.parity_count, seed=0), "synthetic(seed=0)"
    images = torch.cat([frame_to_tensor(f) for f in frames])
    d, c = gcfg.n_embd, model.config.num_region_classes
    L, H, hd = gcfg.n_layer, gcfg.n_head, gcfg.head_dim

    encoder = Part(
        name="encoder",
        module=CaptionEncoderGraph(model).eval(),
        io=PartSignature(inputs=(TensorSpec("images", "float32", ("batch", 3, size, size)),),
                  outputs=(TensorSpec("prefix", "float32", ("batch", p, d)),
                           TensorSpec("boxes", "float32", ("batch", p, 4)),
                           TensorSpec("objectness", "float32", ("batch", p)),
                           TensorSpec("class_logits", "float32", ("batch", p, c)))),
        make_inputs=lambda x: (x,),
        tolerances={"fp32": {"prefix": OutputTolerance(max_abs=1e-4), "boxes": OutputTolerance(max_abs=1e-4)},
                    "fp16": {"prefix": OutputTolerance(min_cosine=0.999)},
                    "int8": {"prefix": OutputTolerance(min_cosine=0.95)}},
        quantize=True,
    )
    step = CaptionDecoderStep(model.gpt2).eval()

    @torch.no_grad()
    def decoder_inputs(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # A mid-decode feed on real prefixes, every dynamic size non-zero and distinct: a cache from
        # the prefix and two tokens, then part of the prefix again and three tokens.
        prefix = model.encoder(x)
        b = prefix.shape[0]
        first = torch.full((b, 2), 464, dtype=torch.long)
        _, past = step(prefix, first, torch.ones(b, p + 2, dtype=torch.long), empty_cache(gcfg, b))
        ids = torch.tensor([[262, 3290, 13]] * b, dtype=torch.long)
        part_prefix = prefix[:, : max(p - 1, 1)]
        mask = torch.ones(b, past.shape[-2] + part_prefix.shape[1] + ids.shape[1], dtype=torch.long)
        return part_prefix, ids, mask, past

    decoder = Part(
        name="decoder",
        module=step,
        io=PartSignature(inputs=(TensorSpec("prefix_embeds", "float32", ("batch", "prefix", d)),
                          TensorSpec("input_ids", "int64", ("batch", "tokens")),
                          TensorSpec("attention_mask", "int64", ("batch", "total")),
                          TensorSpec("past_key_values", "float32", (L, 2, "batch", H, "past", hd))),
                  outputs=(TensorSpec("logits", "float32", ("batch", gcfg.vocab_size)),
                           TensorSpec("present_key_values", "float32", (L, 2, "batch", H, "total", hd)))),
        make_inputs=decoder_inputs,
        tolerances={"fp32": {"logits": OutputTolerance(max_abs=1e-3, min_agreement=1.0, argmax_axis=-1),
                             "present_key_values": OutputTolerance(max_abs=1e-3)},
                    "fp16": {"logits": OutputTolerance(min_cosine=0.999)},
                    "int8": {"logits": OutputTolerance(min_cosine=0.99)}},
        # Gated by the whole-decode check (DECODER_INT8_MIN_AGREEMENT).
        weight_quantizer=lambda src, dst: quantize_weights(src, dst, bits=opts.decoder_weight_bits),
    )
    info = enc.clip_info
    warnings = []
    if not info.get("is_pretrained") and opts.checkpoint is None:
        warnings.append(f"CLIP {info.get('model_name')} is UNTRAINED (random weights) and the captioner is not "
                        "trained: captions are meaningless")
    if opts.checkpoint is None and not model.config.gpt2_weights:
        warnings.append("GPT-2 has random weights (no --gpt2 and no --checkpoint): captions are meaningless")
    classes = _region_classes(opts, c)
    return ExportPlan(
        family="captioner", task="caption", preset=opts.preset if opts.checkpoint is None else "checkpoint",
        parts=[encoder, decoder], parity_images=images, parity_source=label,
        preprocess={"resize": "clip", "size": size, "interpolation": "bicubic", "color": "RGB", "scale": 1 / 255,
                    "mean": list(mean), "std": list(std)},
        provenance={"clip": dict(info), "gpt2": {"weights": model.config.gpt2_weights,
                                                 "checkpoint": str(opts.checkpoint) if opts.checkpoint else None}},
        model={"config": _jsonable(model.config), "gpt2": _jsonable(gcfg)},
        warnings=warnings,
        frame_to_tensor=frame_to_tensor,
        extra_manifest={"caption": {
            "prefix_length": p, "embed_size": d, "num_layers": L, "num_heads": H, "head_dim": hd,
            "vocab_size": gcfg.vocab_size, "n_positions": gcfg.n_positions, "eos_token_id": gcfg.eos_token_id,
            "prompt_ids": [], "max_length": opts.max_length,
            "decoding": {"method": opts.method, "num_beams": opts.num_beams, "length_penalty": opts.length_penalty,
                         "repetition_penalty": opts.repetition_penalty},
            "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt"},
            "region_classes": classes, "objectness_threshold": 0.5}},
        extra_files={"tokenizer/vocab.json": vocab_file, "tokenizer/merges.txt": merges_file},
        checks=[lambda files: ("decode", *_decode_check(model, images, files, opts.parity_steps))],
    )


# The INT8 decoder is kept only when its greedy tokens (after the FP32 encoder) agree with PyTorch's
# on at least this fraction of the checked steps: the decoder's accuracy gate.
DECODER_INT8_MIN_AGREEMENT = 0.95


def _decode_check(model, images: torch.Tensor, files: dict[str, dict[str, Path]], steps: int
                  ) -> tuple[dict[str, Any], list[str], list[tuple[str, str]]]:
    """Whole-decode parity of the runtime's path per precision (each part at that precision when it has
    it, else FP32). FP32 must give identical tokens and logits within 1e-3; an INT8 decoder is gated."""
    figures: dict[str, Any] = {}
    problems: list[str] = []
    refused: list[tuple[str, str]] = []
    enc, dec = files["encoder"], files["decoder"]
    for precision in [p for p in ("fp32", "fp16", "int8") if p in enc or p in dec]:
        res = decode_parity(model, enc.get(precision, enc["fp32"]), dec.get(precision, dec["fp32"]), images, steps)
        figures[precision] = {**res, "encoder": precision if precision in enc else "fp32",
                              "decoder": precision if precision in dec else "fp32"}
    fp32 = figures["fp32"]
    if fp32["logits_max_abs"] > 1e-3:
        problems.append(f"decoder fp32: logits over {steps} cached steps differ by {fp32['logits_max_abs']:.2e} (> 1e-3)")
    if fp32["tokens_identical"] < 1.0:
        problems.append(f"decoder fp32: greedy tokens differ from PyTorch's ({fp32['tokens_identical']:.0%} equal)")
    if "int8" in dec:
        gate = decode_parity(model, enc["fp32"], dec["int8"], images, steps)
        gate["min_agreement"] = DECODER_INT8_MIN_AGREEMENT
        gate["kept"] = gate["tokens_identical"] >= DECODER_INT8_MIN_AGREEMENT
        figures["decoder_int8_gate"] = gate
        if not gate["kept"]:
            log.warning("the INT8 decoder's greedy tokens agree with PyTorch's on %.0f%% of %d steps (< %.0f%%): "
                        "it is left out, the decoder stays FP32/FP16", 100 * gate["tokens_identical"],
                        steps * gate["images"], 100 * DECODER_INT8_MIN_AGREEMENT)
            refused.append(("decoder", "int8"))
    return figures, problems, refused


@torch.no_grad()
def decode_parity(model, encoder_path: Path, decoder_path: Path, images: torch.Tensor, steps: int) -> dict[str, Any]:
    """The runtime's decode path against PyTorch's, image by image, over ``steps`` cached steps.

    PyTorch decodes greedily with its KV cache (ignoring the end token, so every step counts); the
    graphs run the same way, teacher-forced with PyTorch's tokens so that the logits of every step
    are comparable, and each graph step's own argmax is compared with PyTorch's token.
    """
    from vlexport.models.captioner.model import CaptionDecoderStep
    from vlexport.models.captioner.gpt2 import empty_cache
    from vlexport.runtime.backends.onnxruntime import OrtBackend

    step = CaptionDecoderStep(model.gpt2).eval()
    cfg = model.gpt2.config
    prefix_err = logits_err = 0.0
    equal = total = 0
    with OrtBackend(encoder_path, providers=["CPUExecutionProvider"]) as enc, \
            OrtBackend(decoder_path, providers=["CPUExecutionProvider"]) as dec:
        for i in range(images.shape[0]):
            x = images[i:i + 1]
            prefix_t = model.encoder(x)
            prefix_o = enc.infer({"images": x.numpy()})["prefix"].astype(np.float32)
            prefix_err = max(prefix_err, float(np.abs(prefix_o - prefix_t.numpy()).max()))
            past_t, past_o = empty_cache(cfg, 1), np.zeros(tuple(empty_cache(cfg, 1).shape), np.float32)
            feed_t, feed_o = prefix_t, prefix_o
            ids = torch.zeros(1, 0, dtype=torch.long)
            for _ in range(steps):
                mask = torch.ones(1, past_t.shape[-2] + feed_t.shape[1] + ids.shape[1], dtype=torch.long)
                logits_t, past_t = step(feed_t, ids, mask, past_t)
                out = dec.infer({"prefix_embeds": feed_o, "input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                 "past_key_values": past_o})
                logits_o, past_o = out["logits"].astype(np.float32), out["present_key_values"].astype(np.float32)
                logits_err = max(logits_err, float(np.abs(logits_o - logits_t.numpy()).max()))
                token = int(logits_t[0].argmax())
                equal += int(int(logits_o[0].argmax()) == token)
                total += 1
                ids = torch.tensor([[token]], dtype=torch.long)
                feed_t, feed_o = prefix_t[:, :0], prefix_o[:, :0]
    return {"images": int(images.shape[0]), "steps": steps, "prefix_max_abs": prefix_err,
            "logits_max_abs": logits_err, "tokens_identical": equal / max(total, 1)}


def _jsonable(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def export_captioner(opts: CaptionerExportOptions) -> ExportReport:
    """Build the plan and write the bundle (see :func:`write_bundle`)."""
    precision = opts.precision or PrecisionOptions()
    precision.check()
    if precision.val:
        # No caption metric gates INT8 here: --val images serve the parity and decode checks instead.
        opts.parity_source = opts.parity_source or precision.val
        precision.val = None
    plan = build_plan(opts)
    return write_bundle(plan, opts.out, precision=precision, opset=opts.opset, overwrite=opts.overwrite)


# -- eager rebuild (vlexport bench) -----------------------------------------------------------
def eager_parts(bundle: Bundle) -> dict[str, torch.nn.Module]:
    """The ``encoder`` and ``decoder`` parts of an opened captioner bundle as eval-mode eager modules.

    Random CLIP and GPT-2 weights (the same latency), shaped by the manifest's configs.
    """
    from vlexport.export.eager import config_from_dict, config_from_manifest
    from vlexport.models.captioner.gpt2 import GPT2Config
    from vlexport.models.captioner.model import CaptionDecoderStep, CaptionEncoderGraph, CaptionerConfig, build_captioner

    config = config_from_manifest(CaptionerConfig, bundle, clip_pretrained=None, gpt2_weights=None)
    gpt2 = config_from_dict(GPT2Config, (bundle.manifest.get("model") or {}).get("gpt2") or {})
    captioner = build_captioner(config, gpt2_config=gpt2).eval()
    return {"encoder": CaptionEncoderGraph(captioner).eval(), "decoder": CaptionDecoderStep(captioner.gpt2).eval()}
