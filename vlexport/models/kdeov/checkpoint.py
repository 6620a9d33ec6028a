"""A KDEOV checkpoint read once: its config, student weights and ``extra`` record, passed along.

An export needs the file three times (the config, the weights, the text tower it was trained
with); :meth:`KDEOVCheckpoint.read` loads it once and :func:`~vlexport.models.kdeov.model.build_kdeov`
takes the record in place of the path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["KDEOVCheckpoint"]


@dataclass(frozen=True)
class KDEOVCheckpoint:
    """The contents of one ``vlexport.kdeov/1`` file."""

    path: Path
    config: Any  # KDEOVConfig
    state_dict: Mapping[str, Any]
    backbone_source_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # vocabulary, text tower identity, training state

    @classmethod
    def read(cls, path: str | Path) -> KDEOVCheckpoint:
        """Read and check the file (``weights_only``); CheckpointError when it is not a KDEOV checkpoint."""
        from vlexport.models.kdeov.model import _read_kdeov_checkpoint

        obj = _read_kdeov_checkpoint(path)
        extra = obj.get("extra") or {}
        return cls(path=Path(path), config=obj["config"], state_dict=obj["state_dict"],
                   backbone_source_names=obj.get("backbone_source_names"),
                   extra=dict(extra) if isinstance(extra, Mapping) else {})

    @classmethod
    def of(cls, checkpoint: str | Path | KDEOVCheckpoint) -> KDEOVCheckpoint:
        """``checkpoint`` itself when already read, else the file read now."""
        return checkpoint if isinstance(checkpoint, KDEOVCheckpoint) else cls.read(checkpoint)
