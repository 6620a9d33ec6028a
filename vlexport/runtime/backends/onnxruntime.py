"""onnxruntime backend, with execution providers chosen from what really works on this machine.

``onnxruntime.get_available_providers()`` lists the providers the *build* contains (the GPU wheel
lists TensorRT and CUDA on a machine with neither), so :func:`available_providers` probes the
driver and libraries itself.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Union

import numpy as np

from vlexport.errors import DependencyError, UsageError
from vlexport.runtime.backends.base import Backend
from vlexport.runtime.spec import TensorSpec

__all__ = ["OrtBackend", "available_providers", "provider_report", "import_ort", "QUANTIZED_INPUTS_KEY",
           "quantize_feed"]

#: Model metadata key: JSON ``{input name: {"scale", "zero_point"}}`` of the uint8 inputs that stand
#: for a float tensor (the cpu target's pixel input, :mod:`vlexport.calibration.pixel_input`).
QUANTIZED_INPUTS_KEY = "vlexport.quantized_inputs"

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

Provider = Union[str, tuple[str, dict[str, Any]]]


# onnxruntime 1.31's MatmulTransposeFusion crashes the process (segfault at session creation)
# on FP16 transformer graphs such as the CLIP text tower; skipping that one fusion costs
# nothing measurable and keeps every bundle loadable.
DISABLED_OPTIMIZERS = ("MatmulTransposeFusion",)


def import_ort() -> ModuleType:
    """Import onnxruntime lazily; a broken or missing install becomes a DependencyError."""
    try:
        import onnxruntime as ort
    except Exception as e:  # ImportError, or an OSError from a broken shared library
        raise DependencyError(
            f"onnxruntime cannot be imported ({type(e).__name__}: {e}); install it with `pip install onnxruntime-gpu`"
        ) from e
    return ort


# -- probing ---------------------------------------------------------------------------------
def _probe_cuda() -> str | None:
    """None when a CUDA device is usable through the driver API, else the reason it is not."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver (libcuda.so.1 cannot be loaded)"
    try:
        if lib.cuInit(0) != 0:
            return "the CUDA driver failed to initialise (cuInit)"
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return "the CUDA driver cannot count devices (cuDeviceGetCount)"
    except AttributeError:
        return "libcuda.so.1 lacks the driver API"
    if count.value <= 0:
        return "the CUDA driver sees no GPU"
    return None


def _probe_tensorrt() -> str | None:
    """None when the TensorRT 10 runtime library can be loaded, else why not."""
    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError:
        # pip's tensorrt wheels keep the library in site-packages, not on the loader path.
        for base in _site_dirs():
            for sub in ("tensorrt_libs", "tensorrt"):
                cand = base / sub / "libnvinfer.so.10"
                if cand.is_file():
                    try:
                        ctypes.CDLL(str(cand))
                        return None
                    except OSError:
                        pass
        return "TensorRT is not installed (libnvinfer.so.10 cannot be loaded)"
    return None


def _site_dirs() -> list[Path]:
    import site
    import sys

    dirs = [Path(p) for p in getattr(site, "getsitepackages", lambda: [])()]
    dirs += [Path(p) for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(dirs))


@functools.lru_cache(maxsize=1)
def provider_report() -> dict[str, str | None]:
    """Every provider this onnxruntime build knows of that vlexport uses → None if usable, else why not."""
    ort = import_ort()
    built = set(ort.get_available_providers())
    report: dict[str, str | None] = {}
    cuda_why = _probe_cuda()
    if CUDA_EP not in built:
        report[CUDA_EP] = "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    else:
        report[CUDA_EP] = cuda_why
    if TRT_EP not in built:
        report[TRT_EP] = "this onnxruntime build has no TensorRT provider (install onnxruntime-gpu)"
    elif cuda_why:
        report[TRT_EP] = cuda_why
    else:
        report[TRT_EP] = _probe_tensorrt()
    report[CPU_EP] = None
    return {k: report[k] for k in (TRT_EP, CUDA_EP, CPU_EP)}


def available_providers() -> list[str]:
    """The providers that really work here, best first: TensorRT EP, CUDA EP, CPU (always)."""
    return [p for p, why in provider_report().items() if why is None]


def has_accelerator() -> bool:
    """True when a GPU provider (CUDA or TensorRT) is usable."""
    return any(p != CPU_EP for p in available_providers())


def quantize_feed(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """A float tensor as the uint8 codes of ``scale``/``zero_point``, rounded as QuantizeLinear
    rounds (half to even) and saturated."""
    codes = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale))
    if zero_point:
        codes += zero_point
    return np.clip(codes, 0, 255).astype(np.uint8)


# -- backend ---------------------------------------------------------------------------------
class OrtBackend(Backend):
    """An onnxruntime ``InferenceSession`` behind the :class:`Backend` interface.

    ``providers`` defaults to :func:`available_providers`; ``threads`` sets the intra-op thread
    count (inter-op is then 1: our graphs are a single chain). :attr:`providers` reports what the
    session actually uses, which can be less than asked when a provider fails to initialise.

    A uint8 input the graph's metadata marks as quantised (:attr:`quantized_inputs`) also takes
    the float tensor it stands for: the backend quantises it (the uint8 codes are the fast path).
    """

    name = "onnxruntime"

    def __init__(
        self, path: str | os.PathLike, providers: Sequence[Provider] | None = None, threads: int | None = None
    ):
        ort = import_ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"model file not found: {self.path}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        if providers is None:
            providers = available_providers()
        else:
            known = set(ort.get_all_providers())
            unknown = [p if isinstance(p, str) else p[0] for p in providers]
            unknown = [p for p in unknown if p not in known]
            if unknown:
                raise UsageError(f"unknown onnxruntime providers {unknown}; known: {sorted(known)}")
        names = [p if isinstance(p, str) else p[0] for p in providers]
        if CUDA_EP in names or TRT_EP in names:
            _preload_cuda_libraries(ort)

        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: provider fallbacks are reported via `providers`
        if threads is not None:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        ort.set_default_logger_severity(3)
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=list(providers),
                                                 disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise UsageError(f"onnxruntime cannot load {self.path}: {e}") from e
        self.providers: list[str] = list(self._session.get_providers())
        self._inputs = [_spec_from_ort(a, self.path) for a in self._session.get_inputs()]
        self._outputs = [_spec_from_ort(a, self.path) for a in self._session.get_outputs()]
        self._output_names = [s.name for s in self._outputs]
        meta = self._session.get_modelmeta().custom_metadata_map or {}
        try:
            quantized = json.loads(meta.get(QUANTIZED_INPUTS_KEY, "{}"))
            #: Input name → (scale, zero point) of the uint8 inputs that stand for float tensors.
            self.quantized_inputs: dict[str, tuple[float, int]] = {
                k: (float(v["scale"]), int(v["zero_point"])) for k, v in quantized.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{self.path}: unreadable {QUANTIZED_INPUTS_KEY} metadata: {e}") from e

    @property
    def device(self) -> str:
        return self.providers[0] if self.providers else "closed"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """As :meth:`Backend.infer`; a float feed of a quantised uint8 input is quantised first."""
        if self.quantized_inputs and isinstance(feeds, dict):
            feeds = {k: (quantize_feed(v, *self.quantized_inputs[k])
                         if k in self.quantized_inputs and isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
                     for k, v in feeds.items()}
        return super().infer(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise UsageError(f"{self.path}: the backend is closed")
        values = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        self._session = None
        self.providers = []


def _preload_cuda_libraries(ort: ModuleType) -> None:
    # onnxruntime-gpu looks for cuDNN/cuBLAS on the loader path only; `preload_dlls` also finds the
    # nvidia-* pip wheels. Best effort: if it fails, ORT falls back to CPU and `providers` says so.
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception:
        pass


def _spec_from_ort(arg: Any, path: Path) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise UsageError(f"{path}: tensor {arg.name!r} has type {arg.type}, which vlexport does not support")
    shape: list[int | str] = []
    for axis, d in enumerate(arg.shape):
        if isinstance(d, int) and d >= 0:
            shape.append(d)
        elif isinstance(d, str) and d:
            shape.append(d)
        else:
            # An unnamed dynamic axis: name it after its tensor so it binds to nothing else.
            shape.append(f"{arg.name}_dim{axis}")
    return TensorSpec(name=arg.name, dtype=dtype, shape=tuple(shape))
