"""Where a bundle's weights came from, recorded the same way by every family.

A manifest says ``weights_source`` (``"file:<absolute path>"`` or ``"random"``) and the file's
sha256 instead of a "trained" boolean: a weights file proves where the numbers came from, not
whether anyone trained them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlexport.runtime.bundle import sha256_file

__all__ = ["weights_source", "checkpoint_provenance"]


def weights_source(checkpoint: str | os.PathLike[str] | None, *, seed: int | None = None) -> str:
    """``"file:<absolute path>"`` for a weights file, else ``"random(seed=S)"`` (``"random"`` when unseeded)."""
    if checkpoint is not None:
        return f"file:{Path(checkpoint).expanduser().resolve()}"
    return "random" if seed is None else f"random(seed={seed})"


def checkpoint_provenance(checkpoint: str | os.PathLike[str] | None, *, seed: int | None = None) -> dict[str, Any]:
    """``{"checkpoint", "checkpoint_sha256", "weights_source"}`` of a model's own weights."""
    return {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": None if checkpoint is None else sha256_file(checkpoint),
        "weights_source": weights_source(checkpoint, seed=seed),
    }
