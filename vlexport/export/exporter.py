"""One library call for every family's export: ``export_model("kdeov", kdeov.Options(preset="tiny", fp16=True))``.

Each export command of the CLI is this call; a Python user makes the same one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vlexport.errors import DependencyError, UsageError
from vlexport.registry import Family, get_family

if TYPE_CHECKING:
    from vlexport.export.bundle_export import ExportReport

__all__ = ["export_extra_missing", "export_model", "require_export_extra"]


def export_extra_missing(e: ImportError) -> DependencyError:
    """The one-line error for an export-side import that failed: which package, and the install line."""
    return DependencyError(f"exporting needs the export extra ({e.name} is missing): pip install 'vlexport[export]'")


def require_export_extra() -> None:
    """A DependencyError with the install line when torch or onnx is missing."""
    try:
        for name in ("onnx", "torch"):
            importlib.import_module(name)
    except ImportError as e:
        raise export_extra_missing(e) from e


def export_model(family: str | Family, options: Any) -> ExportReport:
    """Export one model to a bundle.

    Args:
        family: a family name (``"kdeov"``, ``"yolo"``, …) or its :class:`~vlexport.registry.Family`.
        options: that family's ``Options`` (``vlexport.export.<family>.Options``): every option of its
            CLI command as a field, with the same defaults (``out=None`` is ``bundles/<family>-…``).

    Returns:
        the :class:`~vlexport.export.bundle_export.ExportReport` (path, parity, refused precisions, metrics).

    Raises:
        UsageError: bad options (checked before any model is loaded); DependencyError without torch/onnx.
    """
    fam = family if isinstance(family, Family) else get_family(family)
    require_export_extra()
    options_class = fam.load("options")
    if not isinstance(options, options_class):
        raise UsageError(f"{fam.name} exports take {options_class.__module__}.{options_class.__qualname__}, "
                         f"got {type(options).__name__}")
    return fam.load("export")(options)
