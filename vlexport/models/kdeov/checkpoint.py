"""KDEOV checkpoints (``vlexport.kdeov/2``): save, read (once per export: :class:`KDEOVCheckpoint`) and the ``extra`` record.

Checkpoints are plain ``torch.save`` dicts of tensors and builtins, so they load with
``weights_only=True``; the frozen text tower is never stored in them, but its identity (model,
weights sha256, activation) and the vocabulary the student was trained on are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlexport.atomic import atomic_write
from vlexport.errors import CheckpointError, UsageError
from vlexport.models.common.backbones import load_checkpoint_file
from vlexport.models.kdeov.config import KDEOVConfig

if TYPE_CHECKING:
    from vlexport.models.kdeov.model import KDEOVModel

__all__ = ["CHECKPOINT_FORMAT", "KDEOVCheckpoint", "save_kdeov_checkpoint", "load_kdeov_checkpoint", "kdeov_checkpoint_extra"]

CHECKPOINT_FORMAT = "vlexport.kdeov/2"
# Format 1 scored the neck features with a softmax head and has no region branch to load into.
_OLD_FORMATS = {"vlexport.kdeov/1": "a softmax head on the neck features, before per-class sigmoid scoring"}


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
    record = KDEOVCheckpoint.read(path)
    return record.config, dict(record.state_dict)


def kdeov_checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` record of a KDEOV checkpoint: vocabulary, text tower identity, training state."""
    return KDEOVCheckpoint.read(path).extra


@dataclass(frozen=True)
class KDEOVCheckpoint:
    """One checkpoint file read once: config, student weights and ``extra``, passed along an export.

    An export needs the file three times (the config, the weights, the text tower it was trained
    with); :func:`~vlexport.models.kdeov.model.build_kdeov` takes this record in place of the path.
    """

    path: Path
    config: KDEOVConfig
    state_dict: Mapping[str, Any]
    backbone_source_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # vocabulary, text tower identity, training state

    @classmethod
    def read(cls, path: str | Path) -> KDEOVCheckpoint:
        """Read and check the file (``weights_only``); CheckpointError when it is not a KDEOV checkpoint."""
        obj = _read_kdeov_checkpoint(path)
        extra = obj.get("extra") or {}
        return cls(path=Path(path), config=obj["config"], state_dict=obj["state_dict"],
                   backbone_source_names=obj.get("backbone_source_names"),
                   extra=dict(extra) if isinstance(extra, Mapping) else {})

    @classmethod
    def of(cls, checkpoint: str | Path | KDEOVCheckpoint) -> KDEOVCheckpoint:
        """``checkpoint`` itself when already read, else the file read now."""
        return checkpoint if isinstance(checkpoint, KDEOVCheckpoint) else cls.read(checkpoint)
