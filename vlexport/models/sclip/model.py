"""SCLIP: training-free open-vocabulary semantic segmentation with correlative self-attention.

Wang, Mei, Yuille, "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference",
ECCV 2024. This module re-implements the official segmentor on open_clip's ViT (facts in
``shared/references/sclip.md``):

* the last ViT block's attention is replaced by *correlative self-attention* (CSA, :func:`csa_attention`)
  using the block's own weights; its residual and FFN are kept;
* patch tokens go through ``ln_post`` and ``proj``, are L2-normalised and compared with class text
  embeddings (80 ImageNet templates) by cosine similarity;
* inference slides 224x224 windows (stride 112) over the image resized to a short side of 336,
  averages the upsampled cosine logits, resizes them to the original size, optionally refines them
  with PAMR, multiplies by a constant temperature (40) and soft-maxes over queries; synonyms of a
  class are merged by max.

The exportable core is :meth:`SCLIPSegmenter.crop_logits` (a batch of crops -> per-query logits at
crop resolution, text embeddings baked in); :meth:`SCLIPSegmenter.crop_part` wraps it for export.

Presets are in :mod:`~vlexport.models.sclip.config`, class lines and synonyms in
:mod:`~vlexport.models.sclip.vocabulary`, the sliding-window geometry in :mod:`~vlexport.models.sclip.windows`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import UsageError
from vlexport.models.clip.towers import FrozenCLIPTextEncoder, _export_safe_attention
from vlexport.models.clip.weights import LoadedCLIP, load_clip_model
from vlexport.models.sclip.config import SCLIPConfig, _preset
from vlexport.models.sclip.pamr import PAMR
from vlexport.models.sclip.vocabulary import _templates_id, split_synonyms
from vlexport.models.sclip.windows import _bicubic_matrix, short_side_size, window_grid
from vlexport.models.clip.text import (
    IMAGENET_TEMPLATES,
    TextEmbeddingCache,
    build_text_embeddings,
)

__all__ = ["SCLIPSegmenter", "csa_attention"]

ImageLike = Union[np.ndarray, torch.Tensor]
MaskSource = Union[Sequence[np.ndarray], Callable[[np.ndarray], Sequence[np.ndarray]]]


# --------------------------------------------------------------------------------------------------
# correlative self-attention


def csa_attention(x: torch.Tensor, attn: nn.MultiheadAttention) -> torch.Tensor:
    """SCLIP's correlative self-attention on batch-first tokens ``[B, N, D]`` -> ``[B, N, D]``.

    With the block's own projections (``in_proj_weight``/``in_proj_bias``, ``out_proj``), per head
    (scale ``s = d_head ** -0.5``): ``A = softmax(q q^T s) + softmax(k k^T s)`` (rows sum to 2,
    no re-normalisation) and ``out = out_proj(A v)``.
    """
    if attn.in_proj_weight is None:
        raise UsageError("CSA needs an attention with a packed in_proj_weight (same q/k/v dimensions)")
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    head_dim = dim // heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, h, N, d]
        return t.reshape(batch, tokens, heads, head_dim).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scale = head_dim**-0.5
    weights = F.softmax(q @ q.transpose(-2, -1) * scale, dim=-1) + F.softmax(k @ k.transpose(-2, -1) * scale, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return attn.out_proj(out)


def _plain_attention(x: torch.Tensor, attn: nn.MultiheadAttention) -> torch.Tensor:
    """``nn.MultiheadAttention`` self-attention (no mask, eval) on batch-first tokens, written out.

    Used while tracing: PyTorch's own implementation bakes the traced token count into the graph,
    which would fix the crop size of an exported segmenter.
    """
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    head_dim = dim // heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    weights = F.softmax(q @ k.transpose(-2, -1) * head_dim**-0.5, dim=-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


# --------------------------------------------------------------------------------------------------
# the segmenter


class _CropLogits(nn.Module):
    """Export wrapper: ``crops [N, 3, c, c]`` (normalised) -> ``logits [N, Q, c, c]``."""

    def __init__(self, segmenter: SCLIPSegmenter) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.segmenter.crop_logits(crops)


class SCLIPSegmenter(nn.Module):
    """SCLIP on an open_clip ViT.

    Build with ``SCLIPSegmenter.from_preset("vit-b16", class_names)`` or
    ``SCLIPSegmenter(load_clip_model(...), config)``. Images given to :meth:`dense_features`,
    :meth:`crop_logits` and :meth:`slide_logits` are already normalised (0-255 RGB, ``(x - mean) / std``);
    :meth:`segment` and :meth:`classify_proposals` take a raw image (BGR uint8 ``HxWx3`` numpy, or an
    RGB tensor ``[3, H, W]`` / ``[1, 3, H, W]`` with 0-255 values) and do all the pre-processing.

    Buffers: ``text_embeddings [Q, D]`` (unit rows, one per query), ``query_to_class [Q]``.
    """

    text_embeddings: torch.Tensor
    query_to_class: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        loaded: LoadedCLIP,
        config: SCLIPConfig,
        class_names: Sequence[str] | None = None,
        *,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        cache: TextEmbeddingCache | None = None,
    ) -> None:
        super().__init__()
        visual = getattr(loaded.model, "visual", None)
        needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
        if visual is None or any(not hasattr(visual, name) for name in needed):
            raise UsageError(
                f"SCLIP needs a CLIP ViT image tower; {loaded.model_name} has none (choose e.g. ViT-B-16)"
            )
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise UsageError(f"SCLIP does not support {loaded.model_name}: attention pooling or no projection")
        blocks = visual.transformer.resblocks
        if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
            raise UsageError(f"SCLIP needs standard attention blocks; {loaded.model_name} uses custom ones")
        self.loaded = loaded
        self.config = config
        self.visual = visual
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.grid = int(round(math.sqrt(visual.positional_embedding.shape[0] - 1)))
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        # The loader built the towers with the activation the weights were trained with (OpenAI:
        # QuickGELU), so the image and text paths agree; a config that names another one is refused.
        if config.clip_activation not in ("auto", loaded.activation):
            raise UsageError(f"SCLIP config asks for {config.clip_activation} but CLIP {loaded.model_name} was "
                             f"loaded with {loaded.activation}; load it with activation={config.clip_activation!r}")
        self.pamr = PAMR(config.pamr_steps, config.pamr_dilations) if config.pamr_steps > 0 else None
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("text_embeddings", torch.zeros(0, loaded.embed_dim), persistent=False)
        self.register_buffer("query_to_class", torch.zeros(0, dtype=torch.long), persistent=False)
        self.class_names: list[str] = []
        self.queries: list[str] = []
        self.requires_grad_(False)
        self.eval()
        if class_names is not None:
            self.set_vocabulary(class_names, templates, cache=cache)

    @classmethod
    def from_preset(
        cls,
        preset: str = "vit-b16",
        class_names: Sequence[str] | None = None,
        *,
        pretrained: Any = ...,
        allow_random: bool = True,
        offline: bool | None = None,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        cache: TextEmbeddingCache | None = None,
        **overrides: Any,
    ) -> SCLIPSegmenter:
        """Load a preset's CLIP (``pretrained`` overrides the preset's weights) and build the segmenter."""
        config = _preset(preset)
        if pretrained is not ...:
            overrides["clip_pretrained"] = pretrained
        if overrides:
            config = dataclasses.replace(config, **overrides)
        loaded = load_clip_model(config.clip_model, config.clip_pretrained, activation=config.clip_activation,
                                 allow_random=allow_random, offline=offline)
        return cls(loaded, config, class_names, templates=templates, cache=cache)

    def train(self, mode: bool = True) -> SCLIPSegmenter:
        """Training-free: always in eval mode."""
        return super().train(False)

    # ---------------------------------------------------------------- vocabulary

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_vocabulary(
        self,
        class_names: Sequence[str],
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        *,
        cache: TextEmbeddingCache | None = None,
    ) -> None:
        """Embed the vocabulary: one query per synonym (``"a, b"`` -> 2 queries of one class)."""
        queries, owner = split_synonyms(class_names)
        encoder = FrozenCLIPTextEncoder.from_loaded(self.loaded)
        built = build_text_embeddings(encoder, queries, tuple(templates), _templates_id(templates), cache)
        device = self.mean.device
        self.text_embeddings = torch.from_numpy(built.embeddings).to(device)
        self.query_to_class = torch.tensor(owner, dtype=torch.long, device=device)
        self.class_names = [str(name) for name in class_names]
        self.queries = queries

    def _need_vocabulary(self) -> None:
        if self.text_embeddings.shape[0] == 0:
            raise UsageError("SCLIP has no vocabulary: call set_vocabulary([...]) or pass class_names")

    def queries_to_classes(self, scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Max over each class's queries along ``dim`` (identity when there are no synonyms)."""
        if self.text_embeddings.shape[0] == self.num_classes:
            return scores
        moved = scores.movedim(dim, 0)
        out = torch.stack([moved[self.query_to_class == c].amax(dim=0) for c in range(self.num_classes)])
        return out.movedim(0, dim)

    # ---------------------------------------------------------------- features

    def _pos_embed(self, gh: int | torch.Tensor, gw: int | torch.Tensor) -> torch.Tensor:
        """Positional table ``[1 + gh*gw, D]``, DINO-style bicubic interpolation when the count differs.

        While tracing for ONNX (``gh``/``gw`` are then traced sizes) the same interpolation is built
        from the sizes in-graph (:meth:`_pos_embed_traced`), so an exported graph keeps the crop's
        height and width dynamic; eagerly it is the reference's ``F.interpolate``.
        """
        if torch.jit.is_tracing():
            return self._pos_embed_traced(gh, gw)
        gh, gw = int(gh), int(gw)
        pos = self.visual.positional_embedding
        if gh * gw == pos.shape[0] - 1:  # SCLIP's test: token count only (non-square 196 uses the table)
            return pos
        g = self.grid
        dim = pos.shape[-1]
        patch = pos[1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
        patch = F.interpolate(
            patch, scale_factor=((gh + 0.1) / g, (gw + 0.1) / g), mode="bicubic", align_corners=False
        )
        if patch.shape[-2:] != (gh, gw):  # floating point corner case: never silently misalign
            raise RuntimeError(f"positional interpolation gave {tuple(patch.shape[-2:])}, expected {(gh, gw)}")
        patch = patch.permute(0, 2, 3, 1).reshape(gh * gw, dim)
        return torch.cat([pos[:1], patch], dim=0)

    def _pos_embed_traced(self, gh: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
        """:meth:`_pos_embed` from traced sizes (0-dim integer tensors), without Python control flow.

        The bicubic resize is separable, so the patch table ``P [g, g, D]`` becomes
        ``Wy @ P @ Wx^T`` with the resize's weight matrices built from the sizes
        (:func:`_bicubic_matrix`); SCLIP's "same token count keeps the table" test is a ``where``.
        Equal to the eager path up to float32 rounding (``tests/unit/test_sclip.py``).
        """
        pos = self.visual.positional_embedding
        g = self.grid
        table = pos[1:]  # [g*g, D]
        wy, wx = _bicubic_matrix(gh, g, table), _bicubic_matrix(gw, g, table)  # [gh, g], [gw, g]
        patch = (wy @ table.reshape(g, -1)).reshape(-1, g, table.shape[-1])  # [gh, g, D]
        patch = (wx @ patch).reshape(-1, table.shape[-1])  # [gh, gw, D] -> [gh*gw, D]
        n = gh * gw
        same = table[torch.arange(n, device=table.device).clamp(max=g * g - 1)]
        patch = torch.where(n == g * g, same, patch)
        return torch.cat([pos[:1], patch], dim=0)

    def _block(self, block: nn.Module, x: torch.Tensor, *, csa: bool) -> torch.Tensor:
        """One residual block on batch-first tokens; ``csa`` swaps attention for CSA."""
        h = block.ln_1(x)
        if csa:
            a = csa_attention(h, block.attn)
        elif torch.jit.is_tracing() and block.attn.in_proj_weight is not None:
            a = _plain_attention(h, block.attn)  # keeps the token count (crop size) dynamic in ONNX
        elif block.attn.batch_first:
            a = block.attn(h, h, h, need_weights=False)[0]
        else:
            t = h.transpose(0, 1)
            a = block.attn(t, t, t, need_weights=False)[0].transpose(0, 1)
        x = x + block.ls_1(a)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, h, w]`` -> unit-norm patch features ``[B, D, h // p, w // p]``."""
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))  # [B, W, gh, gw]
        batch, width, gh, gw = x.shape
        x = x.reshape(batch, width, gh * gw).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, width).expand(batch, 1, width)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(gh, gw).to(x.dtype)  # traced sizes stay dynamic
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        with _export_safe_attention():
            for block in blocks[:-1]:
                x = self._block(block, x, csa=False)
            x = self._block(blocks[-1], x, csa=True)
        x = v.ln_post(x) @ v.proj  # all tokens
        x = F.normalize(x[:, 1:], dim=-1)
        return x.permute(0, 2, 1).reshape(batch, x.shape[-1], gh, gw)

    def feature_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine logits at feature resolution ``[B, Q, h // p, w // p]``."""
        self._need_vocabulary()
        feats = self.dense_features(images)
        return torch.einsum("bdhw,qd->bqhw", feats, self.text_embeddings.to(feats.dtype))

    def crop_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """Normalised crops ``[N, 3, c, c]`` -> cosine logits ``[N, Q, c, c]`` (bilinear upsampling)."""
        logits = self.feature_logits(crops)
        return F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)

    def crop_part(self) -> nn.Module:
        """The exportable ``segmenter`` part: ``crops [N, 3, c, c] -> logits [N, Q, c, c]``."""
        return _CropLogits(self).eval()

    # ---------------------------------------------------------------- sliding window

    def _windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        crop = self.config.slide_crop
        return window_grid(height, width, crop, self.config.slide_stride)

    @torch.no_grad()
    def slide_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, H, W]`` -> averaged cosine logits ``[B, Q, H, W]``; all crops in ONE batch."""
        self._need_vocabulary()
        batch, _, height, width = images.shape
        windows = self._windows(height, width)
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], dim=0)
        logits = self.crop_logits(crops).view(len(windows), batch, -1, crops.shape[-2], crops.shape[-1])
        return self._stitch(logits.unbind(0), windows, batch, height, width)

    @torch.no_grad()
    def slide_logits_loop(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`slide_logits`, one ``crop_logits`` call per window (tests, benchmarks)."""
        self._need_vocabulary()
        batch, _, height, width = images.shape
        windows = self._windows(height, width)
        parts = [self.crop_logits(images[:, :, y1:y2, x1:x2]) for y1, y2, x1, x2 in windows]
        return self._stitch(parts, windows, batch, height, width)

    def _stitch(
        self,
        parts: Sequence[torch.Tensor],
        windows: Sequence[tuple[int, int, int, int]],
        batch: int,
        height: int,
        width: int,
    ) -> torch.Tensor:
        queries = parts[0].shape[1]
        canvas = parts[0].new_zeros(batch, queries, height, width)
        count = parts[0].new_zeros(1, 1, height, width)
        for part, (y1, y2, x1, x2) in zip(parts, windows):
            canvas[:, :, y1:y2, x1:x2] += part
            count[:, :, y1:y2, x1:x2] += 1
        return canvas / count

    # ---------------------------------------------------------------- pre-processing

    def preprocess(self, image: ImageLike) -> tuple[torch.Tensor, tuple[int, int]]:
        """Raw image -> (normalised ``[1, 3, h, w]`` resized to the short side, original ``(H, W)``).

        numpy: BGR uint8 ``HxWx3``, resized with cv2 INTER_LINEAR on uint8 (as mmcv/SCLIP).
        tensor: RGB 0-255 ``[3, H, W]`` or ``[1, 3, H, W]``, resized bilinearly (no antialias).
        """
        cfg = self.config
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise UsageError(f"expected a BGR uint8 image of shape HxWx3, got {image.dtype} {image.shape}")
            import cv2

            height, width = image.shape[:2]
            new_h, new_w = short_side_size(height, width, cfg.short_side, cfg.max_long_side)
            resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            x = torch.from_numpy(np.ascontiguousarray(resized[:, :, ::-1])).permute(2, 0, 1)[None].float()
        elif isinstance(image, torch.Tensor):
            x = image[None] if image.ndim == 3 else image
            if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
                raise UsageError(f"expected an RGB tensor [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
            height, width = int(x.shape[-2]), int(x.shape[-1])
            new_h, new_w = short_side_size(height, width, cfg.short_side, cfg.max_long_side)
            x = F.interpolate(x.float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
        else:
            raise UsageError(f"expected a numpy BGR image or an RGB tensor, got {type(image).__name__}")
        x = x.to(self.mean.device)
        return (x - self.mean) / self.std, (height, width)

    # ---------------------------------------------------------------- inference

    @torch.no_grad()
    def compute_dense_similarity(
        self, images: torch.Tensor, class_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Normalised ``[1, 3, h, w]`` (or ``[3, h, w]``) -> class cosine similarities ``[C, h // p, w // p]``.

        Whole image, one pass (interpolated positional embedding); synonyms merged by max.
        ``class_names`` replaces the vocabulary when given.
        """
        if class_names is not None and list(class_names) != self.class_names:
            self.set_vocabulary(class_names)
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[0] != 1:
            raise UsageError(f"expected one normalised image [1, 3, h, w], got {tuple(images.shape)}")
        return self.queries_to_classes(self.feature_logits(x), dim=1)[0]

    @torch.no_grad()
    def query_logits(self, image: ImageLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw image -> (cosine logits ``[1, Q, H, W]`` at the original size, normalised input)."""
        self._need_vocabulary()
        x, (height, width) = self.preprocess(image)
        if self.config.slide_crop > 0:
            logits = self.slide_logits(x)
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            if self.pamr is not None:
                guide = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
                logits = self.pamr(guide, logits)
        else:  # whole image, upsampled straight to the original size; SCLIP runs no PAMR here
            logits = F.interpolate(self.feature_logits(x), size=(height, width), mode="bilinear", align_corners=False)
        return logits, x

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``[1, Q, H, W]`` -> class probabilities ``[C, H, W]`` (temperature, softmax, synonym max)."""
        probs = F.softmax(logits[0] * self.config.logit_scale, dim=0)
        return self.queries_to_classes(probs, dim=0)

    @torch.no_grad()
    def probabilities(self, image: ImageLike, class_names: Sequence[str] | None = None) -> torch.Tensor:
        """Raw image -> class probabilities ``float32 [C, H, W]`` at the image's own size.

        :meth:`postprocess` of :meth:`query_logits` (temperature, softmax over queries, synonym
        max), then SCLIP's ``area_thd``: classes ``1..C-1`` whose argmax area is at most
        ``area_threshold`` of the pixels those classes win have their probabilities set to 0.
        :meth:`segment` is the argmax of this (plus ``prob_threshold``).
        """
        if class_names is not None and list(class_names) != self.class_names:
            self.set_vocabulary(class_names)
        logits, _ = self.query_logits(image)
        probs = self.postprocess(logits)  # [C, H, W]
        if self.config.area_threshold > 0 and probs.shape[0] > 1:
            pred = probs.argmax(dim=0)
            areas = torch.bincount(pred.flatten(), minlength=probs.shape[0])[1:].float()
            small = areas <= self.config.area_threshold * areas.sum()
            probs[1:][small] = 0
        return probs

    @torch.no_grad()
    def segment(self, image: ImageLike, class_names: Sequence[str] | None = None) -> np.ndarray:
        """Raw image -> label map ``int64 [H, W]`` at the image's own size (class indices of the vocabulary)."""
        probs = self.probabilities(image, class_names)  # [C, H, W]
        best, pred = probs.max(dim=0)
        if self.config.prob_threshold > 0:
            pred[best < self.config.prob_threshold] = 0
        return pred.cpu().numpy().astype(np.int64)

    # ---------------------------------------------------------------- hybrid: proposals

    @torch.no_grad()
    def classify_proposals(self, image: ImageLike, masks: MaskSource) -> tuple[np.ndarray, np.ndarray]:
        """Label class-agnostic masks: ``(labels int64 [M], scores float32 [M])``.

        ``masks`` is a list of boolean ``HxW`` arrays at the image's size, or any callable
        ``image -> masks`` (SAM, a detector, …). Dense features of the whole (resized) image are
        averaged inside each mask (masks area-resized to the feature grid as weights), re-normalised,
        compared with the queries, ×logit_scale, soft-maxed, and synonyms merged by max. An empty
        mask gets label -1 and score 0.
        """
        self._need_vocabulary()
        if callable(masks):
            masks = masks(image)
        masks = list(masks)
        x, (height, width) = self.preprocess(image)
        if not masks:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        stack = []
        for index, mask in enumerate(masks):
            m = np.asarray(mask)
            if m.shape != (height, width):
                raise UsageError(f"proposal mask {index} has shape {m.shape}, expected the image's {(height, width)}")
            stack.append(torch.from_numpy(m.astype(np.float32)))
        feats = self.dense_features(x)[0]  # [D, gh, gw]
        weights = F.adaptive_avg_pool2d(torch.stack(stack)[:, None].to(feats), feats.shape[-2:])[:, 0]  # [M, gh, gw]
        total = weights.flatten(1).sum(dim=1)
        pooled = torch.einsum("mhw,dhw->md", weights, feats) / total.clamp_min(1e-12)[:, None]
        pooled = F.normalize(pooled, dim=-1)
        probs = F.softmax(pooled @ self.text_embeddings.T * self.config.logit_scale, dim=-1)
        probs = self.queries_to_classes(probs, dim=1)
        scores, labels = probs.max(dim=1)
        empty = total <= 0
        labels[empty] = -1
        scores[empty] = 0
        return labels.cpu().numpy().astype(np.int64), scores.cpu().numpy().astype(np.float32)
