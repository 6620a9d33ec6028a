"""Build TensorRT engines with TensorRT's Python API, and the engine cache with this machine's TensorRT.

:func:`build_engine` turns one ONNX file into a serialized engine; :func:`current_device` says which
TensorRT and GPU an engine built here is for; :func:`ensure_engine` is
:func:`vlexport.runtime.engine_cache.ensure_engine` with those two as its builder and device.
TensorRT is imported when a function is called, never at module level.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from vlexport.errors import DependencyError, UsageError
from vlexport.runtime import engine_cache
from vlexport.runtime.backends.tensorrt import gpu_name, import_tensorrt
from vlexport.runtime.bundle import PRECISIONS, Bundle
from vlexport.runtime.engine_cache import DEFAULT_BATCH, Builder, Device, EngineBuildError, check_range

__all__ = ["build_bundle_engines", "build_engine", "current_device", "ensure_engine", "EngineBuildError"]


def current_device(ordinal: int = 0) -> Device:
    """``(TensorRT version, GPU name)`` of this machine; DependencyError when either is missing."""
    trt = import_tensorrt()
    return str(trt.__version__), gpu_name(ordinal)


def ensure_engine(
    bundle: Bundle | str | os.PathLike,
    part: str,
    precision: str,
    *,
    builder: Builder | None = None,
    device: Device | None = None,
    force: bool = False,
    progress: bool = True,
    batch: Sequence[int] = DEFAULT_BATCH,
    axes: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """A verified engine for ``part`` in ``precision`` on this machine, built on first use.

    :func:`vlexport.runtime.engine_cache.ensure_engine` with ``builder`` defaulting to
    :func:`build_engine` and ``device`` to :func:`current_device` (both injectable for tests).
    ``bundle`` is the open Bundle (a path is opened once).
    """
    return engine_cache.ensure_engine(
        bundle, part, precision,
        # Looked up on each call, so that a stand-in set on this module is used.
        builder=builder if builder is not None else build_engine,
        device=device if device is not None else current_device(),
        force=force, progress=progress, batch=batch, axes=axes,
    )


def build_bundle_engines(
    bundle: Bundle | str | os.PathLike,
    precision: str | None = None,
    *,
    force: bool = False,
    max_batch: int = 8,
) -> list[tuple[str, str, Path]]:
    """``vlexport build``: an engine for every part and precision of the bundle (or ``precision`` only).

    Checks first that TensorRT can run here (a clear DependencyError otherwise); returns
    ``(part, precision, engine path)`` for each engine, built or found in the cache.
    """
    from vlexport.runtime.backends.tensorrt import require_tensorrt

    opened = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    require_tensorrt()
    built = []
    for name in opened.part_names:
        for prec in engine_cache.engine_precisions(opened.part(name).files):
            if precision is None or prec == precision:
                path = ensure_engine(opened, name, prec, force=force, batch=(1, 1, max_batch))
                built.append((name, prec, path))
    return built


def build_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    precision: str,
    timing_cache: str | os.PathLike | None = None,
    workspace_gb: float = 4.0,
    progress: bool = True,
    shapes: Mapping[str, Sequence[Sequence[int]]] | None = None,
    min_batch: int = DEFAULT_BATCH[0],
    opt_batch: int = DEFAULT_BATCH[1],
    max_batch: int = DEFAULT_BATCH[2],
    stream: TextIO | None = None,
) -> Path:
    """Build a TensorRT engine from an ONNX file and write its serialized bytes to ``out_path``.

    ``precision``: ``"fp32"`` (TF32 off, so results stay fp32), ``"fp16"`` (FP16 flag: TensorRT
    may run any layer in fp16) or ``"int8"`` (for a QDQ graph: INT8 + FP16 flags, explicit
    quantisation; unquantised layers may use fp16). Dynamic input axes get one optimisation
    profile: ``shapes`` ``{input: (min, opt, max)}`` when given, else axis 0 takes
    ``(min_batch, opt_batch, max_batch)`` and any other dynamic axis is an error asking for
    ``shapes``. ``timing_cache`` is loaded if present and saved back (merged with what other builds
    wrote meanwhile) after a successful build. Progress goes to ``stream`` (stderr by default).
    Parser errors are reported together in one :class:`EngineBuildError`.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if not (isinstance(workspace_gb, (int, float)) and math.isfinite(workspace_gb) and workspace_gb > 0):
        raise UsageError(f"workspace_gb must be a positive number, got {workspace_gb!r}")
    batch = check_range("batch", (min_batch, opt_batch, max_batch))
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file not found: {onnx_path}")
    out = stream if stream is not None else sys.stderr
    trt = import_tensorrt()

    logger = _make_logger(trt, out)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; flags 0 = weakly typed, so the precision
    # flags below decide which kernels TensorRT may choose.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT cannot parse {onnx_path.name} ({len(errors)} error(s)): " + "; ".join(errors or ["unknown error"])
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    _set_precision_flags(trt, config, precision)

    profile_needed = False
    profile = builder.create_optimization_profile()
    problems: list[str] = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(int(d) for d in tensor.shape)
        if all(d >= 0 for d in dims):
            continue
        profile_needed = True
        if shapes is not None and tensor.name in shapes:
            lo, opt, hi = (tuple(int(v) for v in s) for s in shapes[tensor.name])
        elif shapes is None and dims[0] < 0 and all(d >= 0 for d in dims[1:]):
            lo, opt, hi = ((b,) + dims[1:] for b in batch)
        else:
            problems.append(f"{tensor.name} {list(dims)}")
            continue
        if not len(lo) == len(opt) == len(hi) == len(dims):
            problems.append(f"{tensor.name}: profile rank {len(lo)} != input rank {len(dims)}")
            continue
        profile.set_shape(tensor.name, lo, opt, hi)
    if problems:
        raise EngineBuildError(
            f"{onnx_path.name}: no optimisation-profile range for the dynamic inputs {problems}; "
            "pass shapes={input: (min, opt, max)}"
        )
    if profile_needed:
        config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        _load_timing_cache(trt, config, cache_path, out)

    label = f"TensorRT {trt.__version__}: building {precision} engine from {onnx_path.name}"
    monitor = None
    if progress:
        print(f"{label} (first use on this GPU; this can take minutes)…", file=out, flush=True)
        monitor = _make_progress_monitor(trt, out)
        config.progress_monitor = monitor
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    elapsed = time.perf_counter() - t0
    if monitor is not None and monitor.cancelled:
        raise KeyboardInterrupt
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "see the TensorRT messages above"
        raise EngineBuildError(f"TensorRT failed to build the {precision} engine from {onnx_path.name}: {detail}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(memoryview(serialized))
        f.flush()
        os.fsync(f.fileno())
    if cache_path is not None:
        _save_timing_cache(trt, config, cache_path, out)
    if progress:
        size = out_path.stat().st_size / 2**20
        print(f"{label}: done in {elapsed:.1f} s ({size:.1f} MB)", file=out, flush=True)
    return out_path


def _set_precision_flags(trt: Any, config: Any, precision: str) -> None:
    flag = trt.BuilderFlag
    if precision == "fp32":
        # TF32 is on by default and changes fp32 results at the 1e-3 level; fp32 means fp32.
        if hasattr(flag, "TF32"):
            config.clear_flag(flag.TF32)
        return
    wanted = ["FP16"] if precision == "fp16" else ["INT8", "FP16"]
    missing = [w for w in wanted if not hasattr(flag, w)]
    if missing:
        raise DependencyError(
            f"TensorRT {trt.__version__} has no builder flag {missing}; vlexport builds {precision} engines with TensorRT 10"
        )
    for w in wanted:
        config.set_flag(getattr(flag, w))


def _parser_error_text(err: Any) -> str:
    desc = _call(err, "desc") or str(err)
    node = _call(err, "node_name")
    op = _call(err, "node_operator")
    if node or op:
        return f"node {node or '?'} ({op or '?'}): {desc}"
    index = _call(err, "node")
    return f"node #{index}: {desc}" if isinstance(index, int) and index >= 0 else str(desc)


def _call(obj: Any, name: str) -> Any:
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else None
    except Exception:
        return None


def _load_timing_cache(trt: Any, config: Any, path: Path, out: TextIO) -> None:
    blob = b""
    if path.is_file():
        try:
            blob = path.read_bytes()
        except OSError:
            blob = b""
    cache = config.create_timing_cache(blob)
    # A cache from another GPU or TensorRT version is refused (ignore_mismatch=False): start empty.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if blob:
            print(f"timing cache {path} is from another device or version; starting a new one", file=out)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(trt: Any, config: Any, path: Path, out: TextIO) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    # Merge what another build may have saved since we loaded, then replace atomically.
    if path.is_file():
        with contextlib.suppress(Exception):
            other = config.create_timing_cache(path.read_bytes())
            if other is not None:
                cache.combine(other, False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(cache.serialize()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # The engine is built; a cache that cannot be saved only costs time on the next build.
        print(f"could not save the timing cache {path}: {e.strerror or e}", file=out)


def _make_logger(trt: Any, out: TextIO) -> Any:
    class _Logger(trt.ILogger):
        """Prints warnings and errors; keeps the errors for the exception message."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self._lock = threading.Lock()

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                with self._lock:
                    self.errors.append(str(msg))
            if level <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=out, flush=True)

    return _Logger()


def _make_progress_monitor(trt: Any, out: TextIO) -> Any:
    class _Monitor(trt.IProgressMonitor):
        """One line per top-level build phase (and its direct sub-phases), with elapsed seconds.

        TensorRT calls it from its own threads; Ctrl-C cancels the build via ``step_complete``.
        """

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._t0 = time.perf_counter()
            self.cancelled = False

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    depth = 0 if parent_phase is None else self._depth.get(parent_phase, 0) + 1
                    self._depth[phase_name] = depth
                    if depth <= 1:
                        t = time.perf_counter() - self._t0
                        print(f"  {'  ' * depth}{phase_name} ({num_steps} steps) at {t:.0f} s", file=out, flush=True)
            except KeyboardInterrupt:
                self.cancelled = True

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                return not self.cancelled
            except KeyboardInterrupt:
                self.cancelled = True
                return False

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self._lock:
                    self._depth.pop(phase_name, None)
            except KeyboardInterrupt:
                self.cancelled = True

    return _Monitor()
