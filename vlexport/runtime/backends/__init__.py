"""Backends: one interface (:class:`Backend`), chosen by name with :func:`create_backend`.

Two kinds: ``"onnxruntime"`` (providers chosen from what really works here: TensorRT EP, CUDA EP,
CPU) and ``"tensorrt"`` (a plain engine built on this device from the bundle's ONNX and cached
beside it). With no backend named, a bundle part runs on TensorRT when TensorRT, cuda-python and
a CUDA GPU are all usable (:func:`preferred_backend`), else on onnxruntime.

Heavy imports (onnxruntime, TensorRT, cuda-python) happen only when a backend is created or
described.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlexport.errors import DependencyError, UsageError
from vlexport.runtime.backends.base import Backend
from vlexport.runtime.engine_cache import engine_precisions

if TYPE_CHECKING:
    from vlexport.runtime.bundle import Bundle, PartRecord

__all__ = [
    "Backend",
    "create_backend",
    "open_part_backend",
    "describe_backends",
    "backend_names",
    "has_accelerator",
    "preferred_backend",
    "resolve_backend",
    "part_precisions",
    "DEFAULT_BACKEND",
]

#: The backend that always works (CPU at worst); used when TensorRT cannot run here.
DEFAULT_BACKEND = "onnxruntime"
TENSORRT = "tensorrt"


# -- onnxruntime -----------------------------------------------------------------------------------
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


# -- TensorRT --------------------------------------------------------------------------------------
def _trt_module() -> Any:
    # Imported on use so that tests can monkeypatch its probes; it imports no TensorRT itself.
    from vlexport.runtime.backends import tensorrt as trt_backend

    return trt_backend


def _require_tensorrt() -> None:
    """Raise a chained DependencyError saying why the TensorRT backend cannot run here."""
    trt_backend = _trt_module()
    try:
        trt_backend.require_tensorrt()
    except DependencyError as e:
        raise DependencyError(f"the tensorrt backend cannot run here: {e}") from e


def _create_trt(path: str | os.PathLike, threads: int | None) -> Backend:
    # `threads` sets onnxruntime's CPU threads; it has no TensorRT counterpart and is ignored.
    _require_tensorrt()
    if Path(path).suffix.lower() == ".onnx":
        raise UsageError(
            f"{path}: the tensorrt backend loads a built .engine file, not ONNX; open the bundle "
            "(vlexport.runtime.load) or run `vlexport build BUNDLE` to build the engine for this GPU"
        )
    return _trt_module().TensorRTBackend(path)


def _describe_trt() -> dict[str, Any]:
    why = _trt_module().unavailable_reason()
    if why is not None:
        return {"name": TENSORRT, "available": False, "reason": why}
    try:
        from vlexport.runtime.backends.tensorrt_build import current_device

        version, gpu = current_device()
    except DependencyError as e:
        return {"name": TENSORRT, "available": False, "reason": str(e)}
    return {"name": TENSORRT, "available": True, "version": version, "device": gpu}


def _trt_accelerated() -> bool:
    return _trt_module().unavailable_reason() is None


# name -> (factory(path, threads), describe(), has_accelerator()).
_REGISTRY: dict[
    str, tuple[Callable[[str | os.PathLike, int | None], Backend], Callable[[], dict[str, Any]], Callable[[], bool]]
] = {
    "onnxruntime": (_create_ort, _describe_ort, _ort_accelerated),
    TENSORRT: (_create_trt, _describe_trt, _trt_accelerated),
}


# -- choosing --------------------------------------------------------------------------------------
def backend_names() -> list[str]:
    """Names accepted by :func:`create_backend`."""
    return list(_REGISTRY)


def _lookup(name: str) -> tuple[Any, ...]:
    if name not in _REGISTRY:
        raise UsageError(f"unknown backend {name!r}; choose one of {backend_names()}")
    return _REGISTRY[name]


def preferred_backend() -> str:
    """The backend a bundle runs on when none is named: ``"tensorrt"`` if usable here, else ``"onnxruntime"``.

    (``vlexport inspect`` prints it as "would use …".)
    """
    return TENSORRT if _trt_module().unavailable_reason() is None else DEFAULT_BACKEND


def resolve_backend(backend: str | None) -> str:
    """The backend name to use: ``backend`` checked (unknown → UsageError; ``"tensorrt"`` that
    cannot run here → DependencyError saying why), or :func:`preferred_backend` for None."""
    if backend is None:
        return preferred_backend()
    if not isinstance(backend, str):
        raise UsageError(f"backend must be a name, one of {backend_names()}; got {backend!r}")
    _lookup(backend)
    if backend == TENSORRT:
        _require_tensorrt()
    return backend


def create_backend(path: str | os.PathLike, backend: str | None = None, threads: int | None = None) -> Backend:
    """Load the model file at ``path`` with the named backend.

    ``backend=None`` picks by file: a ``.engine`` loads on TensorRT, anything else (ONNX) on
    onnxruntime with the best providers that work here. To run a bundle part on TensorRT,
    building its engine on first use, use :func:`open_part_backend`. ``threads`` applies to
    onnxruntime only. An unknown name is a UsageError listing the choices; an unusable backend
    raises a chained DependencyError saying why. Never returns None.
    """
    if backend is None:
        backend = TENSORRT if Path(path).suffix == ".engine" else DEFAULT_BACKEND
    factory, _, _ = _lookup(backend)
    return factory(path, threads)


def part_precisions(part: PartRecord, backend: str) -> list[str]:
    """The precisions ``part`` can run in on ``backend`` (TensorRT builds fp16 from the fp32 ONNX)."""
    if backend == TENSORRT:
        return engine_precisions(part.files)
    return part.precisions


def open_part_backend(
    bundle: Bundle,
    part: str,
    precision: str,
    backend: str | None = None,
    threads: int | None = None,
    *,
    progress: bool = True,
) -> tuple[Backend, Path]:
    """Load one part of a bundle in ``precision``; returns the backend and the file it loaded.

    On TensorRT the engine for this device is built on first use (with a progress line) and
    cached in the bundle (see :func:`vlexport.runtime.engine_cache.ensure_engine`); on onnxruntime the
    part's ONNX file is verified against the manifest and loaded.
    """
    name = resolve_backend(backend)
    info = bundle.part(part)
    if name == TENSORRT:
        from vlexport.runtime.backends import tensorrt_build

        # The open bundle itself: what it verified stays verified (no second open, no re-hashing).
        engine = tensorrt_build.ensure_engine(bundle, part, precision, progress=progress)
        return _trt_module().TensorRTBackend(engine, io=info.io), engine
    if precision not in info.files:
        from vlexport.errors import BundleError

        raise BundleError(f"{bundle.root}: part {part!r} has no {precision} file; it has {info.precisions}")
    path = bundle.verify(info.files[precision])
    factory, _, _ = _lookup(name)
    return factory(path, threads), path


def has_accelerator(backend: str | None = None) -> bool:
    """Whether the named backend (default: :func:`preferred_backend`) runs on a GPU here.

    Decides the default precision.
    """
    _, _, accel = _lookup(preferred_backend() if backend is None else backend)
    return accel()


def describe_backends() -> list[dict[str, Any]]:
    """What each backend can use here, and why not where it cannot (for ``vlexport doctor``-like output).

    Each entry has ``name`` and ``available``, plus ``reason`` when unavailable.
    """
    return [describe() for _, describe, _ in _REGISTRY.values()]
