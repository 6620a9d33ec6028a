"""Error hierarchy.

A :class:`VlexportError` is a user mistake or an unmet precondition: the CLI prints its
message as one line and exits with status 1. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations


class VlexportError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 1


class UsageError(VlexportError):
    """A bad argument: unknown name, empty vocabulary, out-of-range value."""


class CheckpointError(VlexportError):
    """A checkpoint is missing, corrupt, of the wrong format or untrusted."""


class BundleError(VlexportError):
    """A folder is not a valid bundle: no manifest, unknown schema, hash mismatch, unsafe path."""


class SourceError(VlexportError):
    """An image, folder, video or stream cannot be opened or read."""


class OutputError(VlexportError):
    """An output location cannot be written."""


class DependencyError(VlexportError):
    """An optional dependency (export extra, TensorRT, a GPU) is not available."""


class ExportError(VlexportError):
    """The export ran but its result failed a check (parity, ONNX checker)."""


class WeightsUnavailableError(VlexportError):
    """Pretrained weights cannot be found locally nor downloaded."""


class EagerRebuildError(VlexportError):
    """A bundle's eager PyTorch model cannot be rebuilt from its manifest (a missing extra, an old config)."""
