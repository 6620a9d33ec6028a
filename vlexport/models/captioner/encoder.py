"""The captioner's image encoder: a CLIP ViT read at four depths, a feature pyramid, and deformable queries.

Design (image -> ``num_queries`` prefix tokens for the caption decoder):

1. **CLIP ViT, block by block.** The open_clip vision tower is run by hand (patchify, class token,
   positional embedding, ``ln_pre``, residual blocks) so that the patch tokens can be tapped after
   four evenly spaced blocks (3, 6, 9, 12 of 12; a shallower tower repeats blocks, e.g. 1, 1, 2, 2
   of 2). Shallow blocks keep more spatial detail, deep ones more semantics.
2. **Simple feature pyramid.** As in DPT, the taps are reassembled shallow-to-fine into a 4-level
   pyramid at 2x, 1x, 1/2 and 1/4 of the patch grid (a 2x2 transposed convolution up, max pooling
   down, ViTDet style), each projected to ``embed_size`` by a 1x1 convolution and GroupNorm. Pooling
   uses ``ceil_mode`` so that every level keeps at least one cell (ViT-B/32 at 224: 14, 7, 4, 2).
3. **Reference points.** Learned query embeddings, shifted by a projection of the CLS feature so
   that the queries depend on the image, are mapped by Linear + sigmoid to one (x, y) point each.
4. **Deformable cross-attention layers.** Each query samples a few points around its reference
   point on every level (:class:`~vlexport.models.captioner.deformable.MultiScaleDeformableAttention`), then
   an FFN; both post-norm residual blocks. A final linear layer gives the prefix tokens.

Everything exports to standard ONNX operators (GridSample for the sampling, opset 16+).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from vlexport.errors import UsageError
from vlexport.models.clip.towers import _export_safe_attention
from vlexport.models.clip.weights import load_clip_model
from vlexport.models.captioner.deformable import MultiScaleDeformableAttention

__all__ = ["MultiScaleCLIPEncoder", "tap_indices", "NUM_LEVELS"]

#: Number of pyramid levels (and of tapped ViT blocks).
NUM_LEVELS = 4
# Attributes the hand-written ViT forward relies on (open_clip's VisionTransformer).
_VIT_PARTS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")


def tap_indices(depth: int, count: int = NUM_LEVELS) -> list[int]:
    """0-based indices of ``count`` evenly spaced blocks of a ``depth``-block ViT, ending at the last one.

    ``tap_indices(12) == [2, 5, 8, 11]``; ``tap_indices(2) == [0, 0, 1, 1]`` (blocks repeat).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return [math.ceil((i + 1) * depth / count) - 1 for i in range(count)]


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as usual in detection necks; fewer when the width is not a multiple of 32.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class _SimplePyramid(nn.Module):
    """Four ViT taps [B, width, g, g] -> four maps [B, embed, *] at 2x, 1x, 1/2 and 1/4 of g."""

    def __init__(self, width: int, embed_size: int) -> None:
        super().__init__()
        half = max(width // 2, 1)
        self.resample = nn.ModuleList(
            [
                nn.ConvTranspose2d(width, half, kernel_size=2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
                nn.MaxPool2d(kernel_size=4, stride=4, ceil_mode=True),
            ]
        )
        self.project = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(c, embed_size, kernel_size=1, bias=False), _group_norm(embed_size))
                for c in (half, width, width, width)
            ]
        )

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [proj(resample(x)) for x, resample, proj in zip(taps, self.resample, self.project, strict=True)]


class _DeformableLayer(nn.Module):
    """Deformable cross-attention over the pyramid, then an FFN; post-norm residuals as in Deformable DETR."""

    def __init__(self, embed_size: int, num_heads: int, num_points: int, dropout: float) -> None:
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(embed_size, num_heads, NUM_LEVELS, num_points)
        self.norm1 = nn.LayerNorm(embed_size)
        self.ffn = nn.Sequential(
            nn.Linear(embed_size, 4 * embed_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * embed_size, embed_size),
        )
        self.norm2 = nn.LayerNorm(embed_size)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor, pyramid: list[torch.Tensor]
    ) -> torch.Tensor:
        # The positional part keeps each query's identity in the offset/weight predictions across layers.
        x = self.norm1(x + self.dropout(self.cross_attn(x + query_pos, reference_points, pyramid)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class MultiScaleCLIPEncoder(nn.Module):
    """CLIP-normalised images ``[B, 3, S, S]`` -> prefix tokens ``[B, num_queries, embed_size]``.

    See the module docstring for the design. The vision tower comes from
    :func:`~vlexport.models.clip.weights.load_clip_model`, which returns a model shared by every user
    in the process: with ``freeze_vision=True`` it is used as is (frozen, always in eval mode; moving
    this encoder to another device moves the shared tower too); with ``freeze_vision=False`` a private
    deep copy is made trainable, so training never changes the shared model.

    Attributes:
        image_size: side ``S`` of the square input the tower expects.
        mean, std: the CLIP normalisation the caller must apply to RGB in [0, 1].
        num_queries, embed_size: output shape.
        clip_info: provenance of the tower (model_name, pretrained, weights_source,
            weights_sha256, is_pretrained, activation, activation_source).
    """

    def __init__(
        self,
        embed_size: int,
        model_name: str = "ViT-B-32",
        freeze_vision: bool = True,
        num_heads: int = 8,
        num_points: int = 4,
        dropout: float = 0.1,
        *,
        pretrained: str | None = "openai",
        num_queries: int = 10,
        num_layers: int = 1,
        allow_random: bool = True,
        activation: str = "auto",
    ) -> None:
        super().__init__()
        _check_args(embed_size, num_heads, num_points, dropout, num_queries, num_layers)
        loaded = load_clip_model(model_name, pretrained, activation=activation, allow_random=allow_random)
        visual = loaded.model.visual
        missing = [name for name in _VIT_PARTS if not hasattr(visual, name)]
        if missing or getattr(visual, "attn_pool", None) is not None:
            raise UsageError(
                f"CLIP {model_name} has no plain ViT vision tower ({type(visual).__name__}); "
                "the multi-scale encoder needs one, e.g. ViT-B-32 or ViT-B-16"
            )
        self.freeze_vision = freeze_vision
        if freeze_vision:
            visual.requires_grad_(False)
        else:
            visual = copy.deepcopy(visual)  # the loaded model is a shared cache entry: train a private copy
            visual.requires_grad_(True)
        self.visual = visual

        cfg = loaded.preprocess_cfg
        size = cfg["size"]
        if not isinstance(size, int):
            if len(set(size)) != 1:
                raise UsageError(f"CLIP {model_name} expects non-square images {tuple(size)}; choose a square model")
            size = size[0]
        # The runtime's clip_preprocess (also used for training and parity) is open_clip's default
        # transform, and the bundle says so: refuse a tower whose reference pre-processing differs.
        resize = (cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"))
        if resize != ("bicubic", "shortest"):
            raise UsageError(
                f"CLIP {model_name} expects a {resize[0]} resize in {resize[1]!r} mode; the captioner implements "
                "open_clip's default (bicubic resize of the short side, centre crop): choose a model that uses it, "
                "e.g. ViT-B-32 or ViT-B-16"
            )
        self.image_size: int = int(size)
        self.mean: tuple[float, float, float] = tuple(float(v) for v in cfg["mean"])  # type: ignore[assignment]
        self.std: tuple[float, float, float] = tuple(float(v) for v in cfg["std"])  # type: ignore[assignment]
        self.num_queries = num_queries
        self.embed_size = embed_size
        self.clip_info: dict[str, Any] = {
            "model_name": loaded.model_name,
            "pretrained": loaded.pretrained,
            "weights_source": loaded.weights_source,
            "weights_sha256": loaded.weights_sha256,
            "is_pretrained": loaded.is_pretrained,
            "activation": loaded.activation,
            "activation_source": loaded.activation_source,
        }

        width = int(visual.conv1.out_channels)
        self.width = width
        self.taps = tap_indices(len(visual.transformer.resblocks))
        self.pyramid = _SimplePyramid(width, embed_size)
        self.query_embed = nn.Parameter(torch.empty(num_queries, embed_size))
        nn.init.normal_(self.query_embed, std=embed_size**-0.5)
        self.image_cond = nn.Linear(width, embed_size)
        self.reference_points = nn.Linear(embed_size, 2)
        self.layers = nn.ModuleList(
            [_DeformableLayer(embed_size, num_heads, num_points, dropout) for _ in range(num_layers)]
        )
        self.out_proj = nn.Linear(embed_size, embed_size)
        # Start with reference points spread by the query embeddings around the image centre.
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)

    def train(self, mode: bool = True) -> MultiScaleCLIPEncoder:
        """Train the encoder; a frozen tower stays in eval mode (its dropout, if any, stays off)."""
        super().train(mode)
        if self.freeze_vision:
            self.visual.eval()
        return self

    def vit_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the ViT: patch-token grids ``[B, width, g, g]`` at the tapped blocks, and the pooled ``[B, width]``.

        Patch dropout is never applied: the grids need every token.
        """
        visual = self.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, width, g, g]
        gh, gw = int(x.shape[-2]), int(x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, width]
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)

        transformer = visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)  # older open_clip runs the blocks sequence-first
        tapped: dict[int, torch.Tensor] = {}
        with _export_safe_attention():
            for i, block in enumerate(transformer.resblocks[: self.taps[-1] + 1]):
                x = block(x)
                if i in self.taps:
                    tapped[i] = x
        if not batch_first:
            tapped = {i: t.transpose(0, 1) for i, t in tapped.items()}
            x = x.transpose(0, 1)

        grids = [
            tapped[i][:, 1:].transpose(1, 2).reshape(-1, self.width, gh, gw)  # patch tokens only
            for i in self.taps
        ]
        pooled = x[:, 1:].mean(dim=1) if getattr(visual, "pool_type", "tok") == "avg" else x[:, 0]
        return grids, visual.ln_post(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, S, S]`` (CLIP-normalised RGB) -> ``[B, num_queries, embed_size]``."""
        if not torch.jit.is_tracing() and (
            images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2
        ):
            raise ValueError(
                f"expected images of shape [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}"
            )
        grids, pooled = self.vit_features(images)
        pyramid = self.pyramid(grids)
        query_pos = self.query_embed.unsqueeze(0)  # [1, Q, E]
        x = query_pos + self.image_cond(pooled).unsqueeze(1)  # [B, Q, E]: image-conditioned queries
        reference_points = self.reference_points(x).sigmoid()  # [B, Q, 2]
        for layer in self.layers:
            x = layer(x, query_pos, reference_points, pyramid)
        return self.out_proj(x)


def _check_args(
    embed_size: int, num_heads: int, num_points: int, dropout: float, num_queries: int, num_layers: int
) -> None:
    for name, value in (("embed_size", embed_size), ("num_heads", num_heads), ("num_points", num_points),
                        ("num_queries", num_queries), ("num_layers", num_layers)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if embed_size % num_heads != 0:
        raise UsageError(f"embed_size {embed_size} must be divisible by num_heads {num_heads}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}")
