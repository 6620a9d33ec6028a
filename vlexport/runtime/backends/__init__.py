"""Backends: one interface (:class:`Backend`), chosen by name with :func:`create_backend`.

Heavy imports (onnxruntime, TensorRT) happen only when a backend is created or described.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vlexport.errors import DependencyError, UsageError
from vlexport.runtime.backends.base import Backend

__all__ = ["Backend", "create_backend", "describe_backends", "backend_names", "has_accelerator", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "onnxruntime"


def _create_ort(path: str | os.PathLike, threads: int | None) -> Backend:
    from vlexport.runtime.backends.onnxruntime import OrtBackend

    return OrtBackend(path, threads=threads)


def _describe_ort() -> dict[str, Any]:
    try:
        from vlexport.runtime.backends.onnxruntime import import_ort, provider_report

        ort = import_ort()
        report = provider_report()
    except DependencyError as e:
        return {"name": "onnxruntime", "available": False, "reason": str(e), "providers": [], "unavailable": {}}
    return {
        "name": "onnxruntime",
        "available": True,
        "version": ort.__version__,
        "providers": [p for p, why in report.items() if why is None],
        "unavailable": {p: why for p, why in report.items() if why is not None},
    }


def _ort_accelerated() -> bool:
    from vlexport.runtime.backends.onnxruntime import has_accelerator as ort_has_accelerator

    return ort_has_accelerator()


# name -> (factory(path, threads), describe(), has_accelerator()). The TensorRT backend registers here.
_REGISTRY: dict[
    str, tuple[Callable[[str | os.PathLike, int | None], Backend], Callable[[], dict[str, Any]], Callable[[], bool]]
] = {
    "onnxruntime": (_create_ort, _describe_ort, _ort_accelerated),
}


def backend_names() -> list[str]:
    """Names accepted by :func:`create_backend`."""
    return list(_REGISTRY)


def _lookup(backend: str | None) -> tuple[str, Any]:
    name = DEFAULT_BACKEND if backend is None else backend
    if name not in _REGISTRY:
        raise UsageError(f"unknown backend {backend!r}; choose one of {backend_names()}")
    return name, _REGISTRY[name]


def create_backend(path: str | os.PathLike, backend: str | None = None, threads: int | None = None) -> Backend:
    """Load the model at ``path`` with the named backend (default: onnxruntime on the best device).

    An unknown name is a UsageError listing the choices; an unusable backend raises
    DependencyError (chained). Never returns None.
    """
    _, (factory, _, _) = _lookup(backend)
    return factory(path, threads)


def has_accelerator(backend: str | None = None) -> bool:
    """Whether the named backend can run on a GPU here (decides the default precision)."""
    _, (_, _, accel) = _lookup(backend)
    return accel()


def describe_backends() -> list[dict[str, Any]]:
    """What each backend can use here, and why not where it cannot (for ``vlexport doctor``-like output)."""
    return [describe() for _, describe, _ in _REGISTRY.values()]
