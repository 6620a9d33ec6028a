"""KDEOV: a lightweight open-vocabulary detector distilled from CLIP.

A small visual backbone (YOLOv8n, YOLOv5s or a tiny CNN) is trained so that its pooled image
embedding and its per-location *region* embeddings live in a frozen CLIP text tower's embedding
space. Any class name then becomes a classifier: encode it with the text tower, take the cosine
similarity with every location's embedding, and read boxes from the grid (``box_source="grid"``)
or from the YOLO backbone's own box head (``"yolo"``).

Detection scores each class independently, as YOLO-World and ViLD-text do: ``sigmoid(s * cos(e, t_c)
+ b)`` with a learned scale ``s`` and bias ``b``, so a one-class vocabulary scores between 0 and 1
and adding a class never changes another class's score. The region embedding of a YOLO backbone
is its Detect head's class branch (the two 3x3 convolutions before the final 1x1 classifier,
pretrained with the detector) followed by a 1x1 projection to the text space; image-level
zero-shot classification keeps CLIP's softmax over the vocabulary.

Checkpoints (``vlexport.kdeov/2``) are plain ``torch.save`` dicts of tensors and builtins, so they
load with ``weights_only=True``; the frozen text tower is never stored in them, but its identity
(model, weights sha256, activation) and the vocabulary the student was trained on are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.atomic import atomic_write
from vlexport.errors import CheckpointError, UsageError
from vlexport.models.common.backbones import LightweightVisualBackbone, check_state_dict, load_checkpoint_file
from vlexport.models.kdeov.checkpoint import KDEOVCheckpoint

if TYPE_CHECKING:  # the CLIP towers are only needed when text is encoded
    from vlexport.models.clip.towers import FrozenCLIPTextEncoder

__all__ = [
    "CHECKPOINT_FORMAT",
    "FUSION_MODES",
    "BOX_SOURCES",
    "ProjectionNetwork",
    "SpatialProjection",
    "CrossModalFusionModule",
    "folded_similarity",
    "folded_projection",
    "best_folded_similarity",
    "soft_normalize",
    "KDEOVConfig",
    "KDEOV_PRESETS",
    "KDEOVModel",
    "save_kdeov_checkpoint",
    "load_kdeov_checkpoint",
    "kdeov_checkpoint_extra",
    "build_kdeov",
]

CHECKPOINT_FORMAT = "vlexport.kdeov/2"
# Format 1 scored the neck features with a softmax head and has no region branch to load into.
_OLD_FORMATS = {"vlexport.kdeov/1": "a softmax head on the neck features, before per-class sigmoid scoring"}
#: Initial region-score bias: sigmoid(-4.6) = 0.01, a rare-positive prior as in RetinaNet/YOLO.
REGION_BIAS_INIT = -math.log(99.0)
FUSION_MODES = ("film", "cross_attention")
BOX_SOURCES = ("grid", "yolo")
_TEXT_PREFIX = "text_encoder."


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class ProjectionNetwork(nn.Module):
    """Global average pooling → Linear → GELU → Linear → L2 normalisation: ``[B, C, H, W] → [B, D]``."""

    def __init__(self, in_channels: int, embed_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(in_channels, embed_dim)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return F.normalize(self.fc2(self.act(self.fc1(pooled))), dim=-1)


class SpatialProjection(nn.Module):
    """1x1 convolution + GroupNorm: ``[B, C, H, W] → [B, D, H, W]`` (not normalised).

    The number of groups is ``gcd(groups, embed_dim)`` so that it always divides ``embed_dim``.
    """

    def __init__(self, in_channels: int, embed_dim: int, groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, embed_dim, 1)
        self.norm = nn.GroupNorm(math.gcd(groups, embed_dim), embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class CrossModalFusionModule(nn.Module):
    """Condition a visual map ``[B, D, H, W]`` on text features; the output has the input's shape.

    Text features are ``[C, D]`` (one vocabulary shared by the batch) or ``[B, C, D]``.

    * ``"film"``: ``γ, β = W_γ t̄, W_β t̄`` from the mean text feature ``t̄``;
      ``out = v · (1 + γ) + β``. ``W_γ``, ``W_β`` start at zero, so the module starts as identity.
    * ``"cross_attention"``: the ``H·W`` visual tokens attend to the ``C`` text tokens
      (multi-head attention), ``out = LayerNorm(v + Attn(v, t, t))``.
    """

    def __init__(self, embed_dim: int, num_heads: int = 8, mode: str = "film") -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise UsageError(f"unknown fusion mode {mode!r}; choose one of: {', '.join(FUSION_MODES)}")
        self.mode = mode
        self.embed_dim = embed_dim
        if mode == "film":
            self.gamma = nn.Linear(embed_dim, embed_dim)
            self.beta = nn.Linear(embed_dim, embed_dim)
            for layer in (self.gamma, self.beta):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        else:
            if embed_dim % num_heads:
                raise UsageError(f"fusion: num_heads {num_heads} must divide embed_dim {embed_dim}")
            self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
            self.norm = nn.LayerNorm(embed_dim)

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if visual.ndim != 4 or visual.shape[1] != self.embed_dim:
            raise UsageError(f"fusion: expected visual [B, {self.embed_dim}, H, W], got {tuple(visual.shape)}")
        if text.ndim not in (2, 3) or text.shape[-1] != self.embed_dim:
            raise UsageError(
                f"fusion: expected text [C, {self.embed_dim}] or [B, C, {self.embed_dim}], got {tuple(text.shape)}"
            )
        b, d, h, w = visual.shape
        if self.mode == "film":
            t = text.mean(dim=-2)  # [D] or [B, D]
            gamma = self.gamma(t).reshape(-1, d, 1, 1)
            beta = self.beta(t).reshape(-1, d, 1, 1)
            return visual * (1.0 + gamma) + beta
        tokens = visual.flatten(2).transpose(1, 2)  # [B, HW, D]
        keys = text.unsqueeze(0).expand(b, -1, -1) if text.ndim == 2 else text
        attended, _ = self.attn(tokens, keys, keys, need_weights=False)
        out = self.norm(tokens + attended)
        return out.transpose(1, 2).reshape(b, d, h, w)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def soft_normalize(x: torch.Tensor, floor: torch.Tensor | float, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """``x / sqrt(|x|² + floor²)`` along ``dim``: :func:`F.normalize` when ``floor`` is zero."""
    sq = (x * x).sum(dim, keepdim=True) + floor * floor
    return x / sq.sqrt().clamp_min(eps)


def folded_projection(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``GroupNorm(conv(x))`` as a per-sample affine map of ``x``: ``(x_flat, W', c)``.

    ``x`` [B, Cin, H, W] feeds a 1x1 ``conv`` (Cin → D) and a ``GroupNorm``. GroupNorm's
    statistics are linear/quadratic in ``x``: from the spatial mean x̄ and second moment
    S = X Xᵀ / HW (the statistics derived in float64, so E[y²] − E[y]² does not cancel badly) we
    get per-sample scales ``a`` and shifts ``b`` with ``GN(conv(x)) = W' x + c`` where
    ``W' = a ⊙ W`` [B, D, Cin] and ``c = a ⊙ bias + b`` [B, D]; ``x_flat`` is [B, Cin, HW].
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
    return xf, w_eff, c_eff


def _folded_norm(xf: torch.Tensor, w_eff: torch.Tensor, c_eff: torch.Tensor, floor: torch.Tensor | float
                 ) -> torch.Tensor:
    """``sqrt(|W' x + c|² + floor²)`` per location [B, 1, HW], as the quadratic form in ``x``."""
    q = torch.matmul(w_eff.transpose(1, 2), w_eff)  # [B, Cin, Cin]
    lin = 2.0 * torch.matmul(c_eff.unsqueeze(1), w_eff)  # [B, 1, Cin]
    qx = torch.matmul(q, xf)  # [B, Cin, HW]
    sq_norm = (torch.matmul(torch.ones_like(lin), qx * xf) + torch.matmul(lin, xf)
               + (c_eff * c_eff).sum(-1, keepdim=True).unsqueeze(-1))  # [B, 1, HW]
    return (sq_norm.clamp_min(0) + floor * floor).sqrt().clamp_min(1e-12)


def folded_similarity(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm, text: torch.Tensor,
                      floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``text @ soft_normalize(GroupNorm(conv(x)), floor)`` per location, without the D-channel map.

    With :func:`folded_projection`'s ``GN(conv(x)) = W' x + c`` the similarities are
    ``(T W') x + T c`` and the squared norms the quadratic form ``xᵀ W'ᵀW' x + 2 cᵀW' x + |c|²``:
    GEMMs of width Cin (80 for YOLOv8n's class branch) instead of D (512). ``text`` is [C, D]
    (unit rows); returns [B, C, HW].
    """
    xf, w_eff, c_eff = folded_projection(x, conv, norm)
    sim = torch.matmul(torch.matmul(text, w_eff), xf) + torch.matmul(c_eff, text.t()).unsqueeze(-1)  # [B, C, HW]
    return sim / _folded_norm(xf, w_eff, c_eff, floor)


def best_folded_similarity(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm, text: torch.Tensor,
                           floor: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest of :func:`folded_similarity` over the classes, and its class: ``([B, HW], [B, HW])``.

    Arranged for inference with large vocabularies: the denominator does not depend on the class,
    so the maximum is taken on the numerators; ``T c`` rides in the GEMM as one more input row of
    ones; and the GEMM writes [HW, C], so the maximum runs along contiguous memory (onnxruntime's
    reductions over a strided axis cost several times more). One TopK gives value and index.
    """
    xf, w_eff, c_eff = folded_projection(x, conv, norm)
    # The Concat also keeps onnxruntime from fusing the transpose into a slower transposed GEMM.
    rows = torch.cat([xf.transpose(1, 2), torch.ones_like(xf[:, :1]).transpose(1, 2)], 2)  # [B, HW, Cin+1]
    classes = torch.cat([torch.matmul(w_eff.transpose(1, 2), text.t()),
                         torch.matmul(c_eff, text.t()).unsqueeze(1)], 1)  # [B, Cin+1, C]
    top, idx = torch.matmul(rows, classes).topk(1, dim=2)  # [B, HW, 1]
    return top[..., 0] / _folded_norm(xf, w_eff, c_eff, floor)[:, 0], idx[..., 0]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KDEOVConfig:
    """Everything needed to rebuild a KDEOV model (stored in its checkpoints).

    Attributes:
        backbone: ``"yolov8n"``, ``"yolov5s"`` or ``"simple"``.
        embed_dim: joint embedding size; must equal the CLIP text tower's.
        fusion: ``"film"`` or ``"cross_attention"``.
        fusion_heads: attention heads for ``"cross_attention"``.
        box_source: ``"grid"`` (a default square per cell) or ``"yolo"`` (the backbone's box head).
        grid_box_scale: side of a grid cell's default box, in multiples of the level's stride.
        image_size: square input size (multiple of 32).
        clip_model, clip_pretrained: the CLIP towers the student is aligned to (open_clip model
            name or ``"tiny"``; pretrained tag, weights path, or None for seeded random weights).
        clip_activation: the towers' MLP activation, ``"auto"`` (from the weights' provenance),
            ``"quickgelu"`` or ``"gelu"`` (see :func:`~vlexport.models.clip.towers.resolve_activation`).
    """

    backbone: str = "yolov8n"
    embed_dim: int = 512
    fusion: str = "film"
    fusion_heads: int = 8
    box_source: str = "grid"
    grid_box_scale: float = 4.0
    image_size: int = 640
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    clip_activation: str = "auto"

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_MODES:
            raise UsageError(f"unknown fusion {self.fusion!r}; choose one of: {', '.join(FUSION_MODES)}")
        if self.box_source not in BOX_SOURCES:
            raise UsageError(f"unknown box_source {self.box_source!r}; choose one of: {', '.join(BOX_SOURCES)}")
        if not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
            raise UsageError(f"embed_dim must be a positive integer, got {self.embed_dim!r}")
        if not isinstance(self.image_size, int) or self.image_size <= 0 or self.image_size % 32:
            raise UsageError(f"image_size must be a positive multiple of 32, got {self.image_size!r}")
        if not self.grid_box_scale > 0:
            raise UsageError(f"grid_box_scale must be > 0, got {self.grid_box_scale!r}")
        if not isinstance(self.fusion_heads, int) or self.fusion_heads <= 0:
            raise UsageError(f"fusion_heads must be a positive integer, got {self.fusion_heads!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (JSON- and ``weights_only``-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KDEOVConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a UsageError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown KDEOV config key(s): {', '.join(map(str, unknown))}")
        return cls(**dict(data))

    # Fields that change the weights' shapes or meaning; the rest may differ from a checkpoint's.
    architecture_fields = ("backbone", "embed_dim", "fusion", "fusion_heads", "clip_model")


KDEOV_PRESETS: dict[str, KDEOVConfig] = {
    "tiny": KDEOVConfig(backbone="simple", embed_dim=64, clip_model="tiny", clip_pretrained=None,
                        image_size=128, box_source="grid"),
    "yolov8n-vitb32": KDEOVConfig(backbone="yolov8n", embed_dim=512, clip_model="ViT-B-32",
                                  clip_pretrained="openai", image_size=640, box_source="yolo"),
    "yolov5s-vitb32": KDEOVConfig(backbone="yolov5s", embed_dim=512, clip_model="ViT-B-32",
                                  clip_pretrained="openai", image_size=640, box_source="yolo"),
}
DEFAULT_PRESET = "yolov8n-vitb32"


def _resolve_config(config: KDEOVConfig | str) -> KDEOVConfig:
    if isinstance(config, KDEOVConfig):
        return config
    if isinstance(config, str):
        if config not in KDEOV_PRESETS:
            raise UsageError(f"unknown KDEOV preset {config!r}; choose one of: {', '.join(KDEOV_PRESETS)}")
        return KDEOV_PRESETS[config]
    raise UsageError(f"expected a KDEOVConfig or a preset name, got {type(config).__name__}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class KDEOVModel(nn.Module):
    """Student: backbone → image embedding, per-level spatial embeddings, text fusion.

    Args:
        config: architecture and CLIP pairing.
        backbone: a prebuilt backbone (default: ``LightweightVisualBackbone(config.backbone)``).
        text_encoder: a frozen CLIP text tower, needed only to encode class names or texts
            (its ``embed_dim`` must equal ``config.embed_dim``). It is a sub-module (it follows
            ``.to()``) but never part of :meth:`student_state_dict` nor of checkpoints.
    """

    def __init__(
        self,
        config: KDEOVConfig,
        backbone: LightweightVisualBackbone | None = None,
        text_encoder: FrozenCLIPTextEncoder | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else LightweightVisualBackbone(config.backbone)
        if self.backbone.name != config.backbone:
            # A fallback backbone (already warned about) must be what the config, and so every
            # checkpoint of this model, records.
            config = dataclasses.replace(config, backbone=self.backbone.name)
        self.config = config
        if config.box_source == "yolo" and not self.backbone.has_box_head:
            raise UsageError(
                f"box_source 'yolo' needs a backbone with a YOLO box head; {self.backbone.name!r} has none "
                "(use box_source 'grid')"
            )
        d = config.embed_dim
        # CLIP's initial temperature 0.07, learned in log space.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.projection = ProjectionNetwork(self.backbone.out_channels[-1], d)
        self.spatial_projections = nn.ModuleList(SpatialProjection(c, d) for c in self.region_channels)
        # Per-class detection logits: region_logit_scale.exp() * cos + region_bias, then a sigmoid.
        self.region_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.region_bias = nn.Parameter(torch.tensor(REGION_BIAS_INIT))
        # The cosine's norm is floored: e / sqrt(|e|^2 + floor^2). Zero is the plain cosine; the
        # detector initialisation sets it so that the norm is nearly constant (an affine cosine)
        # without adding a constant direction to e that unseen class texts would score against.
        self.register_buffer("region_norm_floor", torch.tensor(0.0))
        self.fusion = CrossModalFusionModule(d, config.fusion_heads, config.fusion)
        self.text_encoder: nn.Module | None = None
        if text_encoder is not None:
            self.attach_text_encoder(text_encoder)

    # -- text ---------------------------------------------------------------------------------

    def attach_text_encoder(self, text_encoder: FrozenCLIPTextEncoder) -> None:
        """Attach a frozen CLIP text tower (checked against ``config.embed_dim``)."""
        dim = int(getattr(text_encoder, "embed_dim", -1))
        if dim != self.config.embed_dim:
            raise UsageError(
                f"text encoder embed_dim {dim} does not match the KDEOV embed_dim {self.config.embed_dim}"
            )
        for p in text_encoder.parameters():
            p.requires_grad_(False)
        self.text_encoder = text_encoder

    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Texts (list of strings) or token ids ``[N, L]`` → L2-normalised ``[N, D]`` via the frozen tower."""
        if self.text_encoder is None:
            raise UsageError("this KDEOV model has no text encoder attached; pass text features instead of texts")
        if isinstance(texts, str):
            raise UsageError("encode_text expects a list of strings, got a single string")
        with torch.no_grad():
            if isinstance(texts, torch.Tensor):
                feats = self.text_encoder(texts.to(self.logit_scale.device))
            else:
                texts = list(texts)
                if not texts:
                    raise UsageError("empty vocabulary: give at least one class name")
                feats = self.text_encoder.encode(texts)
        return F.normalize(feats.to(self.logit_scale.device, self.logit_scale.dtype), dim=-1)

    def _text_features(self, classes: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Class names → encoded features, or validate a ``[C, D]`` feature tensor."""
        if isinstance(classes, torch.Tensor) and classes.is_floating_point():
            if classes.ndim != 2 or classes.shape[1] != self.config.embed_dim or classes.shape[0] == 0:
                raise UsageError(
                    f"text features: got shape {tuple(classes.shape)}, "
                    f"expected [C, {self.config.embed_dim}] with C >= 1"
                )
            return classes
        return self.encode_text(classes)

    # -- image --------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` (RGB in [0, 1]) → L2-normalised embeddings ``[B, D]``."""
        return self.projection(self.backbone(images)[-1])

    @property
    def region_channels(self) -> list[int]:
        """Channels of the region features each level's projection reads."""
        if not self.backbone.has_box_head:
            return list(self.backbone.out_channels)
        return [int(branch[-1].conv.out_channels) for branch in self._class_branches()]

    def _class_branches(self) -> list[nn.Module]:
        # The Detect head's class branch without its final 1x1 classifier (shared with the backbone:
        # its weights are the detector's, and they train with the region head).
        return [branch[:-1] for branch in self.backbone.detect.cv3]

    def region_features(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level features the region embeddings are projected from (the class branch of a YOLO head)."""
        if not self.backbone.has_box_head:
            return feats
        return [branch(f) for branch, f in zip(self._class_branches(), feats)]

    def _projected(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        regions = self.region_features(feats)
        return [proj(f) for proj, f in zip(self.spatial_projections, regions)]

    def _spatial(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [F.normalize(p, dim=1) for p in self._projected(feats)]

    def scoring_embeddings(self, projected: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Projected region features → the vectors detection scores against unit texts.

        ``e / sqrt(|e|² + floor²)`` with ``floor = region_norm_floor`` (the plain L2
        normalisation when it is zero).
        """
        return soft_normalize(projected, self.region_norm_floor, dim=dim)

    def get_spatial_embeddings(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level region embeddings ``[B, D, H_l, W_l]`` (strides 8, 16, 32), L2-normalised along D."""
        return self._spatial(self.backbone(images))

    def region_logits(self, embeddings: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Scoring embeddings ``[..., D]`` (:meth:`scoring_embeddings`) x text ``[C, D]`` -> per-class logits ``[..., C]``."""
        text = F.normalize(text_features, dim=-1)
        return self.region_logit_scale.exp() * embeddings @ text.t() + self.region_bias

    def zero_shot_classify(self, images: torch.Tensor, classes: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, C] = softmax(exp(logit_scale) · cos(image, text))``."""
        text = F.normalize(self._text_features(classes), dim=-1)
        return (self.logit_scale.exp() * self.encode_image(images) @ text.t()).softmax(-1)

    # -- detection ----------------------------------------------------------------------------

    def grid_boxes(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Default boxes ``[N, 4]`` xyxy: a square of side ``grid_box_scale · stride`` per cell."""
        boxes = []
        for feat, stride in zip(feats, self.backbone.strides):
            h, w = feat.shape[-2], feat.shape[-1]
            cx = (torch.arange(w, device=feat.device, dtype=feat.dtype) + 0.5) * stride
            cy = (torch.arange(h, device=feat.device, dtype=feat.dtype) + 0.5) * stride
            gy, gx = torch.meshgrid(cy, cx, indexing="ij")
            centres = torch.stack((gx, gy), -1).reshape(-1, 2)
            half = 0.5 * self.config.grid_box_scale * stride
            boxes.append(torch.cat((centres - half, centres + half), -1))
        return torch.cat(boxes, 0)

    def _boxes(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.config.box_source == "yolo":
            return self.backbone.box_regression(feats)
        return self.grid_boxes(feats).unsqueeze(0).expand(feats[0].shape[0], -1, -1)

    def _detect_from_feats(
        self, feats: list[torch.Tensor], projected: list[torch.Tensor], text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, N, D]: levels P3, P4, P5, each row-major, the same order as the boxes.
        emb = torch.cat([self.scoring_embeddings(p).flatten(2) for p in projected], 2).transpose(1, 2)
        return self._boxes(feats), self.region_logits(emb, text_features).sigmoid()

    def detect_raw(self, images: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense predictions: boxes ``[B, N, 4]`` (xyxy, input pixels) and class scores ``[B, N, C]``.

        Each class is scored on its own: ``sigmoid(exp(region_logit_scale) · t_c · e_n /
        sqrt(|e_n|² + region_norm_floor²) + region_bias)`` (the cosine when the floor is zero). The graph has no data-dependent control flow, so it traces to ONNX with a
        dynamic batch.
        """
        feats = self.backbone(images)
        return self._detect_from_feats(feats, self._projected(feats), text_features)

    @torch.no_grad()
    def open_vocabulary_detect(
        self,
        images: torch.Tensor,
        classes: Sequence[str] | torch.Tensor,
        score_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        max_detections: int = 300,
    ) -> list[dict[str, torch.Tensor]]:
        """Detect the given classes: best-scoring class per location, score threshold, per-class NMS.

        Boxes are clipped to the image. Detections with ``score >= score_threshold`` are kept.

        Returns one dict per image with ``boxes [K, 4]`` (xyxy input pixels), ``scores [K]``
        and ``labels [K]`` (indices into ``classes``), sorted by decreasing score.
        """
        from torchvision.ops import batched_nms, clip_boxes_to_image

        if not 0.0 <= score_threshold <= 1.0:
            raise UsageError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not 0.0 <= iou_threshold <= 1.0:
            raise UsageError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        if int(max_detections) < 1:
            raise UsageError(f"max_detections must be >= 1, got {max_detections}")
        boxes, probs = self.detect_raw(images, self._text_features(classes))
        scores, labels = probs.max(-1)
        # Default grid boxes and regressed boxes may cross the border: keep them inside the image.
        boxes = clip_boxes_to_image(boxes, tuple(images.shape[-2:]))
        results = []
        for b in range(boxes.shape[0]):
            keep = scores[b] >= score_threshold
            bx, sc, lb = boxes[b][keep], scores[b][keep], labels[b][keep]
            idx = batched_nms(bx, sc, lb, iou_threshold)[: int(max_detections)]
            results.append({"boxes": bx[idx], "scores": sc[idx], "labels": lb[idx]})
        return results

    def forward(
        self,
        images: torch.Tensor,
        text_features: torch.Tensor | None = None,
        texts: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        """One pass over the backbone for every output.

        Returns a dict with ``visual_features [B, D]``, ``text_features [C, D]``, ``logits [B, C]``
        (``exp(logit_scale) · cos``), ``visual_map [B, D, H5, W5]`` (last-level region embedding),
        ``fused_map`` (``visual_map`` fused with the text, same shape) and ``predictions``
        (:meth:`detect_raw` per-class scores ``[B, N, C]``). Without text features or texts the
        text-dependent entries are None.
        """
        if text_features is not None and texts is not None:
            raise UsageError("pass either text_features or texts, not both")
        feats = self.backbone(images)
        visual = self.projection(feats[-1])
        projected = self._projected(feats)
        spatial = [F.normalize(p, dim=1) for p in projected]
        text = None
        if texts is not None:
            text = self.encode_text(texts)
        elif text_features is not None:
            text = F.normalize(self._text_features(text_features), dim=-1)
        out: dict[str, torch.Tensor | list[torch.Tensor] | None] = {
            "visual_features": visual,
            "text_features": text,
            "logits": None,
            "visual_map": spatial[-1],
            "fused_map": None,
            "predictions": None,
        }
        if text is not None:
            out["logits"] = self.logit_scale.exp() * visual @ text.t()
            out["fused_map"] = self.fusion(spatial[-1], text)
            out["predictions"] = self._detect_from_feats(feats, projected, text)[1]
        return out

    # -- weights ------------------------------------------------------------------------------

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable student's state (everything except the frozen text tower), on CPU."""
        return {
            k: v.detach().cpu().clone()
            for k, v in self.state_dict().items()
            if not k.startswith(_TEXT_PREFIX)
        }

    def load_student_state_dict(self, state_dict: Mapping[str, Any], *, source: str = "state dict") -> None:
        """Load a :meth:`student_state_dict` with every key and shape checked (one error for all)."""
        # The backbone may have been fused (BatchNorm folded) or have another class count.
        prefix = "backbone.net."
        self.backbone.adapt_to_state_dict(
            {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        )
        if "region_norm_floor" not in state_dict:  # written before the floor existed: a plain cosine
            state_dict = {**state_dict, "region_norm_floor": torch.tensor(0.0)}
        student = _StudentView(self)
        check_state_dict(student, state_dict, source=source)


class _StudentView(nn.Module):
    """The model's sub-modules without the text tower, for strict state-dict checks."""

    def __init__(self, model: KDEOVModel) -> None:
        super().__init__()
        for name, child in model.named_children():
            if name != "text_encoder":
                self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):  # logit scales, region bias
            self.register_parameter(name, param)
        for name, buf in model.named_buffers(recurse=False):  # the region norm floor
            self.register_buffer(name, buf)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _check_plain(value: Any, where: str) -> None:
    """``extra`` must load with ``weights_only=True``: builtins, containers and tensors only."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise UsageError(f"checkpoint extra: key {k!r} at {where} must be a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise UsageError(f"checkpoint extra: {where} is a {type(value).__name__}; only builtins and tensors can be saved")


def save_kdeov_checkpoint(model: KDEOVModel, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"format", "config", "state_dict", "extra", "backbone_source_names"}`` atomically.

    The state dict excludes the frozen text tower. The file is written to a temporary file in
    the same folder and renamed into place, so an interrupted save leaves no partial file.
    """
    path = Path(path)
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "state_dict": model.student_state_dict(),
        "extra": extra,
        "backbone_source_names": model.backbone.source_names,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        torch.save(payload, fh)
    return path


def _read_kdeov_checkpoint(path: str | Path) -> dict[str, Any]:
    obj = load_checkpoint_file(path, trust=False, what="KDEOV checkpoint")
    if not isinstance(obj, Mapping) or "format" not in obj:
        raise CheckpointError(f"{path} is not a KDEOV checkpoint (no 'format' key; expected {CHECKPOINT_FORMAT})")
    if obj["format"] in _OLD_FORMATS:
        raise CheckpointError(
            f"{path} is a {obj['format']} checkpoint ({_OLD_FORMATS[obj['format']]}); this vlexport reads "
            f"{CHECKPOINT_FORMAT}: train it again with `vlexport train-kdeov`"
        )
    if obj["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {obj['format']!r}; expected {CHECKPOINT_FORMAT}")
    if not isinstance(obj.get("config"), Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise CheckpointError(f"{path} is missing its 'config' or 'state_dict'")
    try:
        config = KDEOVConfig.from_dict(obj["config"])
    except (UsageError, TypeError) as exc:
        raise CheckpointError(f"{path} has an invalid config: {exc}") from None
    return {**obj, "config": config}


def load_kdeov_checkpoint(path: str | Path) -> tuple[KDEOVConfig, dict[str, torch.Tensor]]:
    """Read a ``vlexport.kdeov/1`` checkpoint (``weights_only=True``): ``(config, state_dict)``.

    Raises:
        CheckpointError: missing, corrupt or not a KDEOV checkpoint.
    """
    obj = _read_kdeov_checkpoint(path)
    return obj["config"], dict(obj["state_dict"])


def kdeov_checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` record of a KDEOV checkpoint: vocabulary, text tower identity, training state."""
    extra = _read_kdeov_checkpoint(path).get("extra") or {}
    return dict(extra) if isinstance(extra, Mapping) else {}


def build_kdeov(
    config: KDEOVConfig | str | None = None,
    *,
    checkpoint: str | Path | KDEOVCheckpoint | None = None,
    backbone_weights: str | Path | None = None,
    trust_checkpoint: bool = False,
    text_encoder: FrozenCLIPTextEncoder | None = None,
) -> KDEOVModel:
    """Build a KDEOV model, optionally from a KDEOV checkpoint or on pretrained backbone weights.

    Args:
        config: a :class:`KDEOVConfig` or preset name; defaults to the checkpoint's config, else
            the ``yolov8n-vitb32`` preset. If both are given, their architecture fields must agree.
        checkpoint: a ``vlexport.kdeov/1`` file (the whole student), or its :class:`KDEOVCheckpoint` already read.
        backbone_weights: an Ultralytics (or ``{"state_dict", "names"}``) checkpoint for the
            backbone only; exclusive with ``checkpoint``, which already contains the backbone.
        trust_checkpoint: allow unpickling ``backbone_weights`` (Ultralytics ``.pt`` files).
        text_encoder: frozen CLIP text tower to attach.

    Returns:
        the model in eval mode.
    """
    if checkpoint is not None and backbone_weights is not None:
        raise UsageError(
            "pass either a KDEOV checkpoint or backbone weights: the KDEOV checkpoint already contains the backbone"
        )
    state = None
    names = None
    if checkpoint is not None:
        record = KDEOVCheckpoint.of(checkpoint)
        checkpoint = record.path
        ck_config, state, names = record.config, record.state_dict, record.backbone_source_names
        if config is None:
            config = ck_config
        else:
            config = _resolve_config(config)
            diff = [
                f"{f}={getattr(ck_config, f)!r} (config {getattr(config, f)!r})"
                for f in KDEOVConfig.architecture_fields
                if getattr(ck_config, f) != getattr(config, f)
            ]
            if diff:
                raise CheckpointError(f"KDEOV checkpoint {checkpoint} was trained with " + ", ".join(diff))
    config = _resolve_config(config if config is not None else DEFAULT_PRESET)
    backbone = LightweightVisualBackbone(
        config.backbone, checkpoint=backbone_weights, trust_checkpoint=trust_checkpoint
    )
    model = KDEOVModel(config, backbone=backbone, text_encoder=text_encoder)
    if state is not None:
        model.load_student_state_dict(state, source=f"KDEOV checkpoint {checkpoint}")
        if names is not None:
            model.backbone.source_names = [str(n) for n in names]
    return model.eval()
