"""TensorRT engines: built on the target from a bundle's ONNX, cached beside it, keyed by device.

An engine is only valid for the TensorRT version and GPU that built it, so each engine is keyed by
(ONNX sha256, TensorRT version, GPU name, precision) and recorded in the manifest under
``parts[part]["engines"][precision]``. :func:`ensure_engine` reuses a recorded engine whose key
matches this device and whose bytes match their sha256, and otherwise builds a new one, replacing
the stale entry. The manifest is valid at every instant: files are written to hidden temp files
and renamed, the manifest is rewritten atomically, and a file leaves the manifest before it is
replaced or deleted.

Nothing here imports TensorRT at module level; :func:`build_engine` and :func:`current_device`
import it when called.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from vlexport.errors import BundleError, DependencyError, ExportError, OutputError, UsageError
from vlexport.runtime.bundle import MANIFEST, PRECISIONS, Bundle, sha256_file
from vlexport.runtime.spec import TensorSpec

__all__ = [
    "EngineKey",
    "EngineBuildError",
    "ENGINE_SOURCES",
    "TIMING_CACHE",
    "DEFAULT_BATCH",
    "engine_filename",
    "engine_precisions",
    "current_device",
    "find_engine",
    "ensure_engine",
    "profile_shapes",
    "build_engine",
]

#: Which ONNX file an engine of each precision is built from. fp16 engines come from the fp32
#: graph with the FP16 builder flag (TensorRT picks per-layer precision itself); int8 engines come
#: from the explicitly quantised (QDQ) graph.
ENGINE_SOURCES: dict[str, str] = {"fp32": "fp32", "fp16": "fp32", "int8": "int8"}

#: The timing cache shared by every engine build of a bundle (device-specific, not in the manifest).
TIMING_CACHE = "timing.cache"

#: Default optimisation-profile range (min, opt, max) of an axis named "batch".
DEFAULT_BATCH: tuple[int, int, int] = (1, 1, 8)

_LOCK_FILE = ".vlexport-engines.lock"

# (trt_version, gpu_name)
Device = tuple[str, str]
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
Builder = Callable[..., Any]


class EngineBuildError(ExportError):
    """TensorRT could not parse the ONNX graph or build an engine from it."""


# -- keys and names ------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineKey:
    """What an engine depends on; an engine is reused only when all four fields match."""

    onnx_sha256: str
    trt_version: str
    gpu_name: str
    precision: str

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"EngineKey.{name} must be a non-empty string, got {value!r}")

    def key_id(self) -> str:
        """A short stable id: the first 16 hex digits of the sha256 of the fields as sorted JSON."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineKey:
        """Parse a recorded key; a malformed one is a BundleError naming what is wrong."""
        fields = ("onnx_sha256", "trt_version", "gpu_name", "precision")
        if not isinstance(d, Mapping):
            raise BundleError(f"an engine key must be a JSON object, got {type(d).__name__}")
        missing = [f for f in fields if f not in d]
        if missing:
            raise BundleError(f"engine key lacks {missing}")
        try:
            return cls(**{f: d[f] for f in fields})
        except ValueError as e:
            raise BundleError(f"invalid engine key: {e}") from e


def engine_filename(part: str, precision: str, key: EngineKey) -> str:
    """``{part}.{precision}.{key_id}.engine``: plain serialized engine bytes, nothing prepended."""
    return f"{part}.{precision}.{key.key_id()}.engine"


def _engine_file_re(part: str, precision: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(part)}\.{re.escape(precision)}\.[0-9a-f]{{16}}\.engine$")


def engine_precisions(files: Mapping[str, str]) -> list[str]:
    """The precisions an engine can be built in, given a part's ONNX files by precision."""
    return [p for p in PRECISIONS if ENGINE_SOURCES[p] in files]


def current_device(ordinal: int = 0) -> Device:
    """``(TensorRT version, GPU name)`` of this machine; DependencyError when either is missing."""
    from vlexport.runtime.backends.tensorrt import gpu_name, import_tensorrt

    trt = import_tensorrt()
    return str(trt.__version__), gpu_name(ordinal)


# -- lookup --------------------------------------------------------------------------------------
def _digest(entry: Any) -> str | None:
    algo, _, digest = str(entry).partition(":")
    return digest if algo == "sha256" and digest else None


def find_engine(bundle: Bundle, part: str, precision: str, key: EngineKey) -> Path | None:
    """The recorded engine for (part, precision) if its key equals ``key`` and its bytes match.

    An engine recorded with another key (other GPU, TensorRT version or ONNX) is never returned;
    neither is one whose file is missing or whose sha256 differs from the manifest's.
    """
    p = bundle.manifest["parts"].get(part)
    if not isinstance(p, dict):
        raise BundleError(f"{bundle.root}: no part {part!r} in this bundle (it has {sorted(bundle.manifest['parts'])})")
    entry = (p.get("engines") or {}).get(precision)
    if not isinstance(entry, dict):
        return None
    try:
        recorded = EngineKey.from_dict(entry.get("key"))
    except BundleError:
        return None  # malformed entries are rebuilt, never trusted
    rel = entry.get("file")
    if recorded != key or not isinstance(rel, str) or rel != engine_filename(part, precision, key):
        return None
    digest = _digest(entry.get("sha256"))
    if digest is None or _digest(bundle.manifest["files"].get(rel)) != digest:
        return None
    path = bundle.path_of(rel)
    if not path.is_file() or sha256_file(path) != digest:
        return None
    return path


# -- profiles ------------------------------------------------------------------------------------
def _check_range(what: str, r: Sequence[int]) -> tuple[int, int, int]:
    if (
        len(r) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) for v in r)
        or not 1 <= r[0] <= r[1] <= r[2]
    ):
        raise UsageError(f"{what}: expected (min, opt, max) integers with 1 <= min <= opt <= max, got {tuple(r)}")
    return int(r[0]), int(r[1]), int(r[2])


def profile_shapes(
    inputs: Sequence[TensorSpec],
    *,
    batch: Sequence[int] = DEFAULT_BATCH,
    axes: Mapping[str, Sequence[int]] | None = None,
) -> Shapes:
    """Optimisation-profile shapes ``{input: (min, opt, max)}`` from declared input specs.

    An axis named ``"batch"`` takes the ``batch`` range; any other named axis must be given in
    ``axes`` (for example ``{"num_classes": (1, 80, 1024)}``). Fixed axes stay fixed.
    """
    ranges = {"batch": _check_range("batch", batch)}
    for name, r in (axes or {}).items():
        ranges[name] = _check_range(f"axis {name!r}", r)
    shapes: Shapes = {}
    unknown: list[str] = []
    for spec in inputs:
        per_axis: list[tuple[int, int, int]] = []
        for d in spec.shape:
            if isinstance(d, int):
                per_axis.append((d, d, d))
            elif d in ranges:
                per_axis.append(ranges[d])
            else:
                unknown.append(f"{spec.name}[{d}]")
                per_axis.append((1, 1, 1))
        lo, opt, hi = (tuple(r[i] for r in per_axis) for i in range(3))
        shapes[spec.name] = (lo, opt, hi)
    if unknown:
        raise UsageError(
            f"no size range for the dynamic axes {unknown}; pass axes={{name: (min, opt, max)}} to build the engine"
        )
    return shapes


def _default_axes(bundle: Bundle) -> dict[str, tuple[int, int, int]]:
    # In vocabulary mode "input" the class embeddings are a graph input with a "num_classes" axis:
    # optimise for the shipped vocabulary and allow vocabularies up to a generous size.
    axes: dict[str, tuple[int, int, int]] = {}
    n = len(bundle.classes)
    if n:
        axes["num_classes"] = (1, n, max(n, 1024))
    pre = bundle.preprocess
    if pre.get("resize") == "detr":
        # DETR's images keep their aspect: the short side is `short_side` (less for very long
        # images) and neither side exceeds `max_size`.
        short, longest = int(pre["short_side"]), int(pre["max_size"])
        axes["height"] = axes["width"] = (32, short, longest)
    seg = bundle.manifest.get("segment")
    if isinstance(seg, dict) and isinstance(seg.get("slide_crop"), int):
        # SCLIP's windows are slide_crop square, smaller only on frames whose resized side is
        # below the crop (long-side cap): optimise for the full crop, allow down to one patch.
        crop = int(seg["slide_crop"])
        axes["crop_height"] = axes["crop_width"] = (min(int(seg.get("patch_size", 1)), crop), crop, crop)
        # The windows of one frame form the batch (6 for 336x448; the runtime runs more in chunks).
        axes["crops"] = (1, 8, 32)
    return axes


# -- the cache -----------------------------------------------------------------------------------
def ensure_engine(
    bundle_root: str | os.PathLike,
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
    """Path of a verified engine for ``part`` in ``precision`` on this device, building it if needed.

    The engine is built from the ONNX file the manifest lists for :data:`ENGINE_SOURCES`
    ``[precision]`` (its sha256 is part of the key). A recorded engine is reused when its key,
    sha256 and optimisation profile match; otherwise ``builder(onnx_path, out_path,
    precision=..., timing_cache=<bundle>/timing.cache, progress=..., shapes=...)`` writes a new
    one, which replaces the stale entry and file. ``builder`` defaults to :func:`build_engine`
    and ``device`` (``(trt_version, gpu_name)``) to :func:`current_device`; both are injectable
    so that the caching can be tested without TensorRT. ``force`` rebuilds even a valid engine.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    bundle = Bundle.open(bundle_root)
    info = bundle.part(part)
    source = ENGINE_SOURCES[precision]
    if source not in info.files:
        raise BundleError(
            f"{bundle.root}: part {part!r} has no {source} ONNX file to build a {precision} TensorRT engine from "
            f"(it has {sorted(info.files)}; engines can be built in {engine_precisions(info.files) or 'no precision'})"
        )
    onnx_rel = info.files[source]
    onnx_path = bundle.verify(onnx_rel)
    onnx_sha = _digest(bundle.manifest["files"][onnx_rel])
    if onnx_sha is None:  # verify() accepted it, so this only guards against a future hash format
        raise BundleError(f"{bundle.root}: file {onnx_rel!r} has no sha256 in the manifest")
    merged_axes = {**_default_axes(bundle), **dict(axes or {})}
    shapes = profile_shapes(info.io.inputs, batch=batch, axes=merged_axes) if info.io.inputs else None
    trt_version, gpu = device if device is not None else current_device()
    key = EngineKey(onnx_sha256=onnx_sha, trt_version=trt_version, gpu_name=gpu, precision=precision)

    if not force:
        found = _reusable(bundle, part, precision, key, shapes)
        if found is not None:
            return found
    with _bundle_lock(bundle.root):
        # Another process may have built it while we waited for the lock.
        bundle = Bundle.open(bundle.root)
        if not force:
            found = _reusable(bundle, part, precision, key, shapes)
            if found is not None:
                return found
        return _build_and_record(
            bundle, part, precision, key, onnx_path, onnx_rel, shapes, builder or build_engine, progress
        )


def _reusable(bundle: Bundle, part: str, precision: str, key: EngineKey, shapes: Shapes | None) -> Path | None:
    path = find_engine(bundle, part, precision, key)
    if path is None:
        return None
    recorded = bundle.manifest["parts"][part]["engines"][precision].get("profile")
    # An engine built for other shapes (e.g. a smaller max batch) does not serve this request.
    return path if recorded == _profile_json(shapes) else None


def _profile_json(shapes: Shapes | None) -> dict[str, list[list[int]]] | None:
    if shapes is None:
        return None
    return {name: [list(s) for s in mom] for name, mom in shapes.items()}


def _build_and_record(
    bundle: Bundle,
    part: str,
    precision: str,
    key: EngineKey,
    onnx_path: Path,
    onnx_rel: str,
    shapes: Shapes | None,
    builder: Builder,
    progress: bool,
) -> Path:
    from vlexport.atomic import write_json_atomic

    root = bundle.root
    mpath = root / MANIFEST
    name = engine_filename(part, precision, key)
    final = bundle.path_of(name)
    tmp = root / f".{name}.{os.getpid()}.tmp"
    try:
        builder(onnx_path, tmp, precision=precision, timing_cache=root / TIMING_CACHE, progress=progress, shapes=shapes)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise EngineBuildError(f"building the {precision} engine of {part!r} produced no engine file")
    except BaseException:
        # A failed or interrupted build leaves the bundle exactly as it was.
        tmp.unlink(missing_ok=True)
        raise

    try:
        digest = sha256_file(tmp)
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        engines = manifest["parts"][part].setdefault("engines", {})
        old = engines.get(precision)
        stale = {old["file"]} if isinstance(old, dict) and isinstance(old.get("file"), str) else set()
        if name in manifest["files"] or name in stale:
            # Same file name (same key, rebuilt): drop it from the manifest before replacing the
            # bytes, so that the manifest never lists a hash its file does not have.
            engines.pop(precision, None)
            manifest["files"].pop(name, None)
            write_json_atomic(mpath, manifest)
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write the TensorRT engine into {root}: {e.strerror or e}; make the bundle folder writable"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    entry = {
        "file": name,
        "sha256": f"sha256:{digest}",
        "key": key.to_dict(),
        "onnx": onnx_rel,
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    profile = _profile_json(shapes)
    if profile is not None:
        entry["profile"] = profile
    engines[precision] = entry
    for rel in stale - {name}:
        manifest["files"].pop(rel, None)
    manifest["files"][name] = f"sha256:{digest}"
    try:
        write_json_atomic(mpath, manifest)
    except OSError as e:
        # The engine file stays unrecorded (an orphan the next build removes); the manifest is intact.
        raise OutputError(f"cannot update {mpath}: {e.strerror or e}; make the bundle folder writable") from e

    # Only now that the manifest no longer lists them: remove the stale engine and any orphan left
    # by an interrupted earlier build of the same (part, precision).
    pattern = _engine_file_re(part, precision)
    listed = set(manifest["files"])
    for p in root.iterdir():
        if p.name != name and p.name not in listed and (p.name in stale or pattern.match(p.name)):
            with contextlib.suppress(OSError):
                p.unlink()
    return final


@contextlib.contextmanager
def _bundle_lock(root: Path) -> Iterator[None]:
    """Serialise engine builds and manifest updates of one bundle across processes (POSIX)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; builds of one bundle must not overlap
        yield
        return
    try:
        fd = os.open(root / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(
            f"cannot build a TensorRT engine in {root}: {e.strerror or e}; make the bundle folder writable"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# -- the real builder ----------------------------------------------------------------------------
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
    from vlexport.runtime.backends.tensorrt import import_tensorrt

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if not (isinstance(workspace_gb, (int, float)) and math.isfinite(workspace_gb) and workspace_gb > 0):
        raise UsageError(f"workspace_gb must be a positive number, got {workspace_gb!r}")
    batch = _check_range("batch", (min_batch, opt_batch, max_batch))
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
