"""The TensorRT engine cache: engines built on the target from a bundle's ONNX, kept beside it.

An engine is only valid for the TensorRT version and GPU that built it, so each engine is keyed by
(ONNX sha256, TensorRT version, GPU name, precision) and recorded in the manifest under
``parts[part]["engines"][precision]``. :func:`ensure_engine` reuses a recorded engine whose key
matches this device and whose bytes match their sha256, and otherwise has its ``builder`` build a
new one, replacing the stale entry. The manifest is valid at every instant: files are written to
hidden temp files and renamed, the manifest is rewritten atomically (:meth:`Bundle.record_engine`),
and a file leaves the manifest before it is replaced or deleted.

This module knows nothing of TensorRT: the builder and the device are the caller's
(:mod:`vlexport.runtime.backends.tensorrt_build` supplies the real ones), so imports go one way,
backends -> engine cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlexport.errors import BundleError, ExportError, OutputError, UsageError
from vlexport.runtime.bundle import PRECISIONS, Bundle, sha256_file
from vlexport.runtime.manifest import EngineRecord
from vlexport.runtime.spec import TensorSpec

__all__ = [
    "EngineKey",
    "EngineBuildError",
    "ENGINE_SOURCES",
    "TIMING_CACHE",
    "DEFAULT_BATCH",
    "engine_filename",
    "engine_precisions",
    "find_engine",
    "ensure_engine",
    "profile_shapes",
    "check_range",
    "Device",
    "Shapes",
    "Builder",
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


# -- lookup --------------------------------------------------------------------------------------
def _digest(entry: Any) -> str | None:
    algo, _, digest = str(entry).partition(":")
    return digest if algo == "sha256" and digest else None


def find_engine(bundle: Bundle, part: str, precision: str, key: EngineKey) -> Path | None:
    """The recorded engine for (part, precision) if its key equals ``key`` and its bytes match.

    An engine recorded with another key (other GPU, TensorRT version or ONNX) is never returned;
    neither is one whose file is missing or whose sha256 differs from the manifest's.
    """
    entry = bundle.part(part).engines.get(precision)
    if entry is None:
        return None
    try:
        recorded = EngineKey.from_dict(entry.key)
    except BundleError:
        return None  # malformed keys are rebuilt, never trusted
    rel = entry.file
    if recorded != key or rel != engine_filename(part, precision, key):
        return None
    digest = _digest(entry.sha256)
    if digest is None or _digest(bundle.meta.files.get(rel)) != digest:
        return None
    path = bundle.path_of(rel)
    if not path.is_file() or sha256_file(path) != digest:
        return None
    return path


# -- profiles ------------------------------------------------------------------------------------
def check_range(what: str, r: Sequence[int]) -> tuple[int, int, int]:
    """``r`` as a checked (min, opt, max) size range; UsageError naming ``what`` otherwise."""
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
    ranges = {"batch": check_range("batch", batch)}
    for name, r in (axes or {}).items():
        ranges[name] = check_range(f"axis {name!r}", r)
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
    seg = bundle.meta.extra.get("segment")
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
    bundle: Bundle | str | os.PathLike,
    part: str,
    precision: str,
    *,
    builder: Builder,
    device: Device,
    force: bool = False,
    progress: bool = True,
    batch: Sequence[int] = DEFAULT_BATCH,
    axes: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """Path of a verified engine for ``part`` in ``precision`` on ``device``, building it if needed.

    ``bundle`` is the open Bundle (a path is opened once); it is neither re-opened nor re-hashed:
    files it already verified stay verified, and under the build lock only its manifest is re-read.
    The engine is built from the ONNX file the manifest lists for :data:`ENGINE_SOURCES`
    ``[precision]`` (its sha256 is part of the key). A recorded engine is reused when its key,
    sha256 and optimisation profile match; otherwise ``builder(onnx_path, out_path,
    precision=..., timing_cache=<bundle>/timing.cache, progress=..., shapes=...)`` writes a new
    one, which replaces the stale entry and file. ``device`` is ``(trt_version, gpu_name)``.
    ``force`` rebuilds even a valid engine. (With this machine's TensorRT as builder and device:
    :func:`vlexport.runtime.backends.tensorrt_build.ensure_engine`.)
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    info = bundle.part(part)
    source = ENGINE_SOURCES[precision]
    if source not in info.files:
        raise BundleError(
            f"{bundle.root}: part {part!r} has no {source} ONNX file to build a {precision} TensorRT engine from "
            f"(it has {sorted(info.files)}; engines can be built in {engine_precisions(info.files) or 'no precision'})"
        )
    onnx_rel = info.files[source]
    onnx_path = bundle.verify(onnx_rel)
    onnx_sha = _digest(bundle.meta.files[onnx_rel])
    if onnx_sha is None:  # verify() accepted it, so this only guards against a future hash format
        raise BundleError(f"{bundle.root}: file {onnx_rel!r} has no sha256 in the manifest")
    merged_axes = {**_default_axes(bundle), **dict(axes or {})}
    shapes = profile_shapes(info.io.inputs, batch=batch, axes=merged_axes) if info.io.inputs else None
    trt_version, gpu = device
    key = EngineKey(onnx_sha256=onnx_sha, trt_version=trt_version, gpu_name=gpu, precision=precision)

    if not force:
        found = _reusable(bundle, part, precision, key, shapes)
        if found is not None:
            return found
    with _bundle_lock(bundle.root):
        # Another process may have built it while we waited for the lock: read its manifest again.
        bundle.reload()
        if not force:
            found = _reusable(bundle, part, precision, key, shapes)
            if found is not None:
                return found
        return _build_and_record(bundle, part, precision, key, onnx_path, onnx_rel, shapes, builder, progress)


def _reusable(bundle: Bundle, part: str, precision: str, key: EngineKey, shapes: Shapes | None) -> Path | None:
    path = find_engine(bundle, part, precision, key)
    if path is None:
        return None
    recorded = bundle.part(part).engines[precision].profile
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
    root = bundle.root
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
        old = bundle.part(part).engines.get(precision)
        if name in bundle.meta.files or (old is not None and old.file == name):
            # Same file name (same key, rebuilt): drop it from the manifest before replacing the
            # bytes, so that the manifest never lists a hash its file does not have.
            bundle.forget_engine(part, precision, name)
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write the TensorRT engine into {root}: {e.strerror or e}; make the bundle folder writable"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    record = EngineRecord(
        file=name,
        sha256=f"sha256:{digest}",
        key=key.to_dict(),
        onnx=onnx_rel,
        built=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        profile=_profile_json(shapes),
    )
    # A failed write leaves the engine file unrecorded (an orphan the next build removes) and the
    # manifest intact.
    stale = bundle.record_engine(part, precision, record)

    # Only now that the manifest no longer lists them: remove the stale engine and any orphan left
    # by an interrupted earlier build of the same (part, precision).
    pattern = _engine_file_re(part, precision)
    listed = set(bundle.meta.files)
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


