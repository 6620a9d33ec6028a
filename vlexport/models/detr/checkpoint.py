"""Loading DETR checkpoints in the official layout by name (``torch.load(f)["model"]``).

The configuration is read from the weights (classes, queries, backbone depth and width, masks,
pre-norm) and, where the weights cannot tell (heads, dilation), from the checkpoint's ``args``;
every key and shape is checked before anything is loaded (see ``shared/references/detr.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlexport.errors import CheckpointError, UsageError
from vlexport.models.common.backbones import check_state_dict, load_checkpoint_file
from vlexport.models.detr.model import _BLOCKS_TO_RESNET, DETRConfig, DETRModel, build_detr

__all__ = ["DETRCheckpointReport", "detr_config_from_state_dict", "load_detr_checkpoint", "detr_state_dict_summary"]

@dataclasses.dataclass(frozen=True)
class DETRCheckpointReport:
    """What :func:`load_detr_checkpoint` read and decided."""

    source: str
    entries: int  # tensors loaded
    parameters: int  # their total number of elements
    dropped: tuple[str, ...]  # keys removed before loading (num_batches_tracked)
    from_args: tuple[str, ...]  # config fields read from the checkpoint's ``args``
    assumed: tuple[str, ...]  # config fields recorded nowhere in the file (defaults used)
    warnings: tuple[str, ...]  # ``args`` that disagree with the weights (the weights win)
    args: Mapping[str, Any]

    def summary(self) -> str:
        lines = [f"{self.source}: {self.entries} tensors, {self.parameters:,} values"]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} num_batches_tracked entries")
        if self.assumed:
            lines.append("assumed defaults for " + ", ".join(self.assumed))
        lines.extend(self.warnings)
        return "; ".join(lines)


def _layer_count(keys: Sequence[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def detr_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None = None, *, source: str = "checkpoint"
) -> tuple[DETRConfig, tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Infer a :class:`DETRConfig` from an official-format state dict (plus its ``args`` if any).

    Shapes give num_classes, queries, hidden size, FFN size, layer counts, pre-norm (a final
    encoder LayerNorm), masks (the ``detr.`` prefix) and the ResNet (blocks per stage + 512 vs
    2048 input channels). Attention heads, dilation, dropout and aux_loss leave no trace in the
    weights: they come from ``args`` when present, else the official defaults (reported).

    Returns:
        ``(config, from_args, assumed, warnings)``.

    Raises:
        CheckpointError: a key needed to infer the architecture is missing or oddly shaped.
    """
    args = dict(args or {})
    masks = any(k.startswith("detr.") for k in state_dict)
    prefix = "detr." if masks else ""
    keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]

    def shape(key: str) -> tuple[int, ...]:
        value = state_dict.get(prefix + key)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: missing {prefix}{key}; is this a DETR checkpoint?")
        return tuple(value.shape)

    num_classes = shape("class_embed.weight")[0] - 1
    num_queries, hidden_dim = shape("query_embed.weight")
    in_channels = shape("input_proj.weight")[1]
    dim_feedforward = shape("transformer.decoder.layers.0.linear1.weight")[0]
    blocks = tuple(_layer_count(keys, f"backbone.0.body.layer{i}.") for i in range(1, 5))
    bottleneck = in_channels == 2048
    if in_channels not in (512, 2048) or (bottleneck, blocks) not in _BLOCKS_TO_RESNET:
        raise CheckpointError(
            f"{source}: unsupported backbone ({blocks} blocks per stage, {in_channels} channels into input_proj)"
        )
    if args.get("position_embedding", "sine") != "sine":
        raise CheckpointError(
            f"{source}: position embedding {args['position_embedding']!r} is not supported (only 'sine')"
        )
    inferred = dict(
        backbone=_BLOCKS_TO_RESNET[(bottleneck, blocks)],
        hidden_dim=hidden_dim,
        enc_layers=_layer_count(keys, "transformer.encoder.layers."),
        dec_layers=_layer_count(keys, "transformer.decoder.layers."),
        dim_feedforward=dim_feedforward,
        num_queries=num_queries,
        num_classes=num_classes,
        pre_norm=f"{prefix}transformer.encoder.norm.weight" in state_dict,
        masks=masks,
    )
    warnings = tuple(
        f"args.{name}={args[name]!r} disagrees with the weights ({value!r})"
        for name, value in inferred.items()
        if name in args and args[name] != value
    )
    defaults = DETRConfig()
    hidden = {}
    from_args, assumed = [], []
    for name in ("nheads", "dilation", "dropout", "aux_loss"):
        if name in args and args[name] is not None:
            hidden[name] = type(getattr(defaults, name))(args[name])
            from_args.append(name)
        else:
            hidden[name] = getattr(defaults, name)
            assumed.append(name)
    return DETRConfig(**inferred, **hidden), tuple(from_args), tuple(assumed), warnings


def load_detr_checkpoint(
    path: str | Path, *, trust: bool = False, **overrides: Any
) -> tuple[DETRModel, DETRConfig, DETRCheckpointReport]:
    """Load an official DETR checkpoint (``{"model": state_dict, "args": Namespace, ...}``) or a bare state dict.

    The file is read with ``weights_only=True`` (``argparse.Namespace`` allowed, nothing else);
    ``trust=True`` allows a full unpickle for files that need it. The architecture is inferred
    from the weights (:func:`detr_config_from_state_dict`); ``overrides`` set
    :class:`DETRConfig` fields explicitly (e.g. ``dilation=True`` for a DC5 file without args).
    Every key and shape is checked. Returns the model in eval mode, its config and a report.

    Raises:
        CheckpointError: unreadable/untrusted file, no state dict, or any missing, unexpected or
            mis-shaped key (all listed together).
    """
    path = Path(path)
    source = f"DETR checkpoint {path}"
    with torch.serialization.safe_globals([argparse.Namespace]):
        content = load_checkpoint_file(path, trust=trust, what="DETR checkpoint")
    args: Mapping[str, Any] = {}
    if isinstance(content, Mapping) and isinstance(content.get("model"), Mapping):
        state = content["model"]
        raw_args = content.get("args")
        if isinstance(raw_args, argparse.Namespace):
            args = vars(raw_args)
        elif isinstance(raw_args, Mapping):
            args = dict(raw_args)
    elif isinstance(content, Mapping) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        state = content
    else:
        keys = sorted(map(str, content)) if isinstance(content, Mapping) else type(content).__name__
        raise CheckpointError(f"{source} has no 'model' state dict (found {keys})")
    dropped = tuple(k for k in state if k.endswith("num_batches_tracked"))
    state = {k: v for k, v in state.items() if k not in dropped}
    config, from_args, assumed, warnings = detr_config_from_state_dict(state, args, source=source)
    fields = {f.name for f in dataclasses.fields(DETRConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageError(f"unknown DETR option(s) {unknown}; known: {sorted(fields)}")
    if overrides:
        config = dataclasses.replace(config, **overrides)
        assumed = tuple(a for a in assumed if a not in overrides)
    model = build_detr(config)
    check_state_dict(model, state, source=source)
    model.eval()
    report = DETRCheckpointReport(
        source=str(path),
        entries=len(state),
        parameters=sum(int(v.numel()) for v in state.values()),
        dropped=dropped,
        from_args=from_args,
        assumed=assumed,
        warnings=warnings,
        args=dict(args),
    )
    return model, config, report


def detr_state_dict_summary(model: nn.Module) -> dict[str, int]:
    """Counts for comparing with a checkpoint: state-dict entries, their values, parameters, buffers."""
    state = model.state_dict()
    return {
        "entries": len(state),
        "values": sum(int(v.numel()) for v in state.values()),
        "parameters": sum(int(p.numel()) for p in model.parameters()),
        "buffers": sum(int(b.numel()) for _, b in model.named_buffers()),
    }
