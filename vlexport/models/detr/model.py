"""DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020) and its
panoptic segmentation head, re-implemented so the official checkpoints load by name.

Facts matched (``shared/references/detr.md``): a torchvision ResNet with frozen batch norm,
a 1x1 input projection, a sine position encoding normalised to 2π, an encoder-decoder
transformer (post-norm by default, pre-norm optional) that re-adds positions to queries and keys
at every layer, 100 learned object queries, a linear class head with a "no object" logit and a
3-layer box MLP with a sigmoid (normalised cxcywh). :class:`DETRsegm` wraps a detector as
``self.detr`` (so its keys carry the ``detr.`` prefix) and adds a multi-head attention map over
the encoder memory plus a small FPN-style convolutional mask head.

Internally the transformer (:mod:`vlexport.models.detr.transformer`) is batch-first; the parameters have nn.MultiheadAttention's names
(``in_proj_weight`` packed q/k/v, ``out_proj``). With ``mask=None`` (no padding) no attention mask
is built at all and the position encoding follows the feature map's shape, so the model traces to
ONNX with dynamic height and width and without ``-inf`` constants.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.common.backbones import check_state_dict, load_checkpoint_file
from vlexport.models.common.box_ops import box_cxcywh_to_xyxy
from vlexport.models.common.layers import MLP
from vlexport.models.detr.transformer import Transformer
from vlexport.runtime.detr_preprocess import IMAGENET_MEAN, IMAGENET_STD, detr_resize_size

__all__ = [
    "DETR",
    "DETR_PRESETS",
    "DETRConfig",
    "DETRsegm",
    "FrozenBatchNorm2d",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MHAttentionMap",
    "MaskHeadSmallConv",
    "PositionEmbeddingSine",
    "build_detr",
    "detr_postprocess",
    "detr_resize_size",
]

_BASIC_RESNETS = ("resnet18", "resnet34")
_BOTTLENECK_RESNETS = ("resnet50", "resnet101", "resnet152")
# Residual blocks per stage -> torchvision name, for reading the depth off a state dict.
_BLOCKS_TO_RESNET = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DETRConfig:
    """Architecture of a DETR model (defaults: the official R50 detector).

    ``num_classes`` excludes no-object (91 for COCO detection: raw category ids 0..90);
    ``dilation`` makes layer4 dilated (the DC5 models, stride 16); ``masks`` adds the
    segmentation head (:class:`DETRsegm`); ``aux_loss`` returns every decoder layer's
    predictions in training.
    """

    backbone: str = "resnet50"
    dilation: bool = False
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    num_classes: int = 91
    pre_norm: bool = False
    aux_loss: bool = True
    masks: bool = False

    @property
    def backbone_channels(self) -> tuple[int, int, int, int]:
        """Output channels of layer1..layer4."""
        if self.backbone in _BASIC_RESNETS:
            return (64, 128, 256, 512)
        return (256, 512, 1024, 2048)


DETR_PRESETS: dict[str, DETRConfig] = {
    # Test-sized: a few MB, trains on a CPU.
    "tiny": DETRConfig(
        backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2,
        dim_feedforward=128, num_queries=10,
    ),
    "tiny-segm": DETRConfig(
        backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2,
        dim_feedforward=128, num_queries=10, masks=True,
    ),
    # The released COCO models (detr-r50-e632da11.pth, ...).
    "r50": DETRConfig(),
    "r50-dc5": DETRConfig(dilation=True),
    "r101": DETRConfig(backbone="resnet101"),
    "r101-dc5": DETRConfig(backbone="resnet101", dilation=True),
    # Panoptic models: 250 "classes" (things and stuff ids), mask head.
    "r50-panoptic": DETRConfig(num_classes=250, masks=True),
    "r50-dc5-panoptic": DETRConfig(num_classes=250, masks=True, dilation=True),
    "r101-panoptic": DETRConfig(backbone="resnet101", num_classes=250, masks=True),
}


def _validate(config: DETRConfig) -> None:
    if config.backbone not in _BASIC_RESNETS + _BOTTLENECK_RESNETS:
        raise UsageError(
            f"unknown DETR backbone {config.backbone!r}; "
            f"choose one of {', '.join(_BASIC_RESNETS + _BOTTLENECK_RESNETS)}"
        )
    if config.dilation and config.backbone in _BASIC_RESNETS:
        raise UsageError(f"DETR: dilation (DC5) needs a bottleneck ResNet (50/101/152), not {config.backbone}")
    for name in ("hidden_dim", "nheads", "dim_feedforward", "num_queries", "num_classes"):
        if getattr(config, name) < 1:
            raise UsageError(f"DETR: {name} must be positive, got {getattr(config, name)}")
    if config.enc_layers < 0 or config.dec_layers < 1:
        raise UsageError(f"DETR: need enc_layers >= 0 and dec_layers >= 1, got {config.enc_layers}/{config.dec_layers}")
    if config.hidden_dim % config.nheads:
        raise UsageError(f"DETR: hidden_dim {config.hidden_dim} is not divisible by nheads {config.nheads}")
    if config.hidden_dim % 4:
        # Half the channels encode y, half x, each as interleaved sin/cos pairs.
        raise UsageError(f"DETR: hidden_dim must be a multiple of 4, got {config.hidden_dim}")
    if not 0.0 <= config.dropout < 1.0:
        raise UsageError(f"DETR: dropout must be in [0, 1), got {config.dropout}")


# --------------------------------------------------------------------------------------------
# Backbone and position encoding
# --------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all stored as buffers.

    ``y = x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))``; nothing is updated in
    training. There is no ``num_batches_tracked``: one in an incoming state dict is dropped.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Backbone(nn.Module):
    """A torchvision ResNet (frozen BN) returning layer4, or layer1..layer4 for the mask head.

    As in DETR's training, the stem and layer1 are frozen (``requires_grad=False``).
    """

    def __init__(self, name: str, dilation: bool = False, return_interm_layers: bool = False) -> None:
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d
        )
        for pname, param in resnet.named_parameters():
            if not pname.startswith(("layer2", "layer3", "layer4")):
                param.requires_grad_(False)
        layers = ("layer1", "layer2", "layer3", "layer4") if return_interm_layers else ("layer4",)
        self.body = IntermediateLayerGetter(resnet, return_layers={n: str(i) for i, n in enumerate(layers)})
        self.num_channels = 512 if name in _BASIC_RESNETS else 2048

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(images).values())


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine position encoding: ``[B, 2 * num_pos_feats, h, w]``, y channels first.

    Positions are the cumulative counts of valid (non-padding) cells, normalised by the last
    row/column (+1e-6) and scaled to ``2π``; channel ``k`` uses frequency
    ``temperature ** (2 * (k // 2) / num_pos_feats)``, sine for even ``k`` and cosine for odd.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, feature: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``feature`` ``[B, C, h, w]`` (only its shape, device and dtype are used); ``mask`` True on padding."""
        if mask is None:
            # Built from the feature's shape so a traced graph keeps h and w dynamic.
            not_mask = torch.ones_like(feature[:, 0], dtype=torch.float32)
        else:
            not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=feature.device)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(feature.dtype)


class Joiner(nn.Sequential):
    """``backbone.0`` = the ResNet, ``backbone.1`` = the position encoding (DETR's key layout)."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """Features (layer4 last), the padding mask at layer4's resolution (or None), layer4's positions."""
        features = self[0](images)
        last = features[-1]
        feat_mask = None
        if mask is not None:
            # Nearest-neighbour resize of the pixel mask to the feature grid, as in DETR.
            feat_mask = F.interpolate(mask[None].float(), size=last.shape[-2:]).to(torch.bool)[0]
        return features, feat_mask, self[1](last, feat_mask)


# --------------------------------------------------------------------------------------------
# Detector and segmentation head
# --------------------------------------------------------------------------------------------


class DETR(nn.Module):
    """The DETR detector.

    ``forward(images [B,3,H,W], mask [B,H,W] | None)`` returns ``pred_logits`` ``[B, Q, C+1]``
    (last = no object), ``pred_boxes`` ``[B, Q, 4]`` (cxcywh normalised by the unpadded image size)
    and, in training with ``aux_loss``, ``aux_outputs`` (one dict per earlier decoder layer).
    ``mask`` is True on padding; None means no padding.
    """

    def __init__(self, config: DETRConfig) -> None:
        super().__init__()
        _validate(config)
        self.config = config
        c = config
        # Registration order = the official state-dict order.
        self.transformer = Transformer(c.hidden_dim, c.nheads, c.enc_layers, c.dec_layers,
                                       c.dim_feedforward, c.dropout, c.pre_norm)
        self.class_embed = nn.Linear(c.hidden_dim, c.num_classes + 1)
        self.bbox_embed = MLP(c.hidden_dim, c.hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(c.num_queries, c.hidden_dim)
        backbone = Backbone(c.backbone, c.dilation, return_interm_layers=c.masks)
        self.input_proj = nn.Conv2d(backbone.num_channels, c.hidden_dim, kernel_size=1)
        self.backbone = Joiner(backbone, PositionEmbeddingSine(c.hidden_dim // 2, normalize=True))
        self.num_queries = c.num_queries
        self.aux_loss = c.aux_loss

    def predict(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and sigmoid cxcywh boxes for decoder outputs ``[..., d]``."""
        return self.class_embed(hs), self.bbox_embed(hs).sigmoid()

    def outputs(self, hs: Sequence[torch.Tensor], return_aux: bool) -> dict[str, Any]:
        logits, boxes = self.predict(hs[-1])
        out: dict[str, Any] = {"pred_logits": logits, "pred_boxes": boxes}
        if return_aux:
            out["aux_outputs"] = [dict(zip(("pred_logits", "pred_boxes"), self.predict(h))) for h in hs[:-1]]
        return out

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None):
        """Backbone + transformer: (features, feature mask, projected layer4, decoder outputs, memory)."""
        features, feat_mask, pos = self.backbone(images, mask)
        src = self.input_proj(features[-1])
        hs, memory = self.transformer(src, feat_mask, self.query_embed.weight, pos)
        return features, feat_mask, src, hs, memory

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_aux: bool | None = None) -> dict[str, Any]:
        """See the class docstring; ``return_aux`` defaults to ``aux_loss and self.training``."""
        _, _, _, hs, _ = self.encode(images, mask)
        return self.outputs(hs, self.aux_loss and self.training if return_aux is None else return_aux)


class MHAttentionMap(nn.Module):
    """Attention weights of each query over the memory, one softmax over all heads and positions.

    Returns ``[B, Q, heads, h, w]``; keys come from ``k_linear`` applied as a 1x1 convolution.
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        for lin in (self.q_linear, self.k_linear):
            nn.init.zeros_(lin.bias)
            nn.init.xavier_uniform_(lin.weight)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        heads = (self.num_heads, self.hidden_dim // self.num_heads)
        q = self.q_linear(q).unflatten(-1, heads)  # [B, Q, n, c]
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        k = k.unflatten(1, heads)  # [B, n, c, h, w]
        weights = torch.einsum("bqnc,bnchw->bqnhw", q * self.normalize_fact, k)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], torch.finfo(weights.dtype).min)
        weights = weights.flatten(2).softmax(-1).view_as(weights)
        return self.dropout(weights)


def _group_norm(channels: int) -> nn.GroupNorm:
    # DETR uses 8 groups; gcd keeps tiny test heads (channels not divisible by 8) valid.
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _per_query(x: torch.Tensor, num_queries: int) -> torch.Tensor:
    """``[B, ...]`` -> ``[B * Q, ...]``, each image's tensor repeated for its queries."""
    return x.unsqueeze(1).expand(-1, num_queries, *([-1] * (x.dim() - 1))).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
    """DETR's mask head: 3x3 convs + GroupNorm + ReLU, upsampled through three FPN levels to stride 4."""

    def __init__(self, dim: int, fpn_dims: Sequence[int], context_dim: int) -> None:
        super().__init__()
        inter = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = _group_norm(dim)
        self.lay2 = nn.Conv2d(dim, inter[1], 3, padding=1)
        self.gn2 = _group_norm(inter[1])
        self.lay3 = nn.Conv2d(inter[1], inter[2], 3, padding=1)
        self.gn3 = _group_norm(inter[2])
        self.lay4 = nn.Conv2d(inter[2], inter[3], 3, padding=1)
        self.gn4 = _group_norm(inter[3])
        self.lay5 = nn.Conv2d(inter[3], inter[4], 3, padding=1)
        self.gn5 = _group_norm(inter[4])
        self.out_lay = nn.Conv2d(inter[4], 1, 3, padding=1)
        self.dim = dim
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, bbox_mask: torch.Tensor, fpns: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x`` ``[B, d, h, w]``, ``bbox_mask`` ``[B, Q, heads, h, w]``, ``fpns`` = layer3, layer2, layer1 maps.

        Returns ``[B * Q, 1, H/4, W/4]`` mask logits.
        """
        num_queries = bbox_mask.shape[1]
        x = torch.cat([_per_query(x, num_queries), bbox_mask.flatten(0, 1)], dim=1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        for adapter, lay, gn, fpn in ((self.adapter1, self.lay3, self.gn3, fpns[0]),
                                      (self.adapter2, self.lay4, self.gn4, fpns[1]),
                                      (self.adapter3, self.lay5, self.gn5, fpns[2])):
            lateral = _per_query(adapter(fpn), num_queries)
            x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = F.relu(gn(lay(x)))
        return self.out_lay(x)


class DETRsegm(nn.Module):
    """DETR with the mask head: adds ``pred_masks`` ``[B, Q, H/4, W/4]`` (logits) to the outputs."""

    def __init__(self, detr: DETR) -> None:
        super().__init__()
        if not detr.config.masks:
            raise UsageError("DETRsegm needs a DETR built with masks=True (it uses layer1..layer3 features)")
        self.detr = detr
        hidden, nheads = detr.config.hidden_dim, detr.config.nheads
        self.bbox_attention = MHAttentionMap(hidden, hidden, nheads, dropout=0.0)
        fpn_dims = list(reversed(detr.config.backbone_channels[:3]))  # layer3, layer2, layer1
        self.mask_head = MaskHeadSmallConv(hidden + nheads, fpn_dims, hidden)

    @property
    def config(self) -> DETRConfig:
        return self.detr.config

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_aux: bool | None = None) -> dict[str, Any]:
        features, feat_mask, src, hs, memory = self.detr.encode(images, mask)
        aux = self.detr.aux_loss and self.training if return_aux is None else return_aux
        out = self.detr.outputs(hs, aux)
        bbox_mask = self.bbox_attention(hs[-1], memory, mask=feat_mask)
        masks = self.mask_head(src, bbox_mask, [features[2], features[1], features[0]])
        out["pred_masks"] = masks.squeeze(1).unflatten(0, (-1, self.detr.num_queries))
        return out


# --------------------------------------------------------------------------------------------
# Building, post-processing, checkpoints
# --------------------------------------------------------------------------------------------

DETRModel = Union[DETR, DETRsegm]


def build_detr(preset_or_config: str | DETRConfig = "tiny", *, backbone_weights: str | Path | None = None,
               **overrides: Any) -> DETRModel:
    """Build a randomly initialised DETR (or :class:`DETRsegm` when ``masks``).

    Args:
        preset_or_config: a :data:`DETR_PRESETS` name or a :class:`DETRConfig`.
        backbone_weights: optional torchvision ResNet state dict (e.g. ``resnet50-0676ba61.pth``)
            loaded into the backbone after checking every key and shape (``fc.*`` is ignored).
        **overrides: :class:`DETRConfig` fields to replace.
    """
    if isinstance(preset_or_config, DETRConfig):
        config = preset_or_config
    else:
        try:
            config = DETR_PRESETS[preset_or_config]
        except KeyError:
            raise UsageError(
                f"unknown DETR preset {preset_or_config!r}; choose one of {', '.join(DETR_PRESETS)}"
            ) from None
    fields = {f.name for f in dataclasses.fields(DETRConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageError(f"unknown DETR option(s) {unknown}; known: {sorted(fields)}")
    config = dataclasses.replace(config, **overrides)
    detr = DETR(config)
    if backbone_weights is not None:
        _load_backbone_weights(detr, Path(backbone_weights))
    return DETRsegm(detr) if config.masks else detr


def _load_backbone_weights(detr: DETR, path: Path) -> None:
    state = load_checkpoint_file(path, what="ResNet weights")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"ResNet weights {path} do not hold a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    check_state_dict(detr.backbone[0].body, state, source=f"ResNet weights {path}", prefix="backbone.0.body.")


def detr_postprocess(pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                     target_sizes: torch.Tensor | Sequence[tuple[int, int]],
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DETR's ``PostProcess``: every query's best real class and its box in pixels.

    Args:
        pred_logits: ``[B, Q, C+1]``; pred_boxes: ``[B, Q, 4]`` normalised cxcywh.
        target_sizes: ``[B, 2]`` as ``(height, width)`` (the original image sizes for COCO evaluation).

    Returns:
        ``scores [B, Q]`` (softmax over all classes, no-object then excluded), ``labels [B, Q]``,
        ``boxes [B, Q, 4]`` xyxy in pixels (not clipped, no threshold).
    """
    sizes = torch.as_tensor(target_sizes, dtype=pred_boxes.dtype, device=pred_boxes.device).reshape(-1, 2)
    if sizes.shape[0] != pred_logits.shape[0]:
        raise UsageError(f"detr_postprocess: {sizes.shape[0]} target sizes for a batch of {pred_logits.shape[0]}")
    prob = pred_logits.softmax(-1)
    scores, labels = prob[..., :-1].max(-1)
    height, width = sizes.unbind(1)
    scale = torch.stack((width, height, width, height), dim=1)[:, None, :]
    return scores, labels, box_cxcywh_to_xyxy(pred_boxes) * scale
