"""Image captioning from a bundle's ``encoder`` and ``decoder`` parts (ClipCap-style prefix + GPT-2).

The bundle contract (written by ``vlexport.export.captioner``):

* ``encoder``: ``images`` float32 ``[B, 3, S, S]`` -> ``prefix`` ``[B, P, D]`` and, optionally
  (all three or none), the region predictions ``boxes`` ``[B, P, 4]`` (cx, cy, w, h normalised to
  the network input), ``objectness`` ``[B, P]`` (logits) and ``class_logits`` ``[B, P, C]``;
* ``decoder``: ``prefix_embeds`` float32 ``[B, P', D]`` (``P' = P`` on the first step, 0 later),
  ``input_ids`` int64 ``[B, T]``, ``attention_mask`` int64 ``[B, S + P' + T]`` (ones),
  ``past_key_values`` float32 ``[L, 2, B, H, S, hd]`` (``S = 0`` on the first step) ->
  ``logits`` ``[B, V]`` (last position) and ``present_key_values`` ``[L, 2, B, H, S + P' + T, hd]``;
* ``manifest["preprocess"]``: ``{"resize": "clip", "size": S, "interpolation": "bicubic",
  "color": "RGB", "scale": 1/255, "mean": [...], "std": [...]}`` (see :func:`clip_preprocess`);
* ``manifest["caption"]``: model sizes, ``eos_token_id``, ``prompt_ids``, ``max_length``,
  ``decoding`` settings, the tokenizer files (paths relative to the bundle) and the region classes.

The token loop runs in numpy (:mod:`vlexport.runtime.decoding`) around the decoder graph. The
decoder always runs on onnxruntime (CUDA when usable, else CPU, never its TensorRT provider): its
shapes change at every step, and a TensorRT engine needs one fixed optimisation profile with
non-empty axes, while the first step has an empty cache. The encoder runs on the requested backend.

(A little over 500 lines, one job: the encoder call, the token loop's feeds and the region
predictions share the manifest's ``caption`` settings; the search itself is in ``runtime/decoding.py``.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlexport.errors import BundleError, UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.manifest import check_choice, check_number
from vlexport.runtime.decoding import DecodeResult, beam_search, check_decode_options, decoder_feeds, greedy_decode
from vlexport.runtime.preprocess import PIL_FILTERS, check_image, pil_resize
from vlexport.runtime.results import Caption, FrameStamp
from vlexport.runtime.tasks.base import IMAGE_INPUT, PartTask, choose_precision, now_ms
from vlexport.runtime.tokenizer import GPT2Tokenizer

__all__ = ["CaptionTask", "CropInfo", "clip_preprocess", "regions_to_source"]

PREFIX_OUT = "prefix"
REGION_OUTS = ("boxes", "objectness", "class_logits")
DECODER_INPUTS = ("prefix_embeds", "input_ids", "attention_mask", "past_key_values")
DECODER_OUTPUTS = ("logits", "present_key_values")
METHODS = ("greedy", "beam")
_OVERRIDES = ("max_length", "method", "num_beams", "length_penalty", "repetition_penalty", "objectness_threshold")
_SIZES = ("prefix_length", "embed_size", "num_layers", "num_heads", "head_dim", "vocab_size", "n_positions")


# -- pre-processing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CropInfo:
    """How a source frame became the ``size x size`` network input: short side resized, centre cropped.

    ``src_shape`` is the frame's ``(height, width)``, ``resized`` the ``(width, height)`` after the
    resize, ``left``/``top`` the crop's offset in the resized image.
    """

    src_shape: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int
    size: int

    def to_source(self, xyxy: np.ndarray) -> np.ndarray:
        """Map xyxy boxes in network-input pixels to source pixels (clipped to the frame)."""
        out = np.array(xyxy, dtype=np.float32, copy=True).reshape(-1, 4)
        h, w = self.src_shape
        gx, gy = self.resized[0] / w, self.resized[1] / h
        out[:, 0::2] = (out[:, 0::2] + self.left) / gx
        out[:, 1::2] = (out[:, 1::2] + self.top) / gy
        np.clip(out[:, 0::2], 0, w, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, h, out=out[:, 1::2])
        return out


def clip_preprocess(
    bgr: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    scale: float = 1 / 255,
    rgb: bool = True,
    interpolation: str = "bicubic",
) -> tuple[np.ndarray, CropInfo]:
    """CLIP's image transform on a BGR uint8 frame -> (``[1, 3, size, size]`` float32, :class:`CropInfo`).

    open_clip's ``Resize(size, interpolation=BICUBIC)`` + ``CenterCrop(size)`` on a PIL image:
    resize so the short side is ``size`` with Pillow's ``interpolation`` filter (antialiased when
    shrinking; the long side is ``int(size * long / short)`` as torchvision computes it),
    centre-crop ``size x size`` (offsets ``int(round((side - size) / 2))`` as torchvision's
    ``CenterCrop``), BGR -> RGB when ``rgb``, then ``(x * scale - mean) / std`` per channel
    (mean/std in the model's colour order).
    """
    check_image(bgr)
    size = int(size)
    if size < 1:
        raise ValueError(f"clip_preprocess: size must be positive, got {size}")
    m = np.broadcast_to(np.asarray(mean, np.float64).reshape(-1), 3)
    s = np.broadcast_to(np.asarray(std, np.float64).reshape(-1), 3)
    if np.any(s == 0):
        raise ValueError(f"clip_preprocess: std must be non-zero, got {list(s)}")
    h, w = bgr.shape[:2]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    # Pillow filters each channel alike: the BGR frame's resize is the RGB image's, channels flipped.
    img = pil_resize(bgr, (new_w, new_h), interpolation)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = img[top : top + size, left : left + size]
    if rgb:
        crop = crop[:, :, ::-1]
    a = (scale / s).astype(np.float32)
    b = (-m / s).astype(np.float32)
    out = np.empty((1, 3, size, size), np.float32)
    for c in range(3):
        np.multiply(crop[:, :, c], a[c], out=out[0, c], dtype=np.float32)
        out[0, c] += b[c]
    return out, CropInfo(src_shape=(h, w), resized=(new_w, new_h), left=left, top=top, size=size)


def regions_to_source(
    boxes: np.ndarray, objectness: np.ndarray, class_logits: np.ndarray, info: CropInfo, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame's region predictions -> (xyxy source-pixel boxes, objectness probabilities, class ids).

    ``boxes`` ``[P, 4]`` are (cx, cy, w, h) normalised to the network input; ``objectness`` ``[P]``
    logits. Regions whose probability is below ``threshold`` are dropped; the rest come most
    confident first.
    """
    prob = 1.0 / (1.0 + np.exp(-np.asarray(objectness, np.float64).reshape(-1)))
    keep = np.flatnonzero(prob >= threshold)
    keep = keep[np.argsort(-prob[keep], kind="stable")]
    cxcywh = np.asarray(boxes, np.float64).reshape(-1, 4)[keep] * info.size
    xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1)
    logits = np.asarray(class_logits).reshape(prob.shape[0], -1)
    ids = logits[keep].argmax(axis=1) if logits.shape[1] else np.zeros(len(keep), np.int64)
    return info.to_source(xyxy), prob[keep].astype(np.float32), ids.astype(np.int64)


# -- settings -------------------------------------------------------------------------------
def _settings(bundle: Bundle, overrides: dict[str, Any]) -> dict[str, Any]:
    """The manifest's caption settings with ``overrides`` applied, every value checked."""
    where = str(bundle.root)
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise UsageError(f"unknown caption option(s) {unknown}; choose from {sorted(_OVERRIDES)}")
    cap = bundle.section("caption")
    if not cap.present:
        raise BundleError(f"{where}: the manifest has no 'caption' settings (prefix_length, tokenizer, ...)")
    out: dict[str, Any] = {key: cap.number(key, integer=True, min=1) for key in _SIZES}
    out["eos_token_id"] = cap.number("eos_token_id", integer=True, min=0, max=out["vocab_size"] - 1)
    prompt = cap.get("prompt_ids", [])
    if not isinstance(prompt, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < out["vocab_size"] for i in prompt
    ):
        raise BundleError(f"{where}: caption.prompt_ids must be a list of token ids, got {prompt!r}")
    out["prompt_ids"] = list(prompt)
    tok = cap.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("vocab"), str) or not isinstance(tok.get("merges"), str):
        raise BundleError(f"{where}: caption.tokenizer must name its 'vocab' and 'merges' files, got {tok!r}")
    out["tokenizer"] = {"vocab": tok["vocab"], "merges": tok["merges"]}
    classes = cap.get("region_classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"{where}: caption.region_classes must be a list of names, got {classes!r}")
    out["region_classes"] = list(classes)

    dec = cap.section("decoding")
    manifest_values = {
        "max_length": cap.get("max_length", 30),
        "num_beams": dec.get("num_beams", 3),
        "length_penalty": dec.get("length_penalty", 1.0),
        "repetition_penalty": dec.get("repetition_penalty", 1.0),
    }
    # Bad manifest values are the bundle's fault (BundleError); bad overrides the caller's (UsageError).
    _check_options(manifest_values, lambda msg: BundleError(f"{where}: caption settings: {msg}"))
    manifest_values["method"] = dec.choice("method", METHODS, "greedy")
    manifest_values["objectness_threshold"] = cap.number("objectness_threshold", 0.5, min=0, max=1)
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**manifest_values, **given}
    _check_options(merged, UsageError)
    check_choice(merged["method"], "decoding method", METHODS)
    check_number(merged["objectness_threshold"], "objectness_threshold", min=0, max=1)
    out.update(merged)
    out["max_length"] = int(out["max_length"])
    out["num_beams"] = int(out["num_beams"])
    for key in ("length_penalty", "repetition_penalty", "objectness_threshold"):
        out[key] = float(out[key])
    room = out["n_positions"] - out["prefix_length"]
    if len(out["prompt_ids"]) + out["max_length"] > room:
        err = UsageError if "max_length" in given else BundleError
        raise err(
            f"{where}: a {len(out['prompt_ids'])}-token prompt plus max_length {out['max_length']} exceeds the "
            f"decoder's {out['n_positions']} positions minus its {out['prefix_length']} prefix tokens; "
            f"use max_length <= {room - len(out['prompt_ids'])}"
        )
    return out


def _check_options(values: dict[str, Any], error: Any) -> None:
    """The decoding options (max_length, num_beams and the penalties: decoding.py's checks)."""
    try:
        check_decode_options(values["max_length"], values["num_beams"], values["length_penalty"],
                             values["repetition_penalty"])
    except UsageError as e:
        raise error(str(e)) from None



# -- the task -------------------------------------------------------------------------------
class CaptionTask(PartTask):
    """Frames in (BGR uint8), :class:`Caption` out: prefix encoder, then a numpy decoding loop.

    Keyword overrides replace the manifest's settings (None keeps it): ``max_length``, ``method``
    ("greedy" or "beam"), ``num_beams``, ``length_penalty``, ``repetition_penalty``,
    ``objectness_threshold`` (any other keyword is a UsageError). ``use_cache=False`` recomputes
    the whole sequence at every step (slower, same tokens; for benchmarks). ``precision`` applies
    to both parts; a decoder without an int8 file (decoders usually have none) runs its best float
    precision for this device instead (:attr:`decoder_precision`). After each call :attr:`timings`
    holds the milliseconds per stage (``infer`` covers the encoder and the whole token loop) and
    :attr:`last_steps` the number of decoder runs.
    """

    part_name = "encoder"

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        precision: str | None = None,
        backend: str | None = None,
        threads: int | None = None,
        *,
        max_length: int | None = None,
        method: str | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        repetition_penalty: float | None = None,
        objectness_threshold: float | None = None,
        use_cache: bool = True,
        **unknown: Any,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        overrides = dict(max_length=max_length, method=method, num_beams=num_beams, length_penalty=length_penalty,
                         repetition_penalty=repetition_penalty, objectness_threshold=objectness_threshold, **unknown)
        # Cheap checks first: settings and tokenizer before any model is hashed and loaded.
        self.settings: dict[str, Any] = _settings(self.bundle, overrides)
        if not isinstance(use_cache, bool):
            raise UsageError(f"use_cache must be true or false, got {use_cache!r}")
        self.use_cache = use_cache
        self.tokenizer = self._load_tokenizer()
        self.decoder = None
        super().__init__(self.bundle, precision=precision, backend=backend, threads=threads)
        self.timings: dict[str, float] = {}
        self.last_steps = 0
        try:
            self._open_decoder(precision, threads)
            self._check_decoder()
            self._check_prefix()
        except BaseException:
            self.close()
            raise

    # -- loading -----------------------------------------------------------------------
    def _load_tokenizer(self) -> GPT2Tokenizer:
        files = self.settings["tokenizer"]
        vocab, merges = self.bundle.verify(files["vocab"]), self.bundle.verify(files["merges"])
        tok = GPT2Tokenizer.from_files(vocab, merges, error=BundleError)
        eos = self.settings["eos_token_id"]
        if tok.eos_token_id != eos:
            raise BundleError(
                f"{self.bundle.root}: caption.eos_token_id is {eos} but the tokenizer's end-of-text token is "
                f"{tok.eos_token_id}"
            )
        return tok

    def _setup_preprocessing(self, where: str) -> None:
        pre = self.bundle.section("preprocess")
        if pre.get("resize") != "clip":
            raise BundleError(f"{where}: preprocess resize {pre.get('resize')!r} is not supported for caption "
                              "(expected 'clip')")
        # Pillow's filter of that name, as torchvision resizes a PIL image.
        interp = pre.choice("interpolation", list(PIL_FILTERS), "bicubic")
        color = str(pre.get("color", "RGB")).upper()
        if color not in ("RGB", "BGR"):
            raise BundleError(f"{where}: preprocess color {color!r} is not supported (expected 'RGB' or 'BGR')")
        size = pre.get("size")
        if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
            size = size[0]
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise BundleError(f"{where}: preprocess size must be one positive integer (square input), got {size!r}")
        try:
            mean = np.broadcast_to(np.asarray(pre.get("mean", [0, 0, 0]), np.float64).reshape(-1), 3)
            std = np.broadcast_to(np.asarray(pre.get("std", [1, 1, 1]), np.float64).reshape(-1), 3)
            scale = float(pre.get("scale", 1 / 255))
        except (TypeError, ValueError) as e:
            raise BundleError(f"{where}: preprocess mean/std/scale must be numbers with 1 or 3 values ({e})") from e
        if np.any(std == 0):
            raise BundleError(f"{where}: preprocess std must be non-zero, got {list(std)}")
        self._pre = {"size": int(size), "mean": mean, "std": std, "scale": scale, "rgb": color == "RGB",
                     "interpolation": interp}

    def _check_io(self, where: str) -> None:
        """The encoder: ``images [B, 3, S, S]`` in; ``prefix`` and all or none of the region outputs."""
        declared = {s.name for s in self.part.io.inputs}
        actual = {s.name for s in self.backend.inputs}
        if declared and declared != actual:
            raise BundleError(
                f"{where}: the manifest declares inputs {sorted(declared)} but the model has {sorted(actual)}"
            )
        if actual != {IMAGE_INPUT}:
            raise BundleError(f"{where}: the encoder must take only {IMAGE_INPUT!r}, it takes {sorted(actual)}")
        size = self._pre["size"]
        shape = self._input_spec(IMAGE_INPUT).shape
        if (len(shape) != 4 or shape[1] not in (3, "channels")
                or any(isinstance(d, int) and d != size for d in shape[2:])):
            raise BundleError(
                f"{where}: input {IMAGE_INPUT!r} has shape {list(shape)}, expected [B, 3, {size}, {size}]"
            )
        outs = {s.name for s in self.backend.outputs}
        if PREFIX_OUT not in outs:
            raise BundleError(f"{where}: the encoder has no {PREFIX_OUT!r} output (it has {sorted(outs)})")
        present = [n for n in REGION_OUTS if n in outs]
        if present and len(present) != len(REGION_OUTS):
            missing = [n for n in REGION_OUTS if n not in outs]
            raise BundleError(f"{where}: the encoder has region outputs {present} but lacks {missing}")
        self.has_regions = bool(present)

    def _open_decoder(self, precision: str | None, threads: int | None) -> None:
        from vlexport.runtime.backends.onnxruntime import TRT_EP, OrtBackend, available_providers

        part = self.bundle.part("decoder")
        where = f"{self.bundle.root}: part 'decoder'"
        providers = [p for p in available_providers() if p != TRT_EP]
        accelerated = any(p != "CPUExecutionProvider" for p in providers)
        # A requested int8 applies to the encoder; the decoder has it only if it was quantised.
        requested = None if precision == "int8" and "int8" not in part.precisions else precision
        calibration = self.bundle.meta.calibration
        target = calibration.target if calibration is not None else "tensorrt"
        if calibration is not None and "decoder" in (calibration.weight_only or {}):
            target = "cpu"  # 8-bit weights: the fastest decoder step on a CPU too (a step reads every weight)
        self.decoder_precision: str = choose_precision(part.precisions, requested, accelerated, where, target,
                                                       refused=self.bundle.refused("decoder"))
        self.decoder_path = self.bundle.verify(part.files[self.decoder_precision])
        self.decoder = OrtBackend(self.decoder_path, providers=providers, threads=threads)
        self._decoder_part = part

    def _check_decoder(self) -> None:
        where = f"{self.bundle.root}: part 'decoder'"
        s = self.settings
        inputs = {spec.name: spec for spec in self.decoder.inputs}
        outputs = {spec.name: spec for spec in self.decoder.outputs}
        declared = {spec.name for spec in self._decoder_part.io.inputs}
        if declared and declared != set(inputs):
            raise BundleError(
                f"{where}: the manifest declares inputs {sorted(declared)} but the model has {sorted(inputs)}"
            )
        if set(inputs) != set(DECODER_INPUTS):
            raise BundleError(f"{where}: the decoder takes {sorted(inputs)}, expected {list(DECODER_INPUTS)}")
        if not set(DECODER_OUTPUTS) <= set(outputs):
            raise BundleError(f"{where}: the decoder outputs {sorted(outputs)}, expected {list(DECODER_OUTPUTS)}")
        for name in ("input_ids", "attention_mask"):
            if inputs[name].dtype != "int64":
                raise BundleError(f"{where}: input {name!r} is {inputs[name].dtype}, expected int64")
        want = {
            "prefix_embeds": ["B", "P", s["embed_size"]],
            "past_key_values": [s["num_layers"], 2, "B", s["num_heads"], "S", s["head_dim"]],
            "input_ids": ["B", "T"],
            "attention_mask": ["B", "S+P+T"],
        }
        for name, dims in want.items():
            shape = inputs[name].shape
            if len(shape) != len(dims) or any(
                isinstance(d, int) and isinstance(w, int) and d != w for d, w in zip(shape, dims)
            ):
                raise BundleError(f"{where}: input {name!r} has shape {list(shape)}, expected {dims} "
                                  "(sizes from the manifest's caption settings)")
        v = outputs["logits"].shape
        if len(v) != 2 or (isinstance(v[1], int) and v[1] != s["vocab_size"]):
            raise BundleError(f"{where}: output 'logits' has shape {list(v)}, expected [B, {s['vocab_size']}]")
        batch = inputs["input_ids"].shape[0]
        rows = s["num_beams"] if s["method"] == "beam" else 1
        if isinstance(batch, int) and batch != rows:
            raise BundleError(f"{where}: the decoder was exported for a fixed batch of {batch}; "
                              f"{s['method']} decoding runs {rows} row(s) at a time")
        self._kv_dtype = np.float16 if inputs["past_key_values"].dtype == "float16" else np.float32
        self._prefix_dtype = np.float16 if inputs["prefix_embeds"].dtype == "float16" else np.float32
        # Decoders padded to a round vocabulary (e.g. 50304) have ids the tokenizer cannot decode.
        self._vocab_limit = min(s["vocab_size"], self.tokenizer.vocab_size)

    def _check_prefix(self) -> None:
        """The encoder's prefix size (graph shape, else one probe run) against the decoder's."""
        s = self.settings
        shape = next(o.shape for o in self.backend.outputs if o.name == PREFIX_OUT)
        if len(shape) != 3:
            raise BundleError(f"{self.bundle.root}: the encoder's {PREFIX_OUT!r} has shape {list(shape)}, "
                              "expected [B, P, D]")
        p, d = shape[1], shape[2]
        if not (isinstance(p, int) and isinstance(d, int)):
            size = self._pre["size"]
            n = self._max_batch or 1
            probe = self.backend.infer({IMAGE_INPUT: np.zeros((n, 3, size, size), np.float32)})[PREFIX_OUT]
            p, d = int(probe.shape[1]), int(probe.shape[2])
        if p != s["prefix_length"]:
            raise BundleError(f"{self.bundle.root}: the encoder makes {p} prefix tokens but the decoder was "
                              f"exported for {s['prefix_length']}")
        if d != s["embed_size"]:
            raise BundleError(f"{self.bundle.root}: the encoder makes {d}-wide prefix tokens but the decoder "
                              f"takes {s['embed_size']}")

    # -- running -----------------------------------------------------------------------
    def preprocess(self, bgr: np.ndarray) -> tuple[np.ndarray, CropInfo]:
        """One frame -> (``[1, 3, S, S]`` float32 encoder input, its :class:`CropInfo`)."""
        p = self._pre
        return clip_preprocess(bgr, p["size"], p["mean"], p["std"], scale=p["scale"], rgb=p["rgb"],
                               interpolation=p["interpolation"])

    def caption(self, bgr: np.ndarray, stamp: FrameStamp | None = None) -> Caption:
        """Caption one BGR uint8 frame."""
        return self.caption_batch([bgr], None if stamp is None else [stamp])[0]

    def caption_batch(
        self, images: Sequence[np.ndarray], stamps: Sequence[FrameStamp | None] | None = None
    ) -> list[Caption]:
        """Caption several frames, one after the other."""
        return self._one_by_one(images, stamps, "caption_batch", self._caption_one)

    def encode(self, bgr: np.ndarray) -> tuple[dict[str, np.ndarray], CropInfo]:
        """Run the encoder on one frame: its outputs (batch axis removed) and the crop geometry."""
        tensor, info = self.preprocess(bgr)
        return self._encode(tensor), info

    def _encode(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        n = self._max_batch
        if isinstance(self._input_spec(IMAGE_INPUT).shape[0], int) and n and n > 1:
            tensor = np.repeat(tensor, n, axis=0)  # a fixed-batch graph: fill it, keep the first row
        out = self.backend.infer({IMAGE_INPUT: tensor})
        return {k: np.asarray(v)[0] for k, v in out.items()}

    def decode(self, prefix: np.ndarray) -> DecodeResult:
        """Generate token ids from one ``[P, D]`` (or ``[1, P, D]``) prefix with the task's settings."""
        s = self.settings
        prefix = np.asarray(prefix, np.float32).reshape(1, s["prefix_length"], s["embed_size"])
        common = dict(max_length=s["max_length"], eos_token_id=s["eos_token_id"], prompt_ids=s["prompt_ids"],
                      repetition_penalty=s["repetition_penalty"], use_cache=self.use_cache)
        if s["method"] == "beam":
            return beam_search(self._step, prefix, num_beams=s["num_beams"], length_penalty=s["length_penalty"],
                               **common)
        return greedy_decode(self._step, prefix, **common)

    def _step(self, prefix_embeds: np.ndarray | None, input_ids: np.ndarray, attention_mask: np.ndarray,
              past: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One decoder run in the shape :mod:`vlexport.runtime.decoding` expects."""
        s = self.settings
        b = input_ids.shape[0]
        feeds = decoder_feeds(s, prefix_embeds, input_ids, attention_mask, past, prefix_dtype=self._prefix_dtype,
                              kv_dtype=self._kv_dtype)
        out = self.decoder.infer(feeds)
        logits = np.asarray(out["logits"], np.float32)
        if logits.shape != (b, s["vocab_size"]):
            raise BundleError(f"{self.bundle.root}: the decoder returned logits of shape {tuple(logits.shape)}, "
                              f"expected {(b, s['vocab_size'])}")
        if self._vocab_limit < logits.shape[1]:
            logits = logits.copy()
            logits[:, self._vocab_limit :] = -np.inf
        return logits, out["present_key_values"]

    def _caption_one(self, bgr: np.ndarray, stamp: FrameStamp | None, times: dict[str, float]) -> Caption:
        t0 = now_ms()
        tensor, info = self.preprocess(bgr)
        t1 = now_ms()
        enc = self._encode(tensor)
        result = self.decode(enc[PREFIX_OUT])
        t2 = now_ms()
        text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()
        regions: dict[str, Any] = {}
        if self.has_regions:
            boxes, obj, ids = regions_to_source(enc["boxes"], enc["objectness"], enc["class_logits"], info,
                                                self.settings["objectness_threshold"])
            names = self.settings["region_classes"]
            labels = [names[i] if 0 <= i < len(names) else f"class{i}" for i in ids.tolist()] if names else None
            regions = {"boxes": boxes, "objectness": obj, "class_ids": ids, "labels": labels}
        cap = Caption(text, result.token_ids, result.score, stamp, **regions)
        times["preprocess"] += t1 - t0
        times["infer"] += t2 - t1
        times["postprocess"] += now_ms() - t2
        self.last_steps = result.steps
        return cap

    # -- description and lifetime -------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        d = super().describe()
        s = self.settings
        d.update(
            decoder_precision=self.decoder_precision,
            decoder_file=str(self.decoder_path),
            decoder_backend="onnxruntime",
            decoder_device=self.decoder.device if self.decoder is not None else "closed",
            method=s["method"],
            num_beams=s["num_beams"],
            max_length=s["max_length"],
            length_penalty=s["length_penalty"],
            repetition_penalty=s["repetition_penalty"],
            use_cache=self.use_cache,
            regions=self.has_regions,
        )
        return d

    def close(self) -> None:
        """Release both parts."""
        if getattr(self, "decoder", None) is not None:
            self.decoder.close()
        if getattr(self, "backend", None) is not None:
            super().close()
