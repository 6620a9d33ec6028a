"""TensorRT backend: a serialized engine behind the :class:`Backend` interface.

Uses TensorRT 10's name-based tensor API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) and cuda-python's runtime bindings for device memory and the stream.
Both are imported when a backend is created or probed, never at module import; when either (or a
GPU) is missing, a chained :class:`DependencyError` says which and how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from vlexport.errors import DependencyError, UsageError
from vlexport.runtime.backends.base import Backend
from vlexport.runtime.spec import PartSignature, TensorSpec

__all__ = [
    "TensorRTBackend",
    "TRT_MISSING",
    "import_tensorrt",
    "import_cudart",
    "require_tensorrt",
    "unavailable_reason",
    "gpu_name",
]

TRT_MISSING = "TensorRT is not installed: pip install 'vlexport[trt]' on the target (needs an NVIDIA GPU)"
CUDART_MISSING = (
    "cuda-python is not installed (the TensorRT backend uses it for GPU memory): "
    "pip install 'vlexport[trt]' on the target"
)
MIN_TRT_MAJOR = 10
# The tensor dtypes a TensorSpec can describe.
_SUPPORTED_DTYPES = frozenset({"float32", "float16", "int64", "int32", "uint8", "bool"})


# -- imports and probes ------------------------------------------------------------------------
def import_tensorrt() -> ModuleType:
    """Import TensorRT (10 or newer) lazily; anything else is a chained DependencyError."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DependencyError(TRT_MISSING) from e
    except Exception as e:  # a broken install: OSError from libnvinfer, ...
        raise DependencyError(
            f"TensorRT cannot be imported ({type(e).__name__}: {e}); reinstall it: pip install 'vlexport[trt]' on the target"
        ) from e
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TRT_MAJOR:
        raise DependencyError(
            f"TensorRT {version} is too old: vlexport needs TensorRT {MIN_TRT_MAJOR} or newer "
            "(pip install 'vlexport[trt]' on the target)"
        )
    return trt


def import_cudart() -> ModuleType:
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as e:
            raise DependencyError(CUDART_MISSING) from e
    return cudart


def _cuda(cudart: ModuleType, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; a CUDA error becomes a DependencyError."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        try:
            _, desc = cudart.cudaGetErrorString(err)
            desc = desc.decode() if isinstance(desc, bytes) else str(desc)
        except Exception:
            desc = ""
        raise DependencyError(f"CUDA {what} failed: {name}" + (f" ({desc})" if desc else ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_name(ordinal: int = 0) -> str:
    """The name of CUDA device ``ordinal`` (e.g. ``"NVIDIA H100 80GB HBM3"``), via cuda-python."""
    cudart = import_cudart()
    count = _cuda(cudart, cudart.cudaGetDeviceCount(), "device count")
    if not 0 <= ordinal < count:
        raise UsageError(f"no CUDA device {ordinal}: this machine has {count}")
    prop = _cuda(cudart, cudart.cudaGetDeviceProperties(ordinal), "device properties")
    name = prop.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(name).strip()


def require_tensorrt() -> ModuleType:
    """TensorRT if the backend can run here (TensorRT 10+, a CUDA GPU, cuda-python), else a chained DependencyError."""
    trt = import_tensorrt()
    from vlexport.runtime.backends.onnxruntime import _probe_cuda

    why = _probe_cuda()
    if why is not None:
        raise DependencyError(f"TensorRT needs an NVIDIA GPU, but {why}")
    import_cudart()
    return trt


def unavailable_reason() -> str | None:
    """None when the TensorRT backend can run here, else why not (one line)."""
    try:
        require_tensorrt()
    except DependencyError as e:
        return str(e)
    return None


# -- backend -------------------------------------------------------------------------------------
class TensorRTBackend(Backend):
    """A deserialized TensorRT engine on one GPU.

    ``io`` (the part's declared contract from the manifest) names the engine's dynamic axes; an
    axis it does not name is called ``"{tensor}_dim{axis}"``, as the onnxruntime backend does, so
    that it binds to no other tensor. Inputs are validated by :meth:`Backend.infer` and then against
    the engine's optimisation profile; device buffers grow as needed and are reused across calls.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, device: int = 0, *, io: PartSignature | None = None):
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise UsageError(f"device must be a CUDA device index (0, 1, …), got {device!r}")
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UsageError(f"engine file not found: {self.path}")
        trt = require_tensorrt()
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        self._device_index = device
        self._context: Any = None
        self._engine: Any = None
        self._stream: Any = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._gpu = gpu_name(device)
        _cuda(cudart, cudart.cudaSetDevice(device), f"set device {device}")

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise UsageError(
                f"TensorRT {trt.__version__} cannot load the engine {self.path} (built by another TensorRT version "
                "or for another GPU?); rebuild it with `vlexport build`"
            )
        try:
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise DependencyError(f"TensorRT cannot create an execution context for {self.path} (out of GPU memory?)")
            self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "stream create")
            self._inputs, self._outputs, self.profile = self._describe(io)
        except BaseException:
            self.close()
            raise

    # -- description -------------------------------------------------------------------
    def _describe(self, io: PartSignature | None) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, Any]]:
        trt, engine = self._trt, self._engine
        declared = {s.name: s for s in ((io.inputs + io.outputs) if io is not None else ())}
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        profile: dict[str, tuple[tuple[int, ...], ...]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            if mode == trt.TensorIOMode.INPUT and engine.get_tensor_location(name) == trt.TensorLocation.HOST:
                raise UsageError(f"{self.path}: input {name!r} is a shape tensor, which vlexport does not support")
            dtype = _np_dtype(trt, engine.get_tensor_dtype(name), name, self.path)
            dims = [int(d) for d in engine.get_tensor_shape(name)]
            spec_dims = declared[name].shape if name in declared and len(declared[name].shape) == len(dims) else None
            shape: list[int | str] = []
            for axis, d in enumerate(dims):
                if d >= 0:
                    shape.append(d)
                elif spec_dims is not None and isinstance(spec_dims[axis], str):
                    shape.append(spec_dims[axis])
                else:
                    shape.append(f"{name}_dim{axis}")
            spec = TensorSpec(name=name, dtype=dtype, shape=tuple(shape))
            if mode == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                if any(d < 0 for d in dims):
                    lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
                    profile[name] = (tuple(int(v) for v in lo), tuple(int(v) for v in opt), tuple(int(v) for v in hi))
            else:
                outputs.append(spec)
        return inputs, outputs, profile

    @property
    def device(self) -> str:
        if self._context is None:
            return "closed"
        return f"TensorRT {self._trt.__version__} on {self._gpu} (cuda:{self._device_index})"

    @property
    def max_batch(self) -> int | None:
        """The largest "batch" the engine's optimisation profile accepts (None when no input has that axis).

        Callers that batch frames must split larger batches: the profile is fixed at build time.
        """
        sizes: list[int] = []
        for spec in self._inputs:
            if spec.name in self.profile:
                hi = self.profile[spec.name][2]
                sizes += [hi[axis] for axis, d in enumerate(spec.shape) if d == "batch"]
        return min(sizes) if sizes else None

    # -- running -----------------------------------------------------------------------
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None:
            raise UsageError(f"{self.path}: the backend is closed")
        cudart, ctx = self._cudart, self._context
        # The current device is per host thread; a pipeline may call us from several threads.
        _cuda(cudart, cudart.cudaSetDevice(self._device_index), f"set device {self._device_index}")
        arrays = {s.name: np.ascontiguousarray(feeds[s.name]) for s in self._inputs}
        problems = []
        for name, (lo, _, hi) in self.profile.items():
            shape = arrays[name].shape
            if any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                problems.append(f"{name}: got shape {shape}, the engine accepts {lo} to {hi}")
        if problems:
            raise UsageError(f"{self.name}: invalid inputs: " + "; ".join(problems))

        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in arrays.items():
            if name in self.profile and not ctx.set_input_shape(name, arr.shape):
                raise UsageError(f"{self.name}: TensorRT refused shape {arr.shape} for input {name!r}")
            ptr = self._buffer(name, arr.nbytes)
            if arr.nbytes:
                _cuda(cudart, cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream), "copy to GPU")
            if not ctx.set_tensor_address(name, ptr):
                raise RuntimeError(f"TensorRT refused the address of input {name!r}")
        results: dict[str, np.ndarray] = {}
        for spec in self._outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise UsageError(
                    f"{self.path}: output {spec.name!r} has a data-dependent shape {shape}, which vlexport does not support"
                )
            host = np.empty(shape, dtype=spec.dtype)
            results[spec.name] = host
            if not ctx.set_tensor_address(spec.name, self._buffer(spec.name, host.nbytes)):
                raise RuntimeError(f"TensorRT refused the address of output {spec.name!r}")
        if not ctx.execute_async_v3(stream_handle=int(self._stream)):
            raise RuntimeError(f"TensorRT failed to run {self.path} (see the TensorRT messages above)")
        for name, host in results.items():
            if host.nbytes:
                ptr = self._buffers[name][0]
                _cuda(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, self._stream), "copy from GPU")
        # `arrays` keeps the inputs alive until the stream has finished with them.
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "stream synchronize")
        del arrays
        return results

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for tensor ``name`` (grown, never shrunk)."""
        ptr, capacity = self._buffers.get(name, (0, 0))
        need = max(int(nbytes), 1)  # TensorRT wants a valid address even for empty tensors
        if capacity >= need:
            return ptr
        cudart = self._cudart
        if ptr:
            # Earlier work on our stream may still read the old buffer.
            _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "stream synchronize")
            _cuda(cudart, cudart.cudaFree(ptr), "free")
            del self._buffers[name]
        new = int(_cuda(cudart, cudart.cudaMalloc(need), f"allocate {need} bytes for {name!r}"))
        self._buffers[name] = (new, need)
        return new

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Free device buffers, the stream, the context and the engine (idempotent)."""
        cudart = getattr(self, "_cudart", None)
        if cudart is not None:
            if self._stream is not None:
                cudart.cudaStreamSynchronize(self._stream)
            for ptr, _ in self._buffers.values():
                cudart.cudaFree(ptr)
            self._buffers = {}
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
        self._stream = None
        # The context must go before the engine, and the engine before the runtime.
        self._context = None
        self._engine = None

    def __del__(self) -> None:
        # A forgotten close() would otherwise hold GPU memory until the process exits.
        try:
            self.close()
        except Exception:
            pass


def _np_dtype(trt: ModuleType, trt_dtype: Any, name: str, path: Path) -> str:
    try:
        dtype = np.dtype(trt.nptype(trt_dtype)).name
    except TypeError:
        dtype = str(trt_dtype)
    if dtype not in _SUPPORTED_DTYPES:
        raise UsageError(f"{path}: tensor {name!r} has type {dtype}, which vlexport does not support")
    return dtype
