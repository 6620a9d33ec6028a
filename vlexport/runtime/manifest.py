"""The bundle manifest, typed: read and validated in one place, written by one writer.

``manifest.json`` lists a bundle's parts (tensor contract, ONNX file per precision, TensorRT engines
built on the target), every file's sha256, and the per-family settings the runtime tasks read.
:func:`read_manifest` checks every field it types when the file is read and names the field that
is wrong (``manifest.json: parts.detector.inputs[0].shape: expected a list of ints or strings,
got 'x'``); :func:`write_manifest` is the only code that writes the file, atomically.

Family sections (``segment``, ``caption``, ...) and records the runtime does not interpret stay
plain JSON (:attr:`Manifest.extra`); tasks read their settings through :class:`Section`, whose
:meth:`~Section.number`, :meth:`~Section.choice` and :meth:`~Section.flag` are the one place where
manifest values and caller overrides are checked.

Schema ``vlexport.bundle/1`` is the only one written so far; :data:`READABLE_SCHEMAS` lists what
this version reads. Torch-free, like all of the runtime. (About 520 lines: the records, the
checks made when reading them and the settings accessors share one set of messages.)
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vlexport.atomic import write_json_atomic
from vlexport.errors import BundleError, UsageError
from vlexport.runtime.spec import _DTYPES, PartSignature, TensorSpec

__all__ = [
    "SCHEMA",
    "READABLE_SCHEMAS",
    "MANIFEST",
    "PRECISIONS",
    "Manifest",
    "PartRecord",
    "EngineRecord",
    "CalibrationRecord",
    "ValidationRecord",
    "Section",
    "read_manifest",
    "write_manifest",
    "parse_manifest",
    "check_number",
    "check_choice",
    "check_flag",
]

SCHEMA = "vlexport.bundle/1"
READABLE_SCHEMAS = (SCHEMA,)
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")

# The keys a manifest holds in this order when written (others follow, then these three).
_HEAD = ("schema", "family", "task", "preset", "provenance", "model", "preprocess", "vocabulary", "parts",
         "postprocess", "validation", "warnings")
_TAIL = ("created", "vlexport", "files")
_REQUIRED_KEYS = ("family", "task", "parts", "files", "preprocess")
_TYPED = {"schema", "family", "task", "preset", "preprocess", "vocabulary", "parts", "postprocess", "validation",
          "calibration", "files"}


class _Invalid(Exception):
    """A field that fails its check: ``field`` is its dotted path, ``message`` what is wrong."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"{field_path}: {message}")
        self.field = field_path
        self.message = message


# -- field checks while reading ---------------------------------------------------------------------
def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(where, f"expected a JSON object, got {value!r}")
    return value


def _str(value: Any, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise _Invalid(where, f"expected a {'' if empty else 'non-empty '}string, got {value!r}")
    return value


def _opt_obj(d: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = d.get(key)
    return None if value is None else _obj(value, f"{where}{key}")


def _str_map(value: Any, where: str, keys: Sequence[str] | None = None) -> dict[str, str]:
    d = _obj(value, where)
    for k, v in d.items():
        if keys is not None and k not in keys:
            raise _Invalid(f"{where}.{k}", f"unknown precision; expected one of {list(keys)}")
        _str(v, f"{where}.{k}")
    return dict(d)


def _tensor(value: Any, where: str) -> TensorSpec:
    d = _obj(value, where)
    for key in ("name", "dtype", "shape"):
        if key not in d:
            raise _Invalid(where, f"lacks the required key {key!r}")
    name = _str(d["name"], f"{where}.name")
    if d["dtype"] not in _DTYPES:
        raise _Invalid(f"{where}.dtype", f"expected one of {sorted(_DTYPES)}, got {d['dtype']!r}")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(
        (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, str) and x) for x in shape
    ):
        raise _Invalid(f"{where}.shape", f"expected a list of ints or strings, got {shape!r}")
    return TensorSpec(name=name, dtype=d["dtype"], shape=tuple(shape))


def _tensors(value: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list):
        raise _Invalid(where, f"expected a list of tensors, got {value!r}")
    return tuple(_tensor(x, f"{where}[{i}]") for i, x in enumerate(value))


# -- records ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built on a target for one (part, precision).

    ``key`` stays the recorded JSON object: the engine cache parses it and rebuilds an engine whose
    key is malformed rather than refusing the bundle.
    """

    file: str
    sha256: str
    key: Mapping[str, Any]
    onnx: str
    built: str
    profile: dict[str, list[list[int]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "sha256": self.sha256, "key": dict(self.key), "onnx": self.onnx,
                             "built": self.built}
        if self.profile is not None:
            d["profile"] = self.profile
        return d

    def __getitem__(self, key: str) -> Any:
        """Dict-style read (``record["file"]``), as callers of the untyped manifest wrote it."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    @classmethod
    def parse(cls, value: Any, where: str) -> "EngineRecord":
        d = _obj(value, where)
        for key in ("file", "sha256", "onnx"):
            _str(d.get(key), f"{where}.{key}")
        key = d.get("key")
        if not isinstance(key, dict):
            raise _Invalid(f"{where}.key", f"expected a JSON object, got {key!r}")
        profile = d.get("profile")
        if profile is not None:
            _obj(profile, f"{where}.profile")
        built = d.get("built", "")
        return cls(file=d["file"], sha256=d["sha256"], key=dict(key), onnx=d["onnx"],
                   built=built if isinstance(built, str) else str(built), profile=profile)


@dataclass(frozen=True)
class PartRecord:
    """One exported graph: its tensor contract, its ONNX file per precision, its built engines."""

    name: str
    io: PartSignature
    files: dict[str, str]
    engines: dict[str, EngineRecord] = field(default_factory=dict)

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.files]

    def to_dict(self) -> dict[str, Any]:
        return {**self.io.to_dict(), "files": dict(self.files),
                "engines": {p: e.to_dict() for p, e in self.engines.items()}}

    @classmethod
    def parse(cls, name: str, value: Any, where: str) -> "PartRecord":
        d = _obj(value, where)
        io = PartSignature(inputs=_tensors(d.get("inputs", []), f"{where}.inputs"),
                           outputs=_tensors(d.get("outputs", []), f"{where}.outputs"))
        files = _str_map(d.get("files", {}), f"{where}.files", PRECISIONS)
        engines_raw = _obj(d.get("engines") or {}, f"{where}.engines")
        engines = {}
        for p, e in engines_raw.items():
            if p not in PRECISIONS:
                raise _Invalid(f"{where}.engines.{p}", f"unknown precision; expected one of {list(PRECISIONS)}")
            engines[p] = EngineRecord.parse(e, f"{where}.engines.{p}")
        return cls(name=name, io=io, files=files, engines=engines)


@dataclass(frozen=True)
class CalibrationRecord:
    """How the INT8 graphs were calibrated: ``target`` is ``"tensorrt"`` (signed QDQ) or ``"cpu"``;
    ``weight_only`` lists parts quantised without calibration."""

    target: str = "tensorrt"
    weight_only: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # method, source, count, seed, sha256, ...

    def to_dict(self) -> dict[str, Any]:
        d = {"target": self.target, **self.extra}
        if self.weight_only is not None:
            d["weight_only"] = self.weight_only
        return d

    @classmethod
    def parse(cls, value: Any, where: str) -> "CalibrationRecord":
        d = dict(_obj(value, where))
        target = d.pop("target", "tensorrt")
        if target not in ("tensorrt", "cpu"):
            raise _Invalid(f"{where}.target", f"expected 'tensorrt' or 'cpu', got {target!r}")
        weight_only = d.pop("weight_only", None)
        if weight_only is not None:
            _obj(weight_only, f"{where}.weight_only")
        return cls(target=target, weight_only=weight_only, extra=d)


@dataclass(frozen=True)
class ValidationRecord:
    """What the export measured: ``parity`` per "part/precision", precisions it ``refused`` and why,
    and the family's own figures (``extra``: metrics, gate, ...)."""

    parity: dict[str, Any] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"parity": self.parity, **self.extra}
        if self.refused:
            d["refused"] = dict(self.refused)
        return d

    @classmethod
    def parse(cls, value: Any, where: str) -> "ValidationRecord":
        d = dict(_obj(value, where))
        parity = _obj(d.pop("parity", {}) or {}, f"{where}.parity")
        refused = _str_map(d.pop("refused", {}) or {}, f"{where}.refused")
        return cls(parity=dict(parity), refused=refused, extra=d)


@dataclass
class Manifest:
    """A bundle's manifest. ``extra`` holds every section the runtime does not type (family
    settings, provenance, fp16 island search, ...) in the order it was read or given."""

    family: str
    task: str
    preprocess: dict[str, Any]
    parts: dict[str, PartRecord]
    files: dict[str, str] = field(default_factory=dict)
    schema: str = SCHEMA
    preset: str | None = None
    postprocess: dict[str, Any] | None = None
    vocabulary: dict[str, Any] | None = None
    calibration: CalibrationRecord | None = None
    validation: ValidationRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, draft: bool = False) -> "Manifest":
        """Type and check a manifest's JSON; a bad field raises ``_Invalid`` naming it (see :func:`parse_manifest`).

        ``draft``: an exporter's manifest before publishing, which may leave out ``schema``
        (this version's) and ``files`` (the writer hashes them).
        """
        d = _obj(d, "manifest")
        schema = d.get("schema", SCHEMA if draft else None)
        if schema not in READABLE_SCHEMAS:
            raise _Invalid("schema", f"unknown bundle schema {schema!r}; this vlexport reads "
                           + " or ".join(repr(s) for s in READABLE_SCHEMAS))
        for key in _REQUIRED_KEYS:
            if key not in d and not (draft and key == "files"):
                raise _Invalid("", f"lacks the required key {key!r}; the bundle is corrupt")
        parts = {name: PartRecord.parse(name, p, f"parts.{name}") for name, p in _obj(d["parts"], "parts").items()}
        vocabulary = _opt_obj(d, "vocabulary", "")
        if vocabulary is not None:
            classes = vocabulary.get("classes", [])
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise _Invalid("vocabulary.classes", f"expected a list of names, got {classes!r}")
            if vocabulary.get("file") is not None:
                _str(vocabulary["file"], "vocabulary.file")
        preset = d.get("preset")
        if preset is not None:
            _str(preset, "preset", empty=True)
        cal = d.get("calibration")
        val = d.get("validation")
        return cls(
            schema=schema,
            family=_str(d["family"], "family"),
            task=_str(d["task"], "task"),
            preset=preset,
            preprocess=dict(_obj(d["preprocess"], "preprocess")),
            postprocess=_opt_obj(d, "postprocess", ""),
            vocabulary=vocabulary,
            parts=parts,
            files=_str_map(d.get("files", {}), "files"),
            calibration=None if cal is None else CalibrationRecord.parse(cal, "calibration"),
            validation=None if val is None else ValidationRecord.parse(val, "validation"),
            extra={k: v for k, v in d.items() if k not in _TYPED},
        )

    # -- writing ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json`` (keys in the exporter's order)."""
        typed: dict[str, Any] = {
            "schema": self.schema, "family": self.family, "task": self.task, "preset": self.preset,
            "preprocess": self.preprocess, "vocabulary": self.vocabulary,
            "parts": {n: p.to_dict() for n, p in self.parts.items()},
            "postprocess": self.postprocess,
            "validation": None if self.validation is None else self.validation.to_dict(),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "files": dict(self.files),
        }
        # Written as null when unset, as the exporter always did; these two only when recorded.
        optional = ("validation", "calibration")
        out: dict[str, Any] = {}
        for key in _HEAD:
            if key in typed:
                if typed[key] is not None or key not in optional:
                    out[key] = typed[key]
            elif key in self.extra:
                out[key] = self.extra[key]
        for key, value in self.extra.items():
            if key not in out and key not in _TAIL:
                out[key] = value
        if typed["calibration"] is not None:
            out["calibration"] = typed["calibration"]
        for key in _TAIL:
            if key == "files":
                out["files"] = typed["files"]
            elif key in self.extra:
                out[key] = self.extra[key]
        return out

    @property
    def raw(self) -> dict[str, Any]:
        """The manifest as plain JSON data (a fresh dict: editing it changes nothing)."""
        return self.to_dict()

    # -- accessors -------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list((self.vocabulary or {}).get("classes", []))

    def section(self, name: str, where: str = "") -> "Section":
        """A family section (``segment``, ``caption``, ...) or ``preprocess``/``postprocess``, typed
        by :class:`Section`; an absent section is empty (``Section.present`` is False)."""
        if name == "preprocess":
            data: Any = self.preprocess
        elif name == "postprocess":
            data = self.postprocess
        else:
            data = self.extra.get(name)
        return Section(data if isinstance(data, dict) else {}, name, where=where, present=isinstance(data, dict))

    def refused(self, part: str) -> dict[str, str]:
        """Precisions of ``part`` the export left out because they failed their checks: precision -> why."""
        refused = self.validation.refused if self.validation is not None else {}
        return {key.partition("/")[2]: why for key, why in refused.items() if key.partition("/")[0] == part}


def parse_manifest(data: Any, source: str | os.PathLike = MANIFEST, *, draft: bool = False) -> Manifest:
    """:meth:`Manifest.from_dict` with errors as one-line BundleErrors naming ``source`` and the field."""
    try:
        return Manifest.from_dict(data, draft=draft)
    except _Invalid as e:
        raise BundleError(f"{source}: {e.field}: {e.message}" if e.field else f"{source} {e.message}") from None
    except ValueError as e:  # TensorSpec's own checks
        raise BundleError(f"{source}: {e}") from None


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate ``manifest.json``; any problem is a BundleError naming the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is corrupt, export it again") from e
    if not isinstance(data, dict):
        raise BundleError(f"{path} does not hold a JSON object; the bundle is corrupt")
    return parse_manifest(data, path)


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``manifest`` to ``path`` atomically (temp file, fsync, rename): the one manifest writer.

    A failed write leaves the previous file exactly as it was.
    """
    write_json_atomic(path, manifest.to_dict())


# -- typed settings ----------------------------------------------------------------------------------
_REQUIRED = object()


def _wants(*, integer: bool, min: float | None, max: float | None, exclusive: bool) -> str:
    if integer:
        if min == 1 and max is None:
            return "a positive integer"
        if min == 0 and max is None:
            return "a non-negative integer"
        if min is not None and max is not None:
            return f"an integer between {min} and {max}"
        return f"an integer >= {min}" if min is not None else "an integer"
    if min is not None and max is not None:
        return f"a number {'strictly ' if exclusive else ''}between {min:g} and {max:g}"
    if min == 0 and exclusive:
        return "a positive number"
    if min is not None:
        return f"a number {'>' if exclusive else '>='} {min:g}"
    return "a finite number"


def check_number(value: Any, what: str, *, min: float | None = None, max: float | None = None,
                 integer: bool = False, exclusive: bool = False,
                 error: Callable[[str], Exception] = UsageError) -> Any:
    """``value`` as an int (``integer``) or float, checked against ``[min, max]`` (open with
    ``exclusive``); otherwise ``error("{what} must be <kind>, got <value>")``."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    if ok:
        v = int(value) if integer else float(value)
        ok = math.isfinite(v)
        if ok and min is not None:
            ok = v > min if exclusive else v >= min
        if ok and max is not None:
            ok = v < max if exclusive else v <= max
    if not ok:
        raise error(f"{what} must be {_wants(integer=integer, min=min, max=max, exclusive=exclusive)}, got {value!r}")
    return v


def check_choice(value: Any, what: str, choices: Sequence[Any],
                 error: Callable[[str], Exception] = UsageError) -> Any:
    """``value`` if it is one of ``choices``; otherwise ``error("{what} must be one of [...], got ...")``."""
    if isinstance(value, bool) or value not in choices:
        raise error(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


def check_flag(value: Any, what: str, error: Callable[[str], Exception] = UsageError) -> bool:
    """``value`` as a bool (a JSON true/false or numpy bool); otherwise ``error("{what} must be true or false, ...")``."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise error(f"{what} must be true or false, got {value!r}")
    return bool(value)


class Section(Mapping[str, Any]):
    """Read-only typed access to one manifest section, e.g. ``bundle.section("segment")``.

    :meth:`number`, :meth:`choice` and :meth:`flag` read ``key`` (``default`` when absent; no
    default makes it required) and check it. A bad manifest value is a BundleError
    ``"<bundle>: <section>.<key> must be ..."``; a bad ``override`` (the caller's value, used
    instead when not None) is a UsageError ``"<key> must be ..."``.
    """

    def __init__(self, data: Mapping[str, Any], name: str, *, where: str = "", present: bool = True):
        self._data = data
        self.name = name
        self.where = where
        self.present = present

    # Mapping protocol: the section reads like the JSON object it wraps.
    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Section({self.name!r}, {dict(self._data)!r})"

    def bundle_error(self, message: str) -> BundleError:
        """A BundleError for this section's bundle: ``"<where>: <message>"``."""
        return BundleError(f"{self.where}: {message}" if self.where else message)

    def _value(self, key: str, default: Any) -> Any:
        if key in self._data:
            return self._data[key]
        if default is _REQUIRED:
            raise self.bundle_error(f"{self.name}.{key} is missing")
        return default

    def _read(self, key: str, default: Any, override: Any, check: Callable[..., Any]) -> Any:
        if override is not None:
            return check(override, key, UsageError)
        value = self._value(key, default)
        if value is None and default is None:
            return None  # an optional setting left out (or null)
        return check(value, f"{self.name}.{key}", self.bundle_error)

    def number(self, key: str, default: Any = _REQUIRED, *, min: float | None = None, max: float | None = None,
               integer: bool = False, exclusive: bool = False, override: Any = None) -> Any:
        """``key`` as a checked number (see :func:`check_number`); None if absent with ``default=None``."""
        return self._read(key, default, override, lambda v, what, err: check_number(
            v, what, min=min, max=max, integer=integer, exclusive=exclusive, error=err))

    def choice(self, key: str, choices: Sequence[Any], default: Any = _REQUIRED, *, override: Any = None) -> Any:
        """``key`` checked to be one of ``choices``."""
        return self._read(key, default, override, lambda v, what, err: check_choice(v, what, choices, err))

    def flag(self, key: str, default: Any = _REQUIRED, *, override: Any = None) -> bool:
        """``key`` checked to be true or false."""
        return self._read(key, default, override, lambda v, what, err: check_flag(v, what, err))

    def section(self, key: str) -> "Section":
        """A nested object (``caption.decoding``), empty when absent; a non-object is a BundleError."""
        value = self._data.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise self.bundle_error(f"{self.name}.{key} must be an object, got {value!r}")
        return Section(value or {}, f"{self.name}.{key}", where=self.where, present=value is not None)
