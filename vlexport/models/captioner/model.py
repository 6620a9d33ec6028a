"""The captioner: a multi-scale CLIP encoder whose image tokens prefix a GPT-2 decoder.

``MultiScaleCLIPEncoder`` (deformable attention over a CLIP pyramid) turns an image into
``num_queries`` tokens of GPT-2's width; they are the first rows of GPT-2's input (ClipCap
style: prefix row ``j`` at position ``j``, the first caption token at position ``num_queries``).
On the same image tokens, region heads predict a box (cx, cy, w, h in [0, 1] of the network
input), an objectness logit and class logits; in training they are matched to box targets with
DETR's Hungarian matcher.

``forward(..., mode="train")`` returns the losses; ``mode="inference"`` the prefix, the region
predictions and the first-token logits; :meth:`CLIPCaptioner.generate` is the PyTorch greedy
decode with the KV cache that the exported runtime is compared with, token by token.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.captioner.gpt2 import GPT2_PRESETS, GPT2Config, GPT2LMHeadModel, empty_cache
from vlexport.models.common.layers import MLP

log = logging.getLogger("vlexport")

__all__ = ["CaptionerConfig", "CAPTIONER_PRESETS", "CLIPCaptioner", "CaptionDecoderStep", "CaptionEncoderGraph",
           "build_captioner", "save_captioner", "load_captioner"]


@dataclass(frozen=True)
class CaptionerConfig:
    """Sizes and sources of a captioner (the checkpoint stores it)."""

    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    clip_activation: str = "auto"  # "auto" (from the weights' provenance), "quickgelu" or "gelu"
    gpt2: str = "gpt2"  # a GPT2_PRESETS name
    gpt2_weights: str | None = None  # hub name ("gpt2") or path; None: random init
    num_queries: int = 10
    num_heads: int = 8
    num_points: int = 4
    encoder_layers: int = 1
    dropout: float = 0.1
    freeze_vision: bool = True
    num_region_classes: int = 80
    box_loss_weights: tuple[float, float, float, float] = (5.0, 2.0, 1.0, 1.0)  # l1, giou, objectness, class


CAPTIONER_PRESETS: dict[str, CaptionerConfig] = {
    "tiny": CaptionerConfig(clip_model="tiny", clip_pretrained=None, gpt2="tiny", num_queries=4, num_heads=4,
                            num_points=2, dropout=0.0),
    "vitb32-gpt2": CaptionerConfig(),
}


class CLIPCaptioner(nn.Module):
    """Image → prefix tokens → GPT-2, with box/objectness/class heads on the prefix tokens."""

    def __init__(self, config: CaptionerConfig, encoder: nn.Module, gpt2: GPT2LMHeadModel):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.gpt2 = gpt2
        d = gpt2.config.n_embd
        self.box_head = MLP(d, d, 4, 3)
        self.objectness_head = nn.Linear(d, 1)
        self.class_head = nn.Linear(d, config.num_region_classes)

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    @property
    def eos_token_id(self) -> int:
        return self.gpt2.config.eos_token_id

    def regions(self, prefix: torch.Tensor) -> dict[str, torch.Tensor]:
        """Region predictions on the image tokens: boxes (sigmoid cxcywh), objectness and class logits."""
        return {"boxes": self.box_head(prefix).sigmoid(), "objectness": self.objectness_head(prefix).squeeze(-1),
                "class_logits": self.class_head(prefix)}

    def forward(self, images: torch.Tensor, captions: torch.Tensor | None = None,
                caption_mask: torch.Tensor | None = None, targets: list[dict[str, torch.Tensor]] | None = None,
                mode: str = "inference") -> dict[str, torch.Tensor]:
        """``mode="train"``: losses from ``captions`` [B,T] (ending with the end token, ``caption_mask``
        1 on real tokens) and optional box ``targets`` ({"labels", "boxes" cxcywh}); returns ``loss``
        (the total) and its terms. ``mode="inference"``: ``prefix``, ``logits`` (of the first caption
        token), and the region predictions."""
        if mode not in ("train", "inference"):
            raise ValueError(f"mode must be 'train' or 'inference', got {mode!r}")
        prefix = self.encoder(images)
        out = {"prefix": prefix, **self.regions(prefix)}
        p = prefix.shape[1]
        if mode == "inference":
            hidden, _ = self.gpt2(prefix, torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device),
                                  empty_cache(self.gpt2.config, prefix.shape[0], prefix.dtype, prefix.device))
            out["logits"] = self.gpt2.logits(hidden[:, -1])
            return out
        if captions is None:
            raise ValueError("mode='train' needs captions")
        mask = torch.ones_like(captions) if caption_mask is None else caption_mask.to(captions.dtype)
        embeds = torch.cat([prefix, self.gpt2.embed_tokens(captions)], dim=1)
        full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
        hidden, _ = self.gpt2(embeds, full_mask, empty_cache(self.gpt2.config, embeds.shape[0], embeds.dtype,
                                                             embeds.device))
        # The last prefix row predicts the first caption token; caption row t predicts token t+1.
        logits = self.gpt2.logits(hidden[:, p - 1:-1])
        labels = captions.masked_fill(mask == 0, -100)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        out["lm_loss"] = lm
        total = lm
        if targets is not None:
            box_losses = self.region_losses(out, targets)
            out.update(box_losses)
            w = self.config.box_loss_weights
            total = total + w[0] * box_losses["loss_bbox"] + w[1] * box_losses["loss_giou"] \
                + w[2] * box_losses["loss_objectness"] + w[3] * box_losses["loss_class"]
        out["loss"] = total
        return out

    def region_losses(self, out: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Hungarian-matched L1 + GIoU on boxes, BCE on objectness (matched = 1), CE on matched classes."""
        from vlexport.models.common.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
        from vlexport.models.common.matcher import HungarianMatcher

        b, q, _ = out["boxes"].shape
        # The matcher scores classes by softmax probability; the objectness logit stands in for "no object".
        logits = torch.cat([out["class_logits"], -out["objectness"][..., None]], dim=-1)
        matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
        with torch.no_grad():
            indices = matcher({"pred_logits": logits, "pred_boxes": out["boxes"]}, targets)
        num_boxes = max(sum(len(t["boxes"]) for t in targets), 1)
        objectness_target = torch.zeros(b, q, device=out["boxes"].device)
        src_boxes, tgt_boxes, src_logits, tgt_labels = [], [], [], []
        for i, (qi, ti) in enumerate(indices):
            objectness_target[i, qi] = 1.0
            src_boxes.append(out["boxes"][i, qi])
            tgt_boxes.append(targets[i]["boxes"][ti].to(out["boxes"].dtype))
            src_logits.append(out["class_logits"][i, qi])
            tgt_labels.append(targets[i]["labels"][ti])
        src, tgt = torch.cat(src_boxes), torch.cat(tgt_boxes)
        zero = out["boxes"].sum() * 0
        if len(src):
            l1 = (src - tgt).abs().sum() / num_boxes
            giou = (1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))).sum() / num_boxes
            cls = F.cross_entropy(torch.cat(src_logits), torch.cat(tgt_labels).long())
        else:
            l1 = giou = cls = zero
        obj = F.binary_cross_entropy_with_logits(out["objectness"], objectness_target)
        return {"loss_bbox": l1, "loss_giou": giou, "loss_objectness": obj, "loss_class": cls}

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_length: int = 30, repetition_penalty: float = 1.0,
                 return_logits: bool = False) -> list[list[int]] | tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy decoding with the KV cache, one image at a time: token ids without the end token.

        With ``return_logits`` also the ``[steps, vocab]`` logits of every step (parity checks).
        """
        if max_length < 1:
            raise UsageError(f"max length must be at least 1, got {max_length}")
        self.eval()
        results, all_logits = [], []
        for i in range(images.shape[0]):
            prefix = self.encoder(images[i:i + 1])
            step = CaptionDecoderStep(self.gpt2)
            past = empty_cache(self.gpt2.config, 1, prefix.dtype, prefix.device)
            ids = torch.zeros(1, 0, dtype=torch.long, device=prefix.device)
            mask = torch.ones(1, prefix.shape[1], dtype=torch.long, device=prefix.device)
            tokens: list[int] = []
            step_logits = []
            feed_prefix = prefix
            for _ in range(max_length):
                logits, past = step(feed_prefix, ids, mask, past)
                step_logits.append(logits[0].clone())
                logits = apply_repetition_penalty(logits, tokens, repetition_penalty)
                token = int(logits[0].argmax())
                if token == self.eos_token_id:
                    break
                tokens.append(token)
                feed_prefix = prefix[:, :0]
                ids = torch.tensor([[token]], dtype=torch.long, device=prefix.device)
                mask = torch.ones(1, past.shape[-2] + 1, dtype=torch.long, device=prefix.device)
            results.append(tokens)
            all_logits.append(torch.stack(step_logits))
        return (results, all_logits) if return_logits else results


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty on already generated tokens: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not seen:
        return logits
    logits = logits.clone()
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    sel = logits[:, idx]
    logits[:, idx] = torch.where(sel > 0, sel / penalty, sel * penalty)
    return logits


class CaptionEncoderGraph(nn.Module):
    """Export wrapper of part ``encoder``: images → (prefix, boxes, objectness, class_logits)."""

    def __init__(self, captioner: CLIPCaptioner):
        super().__init__()
        self.captioner = captioner

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prefix = self.captioner.encoder(images)
        r = self.captioner.regions(prefix)
        return prefix, r["boxes"], r["objectness"], r["class_logits"]


class CaptionDecoderStep(nn.Module):
    """Export wrapper of part ``decoder``: one graph for the first step and every later one.

    ``(prefix_embeds [B,P',D], input_ids [B,T], attention_mask [B,S+P'+T], past [L,2,B,H,S,hd])``
    → ``(logits [B,V] of the last position, present [L,2,B,H,S+P'+T,hd])``. The first step feeds
    the image prefix (and any prompt ids) with an empty cache; later steps an empty prefix
    (``P' = 0``) and the last token.
    """

    def __init__(self, gpt2: GPT2LMHeadModel):
        super().__init__()
        self.gpt2 = gpt2

    def forward(self, prefix_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([prefix_embeds, self.gpt2.embed_tokens(input_ids).to(prefix_embeds.dtype)], dim=1)
        hidden, present = self.gpt2(x, attention_mask, past_key_values)
        return self.gpt2.logits(hidden[:, -1]), present


# ------------------------------------------------------------------------------------------------
# Building, saving, loading

def build_captioner(preset: str | CaptionerConfig = "tiny", *, gpt2_config: GPT2Config | None = None,
                    **overrides: Any) -> CLIPCaptioner:
    """A captioner from a preset name (``tiny``, ``vitb32-gpt2``) or a config, with field overrides.

    GPT-2 weights load by name when ``gpt2_weights`` is set (see ``GPT2LMHeadModel.from_pretrained``);
    ``gpt2_config`` builds a randomly initialised GPT-2 of that exact shape instead of the preset's.
    The CLIP tower follows ``clip_pretrained`` (random with a loud warning when unreachable).
    """
    from vlexport.models.captioner.encoder import MultiScaleCLIPEncoder

    if isinstance(preset, str):
        if preset not in CAPTIONER_PRESETS:
            raise UsageError(f"unknown captioner preset {preset!r}; choose one of {', '.join(CAPTIONER_PRESETS)}")
        config = CAPTIONER_PRESETS[preset]
    else:
        config = preset
    config = dataclasses.replace(config, **overrides) if overrides else config
    if config.gpt2 not in GPT2_PRESETS:
        raise UsageError(f"unknown GPT-2 size {config.gpt2!r}; choose one of {', '.join(GPT2_PRESETS)}")
    if gpt2_config is not None:
        gpt2 = GPT2LMHeadModel(gpt2_config)
    elif config.gpt2_weights:
        gpt2 = GPT2LMHeadModel.from_pretrained(config.gpt2_weights)
    else:
        gpt2 = GPT2LMHeadModel(GPT2_PRESETS[config.gpt2])
    encoder = MultiScaleCLIPEncoder(
        gpt2.config.n_embd, config.clip_model, config.freeze_vision, config.num_heads, config.num_points,
        config.dropout, pretrained=config.clip_pretrained, num_queries=config.num_queries,
        num_layers=config.encoder_layers, allow_random=True, activation=config.clip_activation)
    return CLIPCaptioner(config, encoder, gpt2)


def _frozen_keys(model: CLIPCaptioner) -> set[str]:
    """State-dict keys of frozen parameters: they come from the CLIP weights, not the checkpoint."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k for k in model.state_dict() if k in frozen}


def save_captioner(model: CLIPCaptioner, path: str | Path) -> Path:
    """Write the trained tensors (not the frozen CLIP tower) and the config; ``torch.load(weights_only=True)`` reads it."""
    from vlexport.atomic import atomic_write

    path = Path(path)
    frozen = _frozen_keys(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}
    config = dataclasses.asdict(model.config)
    payload = {"format": "vlexport.captioner/1", "config": config, "state_dict": state,
               "gpt2_config": dataclasses.asdict(model.gpt2.config),
               "clip_weights_sha256": model.encoder.clip_info.get("weights_sha256")}
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)
    return path


def load_captioner(path: str | Path) -> CLIPCaptioner:
    """Rebuild a captioner saved by :func:`save_captioner` (every trained key and shape checked)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"captioner checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read captioner checkpoint {path}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != "vlexport.captioner/1":
        raise CheckpointError(f"{path} is not a vlexport captioner checkpoint (from `vlexport train-captioner`)")
    cfg = payload["config"]
    cfg["box_loss_weights"] = tuple(cfg["box_loss_weights"])
    config = CaptionerConfig(**{**cfg, "gpt2_weights": None})
    model = build_captioner(config, gpt2_config=GPT2Config(**payload["gpt2_config"]))
    expected = {k for k in model.state_dict() if k not in _frozen_keys(model)}
    state = payload["state_dict"]
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the captioner: missing {missing[:5]}, unexpected {unexpected[:5]}")
    sha = payload.get("clip_weights_sha256")
    if sha and sha != model.encoder.clip_info.get("weights_sha256"):
        log.warning("the CLIP tower loaded now (sha256 %s…) is not the one %s was trained with (%s…): captions "
                    "will differ", str(model.encoder.clip_info.get("weights_sha256"))[:12], path.name, sha[:12])
    model.load_state_dict(state, strict=False)
    return model.eval()
