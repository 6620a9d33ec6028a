"""Multi-scale input processing: one shared ResNet over several resized copies of the image.

The input image (the 1.0x scale) is resized inside the module to every scale, a single
torchvision ResNet turns each copy into a four-level pyramid (``layer1``..``layer4``, strides
4, 8, 16, 32), and per level the features of all scales are resized to the 1.0x level's size and
fused, by either

* :class:`AttentionScaleIntegration` (``"absi"``): learned scale-importance weights plus
  attention across the scale axis at every spatial position, or
* :class:`HierarchicalScaleIntegration` (``"hierarchical"``): coarse + medium, then + fine, each
  merge refined by channel and spatial attention.

:class:`MultiScaleSegmenter` puts a light FPN decoder and a one-channel head on the fused
pyramid (binary segmentation, e.g. camouflaged-object detection). Every resize has sizes fixed
by the input's, and no Python branch depends on tensor values, so the whole model (all scales
and the fusion) exports to ONE ONNX graph at a fixed input size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.common.backbones import check_state_dict, load_checkpoint_file

__all__ = [
    "RESNET_CHANNELS",
    "FUSION_MODES",
    "scaled_size",
    "ResNetPyramid",
    "AttentionScaleIntegration",
    "ChannelAttention",
    "SpatialAttention",
    "HierarchicalScaleIntegration",
    "MultiScaleInputProcessor",
    "FPNDecoder",
    "MultiScaleSegmenter",
    "MultiScaleConfig",
    "MULTISCALE_PRESETS",
    "build_multiscale",
]

# Output channels of layer1..layer4.
RESNET_CHANNELS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
}
FUSION_MODES = ("absi", "hierarchical")
_SIZE_MULTIPLE = 32  # the ResNet's total stride: every level then has an integer size


def scaled_size(size: int, scale: float) -> int:
    """``size · scale`` rounded to the nearest multiple of 32, and at least 32."""
    return max(_SIZE_MULTIPLE, int(round(size * scale / _SIZE_MULTIPLE)) * _SIZE_MULTIPLE)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``); a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------


class ResNetPyramid(nn.Module):
    """A torchvision ResNet without its classifier: image → ``[layer1, layer2, layer3, layer4]``.

    Args:
        name: ``"resnet18"`` or ``"resnet50"`` (built with ``weights=None``; nothing is downloaded).
        weights: optional local state-dict file (``torch.save`` of a torchvision ResNet's
            ``state_dict()``, read with ``weights_only=True``); ``fc.*`` keys are ignored, every
            other key and shape is checked.
    """

    def __init__(self, name: str = "resnet18", weights: str | Path | None = None) -> None:
        super().__init__()
        import torchvision

        if name not in RESNET_CHANNELS:
            raise UsageError(f"unknown backbone {name!r}; choose one of: {', '.join(RESNET_CHANNELS)}")
        net = getattr(torchvision.models, name)(weights=None)
        self.name = name
        self.out_channels = list(RESNET_CHANNELS[name])
        self.strides = [4, 8, 16, 32]
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if weights is not None:
            self.load_torchvision_state_dict(weights)

    def load_torchvision_state_dict(self, path: str | Path) -> None:
        """Load a torchvision ResNet state dict from ``path`` (keys renamed to this module's)."""
        obj = load_checkpoint_file(path, trust=False, what="ResNet weights")
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"ResNet weights {path} hold a {type(obj).__name__}, expected a state dict")
        stem = {"conv1.": "stem.0.", "bn1.": "stem.1."}
        state = {}
        for key, value in obj.items():
            if key.startswith("fc."):
                continue  # the classifier is not part of the pyramid
            for old, new in stem.items():
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            state[key] = value
        check_state_dict(self, state, source=f"ResNet weights {path}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return [c1, c2, c3, self.layer4(c3)]


# --------------------------------------------------------------------------------------------
# Fusion: attention-based scale integration (ABSI)
# --------------------------------------------------------------------------------------------


class AttentionScaleIntegration(nn.Module):
    """Fuse ``S`` same-sized feature maps ``[B, C, H, W]`` (one per scale) into one.

    1. Importance: the spatially pooled features of all scales, concatenated ``[B, S·C]``, go
       through a two-layer MLP to ``S`` logits; ``w = softmax`` over the scales.
    2. Per-scale projections ``Q_s, K_s, V_s`` (1x1 convolutions ``C → d``, ``d = C / reduction``).
    3. Cross-scale attention *along the scale axis at each spatial position*: at pixel ``p`` the
       ``S`` scale tokens form a tiny sequence; with ``h`` heads of size ``d_h = d / h``,
       ``A_h[s, t] = softmax_t(q_{s,h}(p) · k_{t,h}(p) / √d_h)`` and
       ``o_{s,h}(p) = Σ_t A_h[s, t] · v_{t,h}(p)``. This costs ``O(H·W·S²·d)``, affordable at
       every pyramid level, unlike full attention over all ``S·H·W`` tokens (``O((S·H·W)²)``);
       context across positions already comes from the convolutional backbone.
    4. Aggregation ``o = Σ_s w_s · o_s``, output projection (1x1 convolution ``d → C``) and a
       residual to the reference (1.0x) scale: ``y = x_ref + W_o o``.
    """

    def __init__(
        self, channels: int, num_scales: int, reference: int, *, reduction: int = 4, heads: int = 4
    ) -> None:
        super().__init__()
        if num_scales < 2:
            raise UsageError(f"scale fusion needs at least 2 scales, got {num_scales}")
        if not 0 <= reference < num_scales:
            raise UsageError(f"reference scale index {reference} out of range for {num_scales} scales")
        dim = max(16, channels // reduction)
        heads = math.gcd(heads, dim)
        self.channels, self.num_scales, self.reference = channels, num_scales, reference
        self.dim, self.heads = dim, heads
        hidden = max(16, channels // reduction)
        self.importance_mlp = nn.Sequential(
            nn.Linear(num_scales * channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_scales)
        )
        self.q = nn.ModuleList(nn.Conv2d(channels, dim, 1) for _ in range(num_scales))
        self.k = nn.ModuleList(nn.Conv2d(channels, dim, 1) for _ in range(num_scales))
        self.v = nn.ModuleList(nn.Conv2d(channels, dim, 1) for _ in range(num_scales))
        self.out = nn.Conv2d(dim, channels, 1)

    def _check(self, feats: Sequence[torch.Tensor]) -> None:
        if len(feats) != self.num_scales:
            raise UsageError(f"ABSI: expected {self.num_scales} feature maps, got {len(feats)}")
        shape = tuple(feats[0].shape)
        if len(shape) != 4 or shape[1] != self.channels or any(tuple(f.shape) != shape for f in feats):
            raise UsageError(
                f"ABSI: expected {self.num_scales} maps of shape [B, {self.channels}, H, W], "
                f"got {[tuple(f.shape) for f in feats]}"
            )

    def importance(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scale-importance weights ``[B, S]`` (softmax over the scales: each row sums to 1)."""
        self._check(feats)
        pooled = torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1)
        return self.importance_mlp(pooled).softmax(dim=-1)

    def attend(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Cross-scale attention outputs ``o_s`` before aggregation: ``[B, S, d, H, W]``."""
        self._check(feats)
        b, _, h, w = feats[0].shape
        heads, dh = self.heads, self.dim // self.heads

        def tokens(projs: nn.ModuleList) -> torch.Tensor:
            # [B, S, d, H, W] → [B, heads, H·W, S, d_h]: one length-S sequence per pixel and head.
            x = torch.stack([p(f) for p, f in zip(projs, feats)], dim=1)
            return x.reshape(b, self.num_scales, heads, dh, h * w).permute(0, 2, 4, 1, 3)

        q, k, v = tokens(self.q), tokens(self.k), tokens(self.v)
        attn = (q @ k.transpose(-1, -2) * dh**-0.5).softmax(dim=-1)  # [B, heads, HW, S, S]
        o = attn @ v  # [B, heads, HW, S, d_h]
        return o.permute(0, 3, 1, 4, 2).reshape(b, self.num_scales, self.dim, h, w)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        weights = self.importance(feats)  # [B, S]
        o = self.attend(feats)
        fused = (o * weights[:, :, None, None, None]).sum(dim=1)
        return feats[self.reference] + self.out(fused)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scales={self.num_scales}, dim={self.dim}, heads={self.heads}"


# --------------------------------------------------------------------------------------------
# Fusion: hierarchical scale integration
# --------------------------------------------------------------------------------------------


class ChannelAttention(nn.Module):
    """Squeeze-excitation: ``x · σ(W₂ ReLU(W₁ mean_{H,W}(x)))`` per channel."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(squeeze))))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: ``x · σ(conv_k([mean_C(x), max_C(x)]))`` per position."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(desc))


class _Merge(nn.Module):
    """``concat → 1x1 conv → BN → ReLU → channel attention → spatial attention``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.channel = ChannelAttention(channels)
        self.spatial = SpatialAttention()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(self.reduce(torch.cat([a, b], dim=1))))


class HierarchicalScaleIntegration(nn.Module):
    """Fuse the scales from coarse to fine, then add the reference (1.0x) scale back.

    With scales sorted ascending (``0.5, 1.0, 1.5``: coarse, medium, fine):
    ``m₁ = Merge(x_coarse, x_medium)``, ``m₂ = Merge(m₁, x_fine)``, ``y = x_ref + m₂``, where each
    ``Merge`` is concatenation, a 1x1 convolution, then :class:`ChannelAttention` and
    :class:`SpatialAttention`. More scales simply add merges in the same order.
    """

    def __init__(self, channels: int, num_scales: int, reference: int) -> None:
        super().__init__()
        if num_scales < 2:
            raise UsageError(f"scale fusion needs at least 2 scales, got {num_scales}")
        if not 0 <= reference < num_scales:
            raise UsageError(f"reference scale index {reference} out of range for {num_scales} scales")
        self.channels, self.num_scales, self.reference = channels, num_scales, reference
        self.merges = nn.ModuleList(_Merge(channels) for _ in range(num_scales - 1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``feats`` ordered from the coarsest scale to the finest, all ``[B, C, H, W]``."""
        if len(feats) != self.num_scales:
            raise UsageError(f"hierarchical fusion: expected {self.num_scales} feature maps, got {len(feats)}")
        merged = feats[0]
        for merge, finer in zip(self.merges, feats[1:]):
            merged = merge(merged, finer)
        return feats[self.reference] + merged

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scales={self.num_scales}"


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------


class MultiScaleInputProcessor(nn.Module):
    """Image ``[B, 3, H, W]`` → fused four-level pyramid at the 1.0x scale's level sizes.

    Every scale's input is ``scaled_size(H, s) x scaled_size(W, s)`` (bilinear,
    ``align_corners=False``), so the 1.0x input is itself rounded to a multiple of 32.

    Args:
        backbone: ``"resnet18"`` or ``"resnet50"``, shared by all scales.
        scales: distinct positive factors, one of which must be 1.0 (the reference); they are
            processed in ascending order.
        fusion: ``"absi"`` or ``"hierarchical"``.
        pretrained_backbone: optional local torchvision ResNet state-dict file.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        scales: Sequence[float] = (0.5, 1.0, 1.5),
        fusion: str = "absi",
        pretrained_backbone: str | Path | None = None,
    ) -> None:
        super().__init__()
        if fusion not in FUSION_MODES:
            raise UsageError(f"unknown fusion {fusion!r}; choose one of: {', '.join(FUSION_MODES)}")
        scales = tuple(float(s) for s in scales)
        if len(scales) < 2 or len(set(scales)) != len(scales) or any(not s > 0 for s in scales):
            raise UsageError(f"scales must be at least 2 distinct positive factors, got {scales}")
        if 1.0 not in scales:
            raise UsageError(f"scales must include 1.0 (the reference scale), got {scales}")
        self.scales = tuple(sorted(scales))
        self.reference = self.scales.index(1.0)
        self.fusion_mode = fusion
        self.backbone = ResNetPyramid(backbone, pretrained_backbone)
        self.out_channels = list(self.backbone.out_channels)
        self.strides = list(self.backbone.strides)
        block = AttentionScaleIntegration if fusion == "absi" else HierarchicalScaleIntegration
        self.fusions = nn.ModuleList(block(c, len(self.scales), self.reference) for c in self.out_channels)

    def scale_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The input size ``(h, w)`` of every scale, in ascending scale order."""
        return [(scaled_size(height, s), scaled_size(width, s)) for s in self.scales]

    def scale_pyramids(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """The unfused pyramid of every scale (ascending order), each at its own sizes."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        sizes = self.scale_sizes(int(images.shape[-2]), int(images.shape[-1]))
        return [self.backbone(_resize(images, size)) for size in sizes]

    def fuse(self, pyramids: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """Per level, resize every scale's map to the reference scale's and fuse them."""
        fused = []
        for level, fusion in enumerate(self.fusions):
            ref = pyramids[self.reference][level]
            size = (int(ref.shape[-2]), int(ref.shape[-1]))
            fused.append(fusion([_resize(p[level], size) for p in pyramids]))
        return fused

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Fused ``[B, C_l, H_l, W_l]`` for levels 1-4 (strides 4, 8, 16, 32 of the 1.0x input)."""
        return self.fuse(self.scale_pyramids(images))

    def extra_repr(self) -> str:
        return f"scales={self.scales}, fusion={self.fusion_mode!r}"


# --------------------------------------------------------------------------------------------
# Segmenter
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FPNDecoder(nn.Module):
    """Light FPN: 1x1 laterals, top-down upsample-and-add, a 3x3 refinement at the finest level."""

    def __init__(self, in_channels: Sequence[int], channels: int = 64) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.refine = _conv_bn_relu(channels, channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pyramid (finest first) → ``[B, channels, H_1, W_1]`` at the finest level's size."""
        x = self.laterals[-1](feats[-1])
        for lateral, f in zip(reversed(self.laterals[:-1]), reversed(feats[:-1])):
            x = lateral(f) + _resize(x, (int(f.shape[-2]), int(f.shape[-1])))
        return self.refine(x)


class MultiScaleSegmenter(nn.Module):
    """Binary segmenter: processor → FPN decoder → 1-channel head → logits at input resolution."""

    def __init__(self, processor: MultiScaleInputProcessor, decoder_channels: int = 64) -> None:
        super().__init__()
        if int(decoder_channels) < 1:
            raise UsageError(f"decoder_channels must be >= 1, got {decoder_channels}")
        self.processor = processor
        self.decoder = FPNDecoder(processor.out_channels, int(decoder_channels))
        self.head = nn.Conv2d(int(decoder_channels), 1, 1)

    def _logits(self, pyramid: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return _resize(self.head(self.decoder(pyramid)), size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` (RGB in [0, 1]) → logits ``[B, 1, H, W]``."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return self._logits(self.processor(images), size)

    def forward_with_scales(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Fused logits plus per-scale logits for deep supervision.

        Each scale's own (unfused) pyramid goes through the same decoder and head; its logits
        are at that scale's input size (e.g. 160, 320, 480 for a 320 input), ready for
        :class:`~vlexport.models.multiscale.loss.ScaleAwareLoss`.
        """
        size = (int(images.shape[-2]), int(images.shape[-1]))
        pyramids = self.processor.scale_pyramids(images)
        scale_sizes = self.processor.scale_sizes(*size)
        per_scale = [self._logits(p, s) for p, s in zip(pyramids, scale_sizes)]
        return self._logits(self.processor.fuse(pyramids), size), per_scale


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiScaleConfig:
    """Architecture of a :class:`MultiScaleSegmenter` (``image_size`` is the export size)."""

    backbone: str = "resnet18"
    scales: tuple[float, ...] = (0.5, 1.0, 1.5)
    fusion: str = "absi"
    decoder_channels: int = 64
    image_size: int = 320

    def __post_init__(self) -> None:
        if self.backbone not in RESNET_CHANNELS:
            raise UsageError(f"unknown backbone {self.backbone!r}; choose one of: {', '.join(RESNET_CHANNELS)}")
        if self.fusion not in FUSION_MODES:
            raise UsageError(f"unknown fusion {self.fusion!r}; choose one of: {', '.join(FUSION_MODES)}")
        if not isinstance(self.image_size, int) or self.image_size < 32 or self.image_size % 32:
            raise UsageError(f"image_size must be a multiple of 32 and at least 32, got {self.image_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MULTISCALE_PRESETS: dict[str, MultiScaleConfig] = {
    "tiny": MultiScaleConfig(backbone="resnet18", decoder_channels=32, image_size=320),
    "r50": MultiScaleConfig(backbone="resnet50", decoder_channels=128, image_size=352),
}


def build_multiscale(
    preset: str = "tiny", fusion: str = "absi", *, pretrained_backbone: str | Path | None = None, **overrides: Any
) -> MultiScaleSegmenter:
    """Build a preset's segmenter (eval mode); ``overrides`` replace :class:`MultiScaleConfig` fields.

    The chosen config is kept as ``model.config``.
    """
    if preset not in MULTISCALE_PRESETS:
        raise UsageError(f"unknown multiscale preset {preset!r}; choose one of: {', '.join(MULTISCALE_PRESETS)}")
    known = {f.name for f in dataclasses.fields(MultiScaleConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"unknown multiscale option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "scales" in overrides:
        overrides["scales"] = tuple(float(s) for s in overrides["scales"])
    config = dataclasses.replace(MULTISCALE_PRESETS[preset], fusion=fusion, **overrides)
    processor = MultiScaleInputProcessor(config.backbone, config.scales, config.fusion, pretrained_backbone)
    model = MultiScaleSegmenter(processor, config.decoder_channels)
    model.config = config
    return model.eval()
