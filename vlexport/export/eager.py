"""Rebuilding a bundle's eager PyTorch model from its manifest, with random weights.

Each family module under :mod:`vlexport.export` ends with ``eager_parts(bundle)``: part name ->
eval-mode module producing that part's outputs, the same export wrapper the ONNX graph was traced
from. ``vlexport bench`` times them beside the runtime (weights do not change latency). This
module holds what those hooks share: the manifest's model config as a config dataclass, and
:class:`~vlexport.errors.EagerRebuildError` when a rebuild cannot happen here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from vlexport.errors import EagerRebuildError
from vlexport.runtime.bundle import Bundle

__all__ = ["EagerRebuildError", "config_from_dict", "config_from_manifest", "manifest_model_config"]

T = TypeVar("T")


def manifest_model_config(bundle: Bundle) -> dict[str, Any]:
    """A copy of the manifest's ``model.config`` section (empty when the bundle has none)."""
    return dict((bundle.manifest.get("model") or {}).get("config") or {})


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """``cls(**data)`` with JSON lists turned back into tuples.

    A field this vlexport's ``cls`` does not have (a manifest written by another version) is an
    :class:`EagerRebuildError`.
    """
    try:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})
    except TypeError as e:
        raise EagerRebuildError(f"the manifest's model config does not fit this vlexport's {cls.__name__}: {e}") from e


def config_from_manifest(cls: type[T], bundle: Bundle, **overrides: Any) -> T:
    """``cls`` built from the manifest's model config, ``overrides`` replacing (or adding) fields."""
    return config_from_dict(cls, {**manifest_model_config(bundle), **overrides})
