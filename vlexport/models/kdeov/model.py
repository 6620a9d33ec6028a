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

This module holds the model and :func:`build_kdeov`; the configuration is in
:mod:`~vlexport.models.kdeov.config`, the projection/fusion blocks in
:mod:`~vlexport.models.kdeov.heads` and the checkpoint format in
:mod:`~vlexport.models.kdeov.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.common.backbones import LightweightVisualBackbone, check_state_dict
from vlexport.models.kdeov.checkpoint import KDEOVCheckpoint
from vlexport.models.kdeov.config import DEFAULT_PRESET, KDEOVConfig, _resolve_config
from vlexport.models.kdeov.heads import CrossModalFusionModule, ProjectionNetwork, SpatialProjection, soft_normalize

if TYPE_CHECKING:  # the CLIP towers are only needed when text is encoded
    from vlexport.models.clip.towers import FrozenCLIPTextEncoder

__all__ = ["REGION_BIAS_INIT", "KDEOVModel", "build_kdeov"]

REGION_BIAS_INIT = -math.log(99.0)
_TEXT_PREFIX = "text_encoder."


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
        checkpoint: a ``vlexport.kdeov/2`` file (the whole student), or its :class:`KDEOVCheckpoint` already read.
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
