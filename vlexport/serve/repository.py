"""Write a Triton model repository from bundles, atomically: :func:`write_repository`.

Two layouts:

* ``python``: one Python-backend model per bundle (``<name>/1/model.py`` = :mod:`vlexport.serve.python_model`,
  ``<name>/1/bundle/`` = the bundle), running the runtime task end to end with the tensor contract of
  :mod:`vlexport.serve.contract`, dynamic batching and instance groups from the options.
* ``ensemble`` (GPU servers): each part as an ``onnxruntime_onnx`` model (``tensorrt_plan`` when the
  manifest records engines built by ``vlexport build``), with its batching derived from the part's
  dynamic axes; pre- and post-processing as Python-backend models
  (:mod:`vlexport.serve.stage_model`); an ``ensemble`` model named after the bundle ties them.

Every bundle is verified (sha256 of every file) and every config rendered and parsed against
Triton's ModelConfig schema before anything is written; the repository is then staged in a hidden
folder beside ``out`` and renamed into place, so an error or Ctrl-C leaves no half-written
repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlexport.errors import OutputError, UsageError
from vlexport.runtime.bundle import MANIFEST, Bundle
from vlexport.serve import config as cfg
from vlexport.serve.contract import (INPUTS, MANIFEST_TO_TRITON, PARAM_CLASSES, PARAM_TASK, SERVED_TASKS, TensorDef,
                                     outputs_for)

__all__ = ["write_repository", "RepositoryReport", "ModelEntry", "LAYOUTS", "INSTANCE_KINDS", "VERSION",
           "served_classes"]

LAYOUTS = ("python", "ensemble")
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
VERSION = "1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HERE = Path(__file__).resolve().parent
#: Precision order for picking a part's file on a GPU server (fastest first).
_GPU_ORDER = ("int8", "fp16", "fp32")
GEOMETRY = "GEOMETRY"  # letterbox geometry from the pre- to the post-processing model


@dataclass
class ModelEntry:
    """One model of the repository: its name, what serves it, its tensors and its config text."""

    name: str
    kind: str  # "python", "onnxruntime_onnx", "tensorrt_plan" or "ensemble"
    inputs: list[TensorDef]
    outputs: list[TensorDef]
    max_batch_size: int
    config: str
    bundle: Path | None = None
    files: list[tuple[Path, str]] = field(default_factory=list)  # (source, path inside the version folder)

    def describe(self) -> str:
        def tensors(defs: Sequence[TensorDef]) -> str:
            return ", ".join(f"{d.name} {d.data_type[5:]} {list(d.dims)}" for d in defs)

        return (f"{self.name} [{self.kind}, max_batch_size {self.max_batch_size}]\n"
                f"    in:  {tensors(self.inputs)}\n    out: {tensors(self.outputs)}")


@dataclass
class RepositoryReport:
    """What :func:`write_repository` wrote: the repository folder, its layout and its models."""

    root: Path
    layout: str
    models: list[ModelEntry]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def summary(self) -> str:
        lines = [f"wrote {self.root} ({self.layout} layout, {len(self.models)} model(s))"]
        lines += ["  " + m.describe() for m in self.models]
        return "\n".join(lines)


# -- checks ---------------------------------------------------------------------------------------
def _check_int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{what} must be an integer of at least {low}, got {value!r}")
    return value


def _instance_kind(kind: str) -> str:
    k = str(kind).upper()
    k = k if k.startswith("KIND_") else f"KIND_{k}"
    if k not in INSTANCE_KINDS:
        raise UsageError(f"instance kind must be one of {list(INSTANCE_KINDS)} (or cpu/gpu), got {kind!r}")
    return k


def _default_name(bundle: Bundle) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", bundle.root.name).strip("._-")
    return name or bundle.family


def _model_names(bundles: list[Bundle], names: Sequence[str] | None) -> list[str]:
    if names:
        names = list(names)
        if len(names) != len(bundles):
            raise UsageError(f"got {len(names)} --name for {len(bundles)} bundles; give one name per bundle or none")
    else:
        names = [_default_name(b) for b in bundles]
    for n in names:
        if not isinstance(n, str) or not _NAME.match(n):
            raise UsageError(f"model name {n!r} is not usable: use letters, digits, '_', '.' or '-'")
    seen = set()
    for n in names:
        if n in seen:
            raise UsageError(f"two bundles would be served as {n!r}; give each one a --name")
        seen.add(n)
    return names


def served_classes(bundle: Bundle) -> list[str]:
    """The class names a served model reports (detect vocabulary; segment label-map classes)."""
    if bundle.task == "segment":
        seg = bundle.section("segment")
        classes = seg.get("classes") if seg.present else None
        if isinstance(classes, list) and classes:
            return [str(c) for c in classes]
    return list(bundle.classes)


def _parameters(bundle: Bundle, extra: dict[str, str]) -> dict[str, str]:
    return {**extra, PARAM_TASK: bundle.task, PARAM_CLASSES: json.dumps(served_classes(bundle))}


def _bundle_files(bundle: Bundle, into: str, keep: Any = None) -> list[tuple[Path, str]]:
    """(source, destination) of every file of the bundle (``keep(rel)`` filters), manifest included."""
    files = [(bundle.path_of(rel), f"{into}/{rel}") for rel in bundle.meta.files if keep is None or keep(rel)]
    return files + [(bundle.manifest_path, f"{into}/{MANIFEST}")]


# -- python layout --------------------------------------------------------------------------------
def _python_model(bundle: Bundle, name: str, opts: dict[str, Any]) -> list[ModelEntry]:
    from vlexport.serve.python_model import BUNDLE_DIR

    outputs = list(outputs_for(bundle.task))
    settings = {k: "" if opts[k] is None else str(opts[k]) for k in ("backend", "precision", "threads")}
    config = cfg.python_config(name, INPUTS, outputs, max_batch_size=opts["max_batch_size"],
                               max_queue_delay_us=opts["max_queue_delay_us"],
                               preferred_batch_sizes=opts["preferred_batch_sizes"], instances=opts["instances"],
                               instance_kind=opts["instance_kind"], parameters=_parameters(bundle, settings))
    files = [(_HERE / "python_model.py", "model.py")] + _bundle_files(bundle, BUNDLE_DIR)
    return [ModelEntry(name, "python", list(INPUTS), outputs, opts["max_batch_size"], cfg.render(config), bundle.root,
                       files)]


# -- ensemble layout ------------------------------------------------------------------------------
def _ensemble_plan(bundle: Bundle) -> str:
    """The one part an ensemble serves for this bundle, or a UsageError saying why it cannot."""
    from vlexport.runtime.tasks import task_class

    cls = task_class(bundle.task, bundle.family).__name__
    part = {"DetectTask": "detector", "BinarySegmentTask": "segmenter"}.get(cls)
    resize = bundle.preprocess.get("resize", "letterbox")
    vocab_mode = (bundle.meta.vocabulary or {}).get("mode", "baked")
    if part is None or resize != "letterbox" or vocab_mode == "input" or part not in bundle.part_names:
        why = ("its vocabulary is an input (--vocab-mode input)" if part and vocab_mode == "input"
               else f"its {cls} runs its parts more than once per frame or without a letterbox")
        raise UsageError(f"{bundle.root}: --layout ensemble serves single-pass letterbox bundles (yolo, kdeov with a "
                         f"baked vocabulary, multiscale), and {why}; serve it with --layout python")
    return part


def _part_file(bundle: Bundle, part: str, precision: str | None) -> tuple[str, str, Any]:
    """(platform, bundle-relative file, engine record or None) of the part file to serve."""
    rec = bundle.part(part)
    if rec.engines:
        order = [precision] if precision else list(_GPU_ORDER)
        for p in order:
            if p in rec.engines:
                return "tensorrt_plan", rec.engines[p].file, rec.engines[p]
    order = [precision] if precision else list(_GPU_ORDER)
    for p in order:
        if p in rec.files:
            return "onnxruntime_onnx", rec.files[p], None
    raise UsageError(f"{bundle.root}: part {part!r} has no {precision or 'model'} file (it has {rec.precisions})")


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def _part_batch(bundle: Bundle, part: str, engine: Any, max_batch: int) -> int:
    """The part model's max_batch_size: >0 when every input's and output's axis 0 is dynamic, 0 for a
    fixed batch of 1 (dims then include it); a TensorRT profile caps it."""
    io = bundle.part(part).io
    first = {t.shape[0] if t.shape else None for t in (*io.inputs, *io.outputs)}
    if all(isinstance(d, str) for d in first):
        profile = (engine.profile or {}) if engine is not None else {}
        caps = [int(p[-1][0]) for p in profile.values() if p and p[-1]]
        return min([max_batch, *caps])
    if first == {1}:
        return 0
    raise UsageError(f"{bundle.root}: part {part!r} has a fixed batch {sorted(map(str, first))}; an ensemble serves "
                     "parts with a dynamic batch axis or a batch of 1")


def _tensor_defs(specs: Sequence[Any], batched: bool) -> list[TensorDef]:
    out = []
    for s in specs:
        dims = _dims(s.shape)
        out.append(TensorDef(s.name, MANIFEST_TO_TRITON[s.dtype], dims[1:] if batched else dims))
    return out


def _ensemble_models(bundle: Bundle, name: str, opts: dict[str, Any]) -> list[ModelEntry]:
    from vlexport.serve.python_model import BUNDLE_DIR

    part = _ensemble_plan(bundle)
    platform, rel, engine = _part_file(bundle, part, opts["precision"])
    mb = _part_batch(bundle, part, engine, opts["max_batch_size"])
    batched = mb > 0
    io = bundle.part(part).io
    part_in, part_out = _tensor_defs(io.inputs, batched), _tensor_defs(io.outputs, batched)
    # The cpu target's INT8 graph takes uint8 pixels: the preprocessing stage then emits them.
    calibration = bundle.meta.calibration
    pixels = (platform == "onnxruntime_onnx" and rel == bundle.part(part).files.get("int8") and calibration is not None
              and part in (calibration.extra.get("pixel_inputs") or {}))
    if pixels:
        part_in = [TensorDef(t.name, "TYPE_UINT8", t.dims) if t.name == "images" else t for t in part_in]
    lead = () if batched else (1,)
    image = TensorDef(INPUTS[0].name, INPUTS[0].data_type, lead + INPUTS[0].dims)
    geometry = TensorDef(GEOMETRY, "TYPE_FP64", lead + (7,))
    outputs = [TensorDef(d.name, d.data_type, lead + d.dims) for d in outputs_for(bundle.task)]
    names = {s: f"{name}_{s}" for s in ("preprocess", part, "postprocess")}
    common = dict(max_batch_size=mb, max_queue_delay_us=opts["max_queue_delay_us"],
                  preferred_batch_sizes=opts["preferred_batch_sizes"] if batched else None,
                  instances=opts["instances"], instance_kind=opts["instance_kind"])
    # Pre/post-processing need the manifest and the small files, not the graphs.
    graphs = {f for p in bundle.meta.parts.values() for f in (*p.files.values(), *(e.file for e in p.engines.values()))}
    small = _bundle_files(bundle, BUNDLE_DIR, keep=lambda r: r not in graphs)
    stage_py = (_HERE / "stage_model.py", "model.py")
    models = []
    pre_cfg = cfg.python_config(names["preprocess"], [image], [*part_in, geometry],
                                parameters={"stage": "preprocess", "part": part, **({"pixels": "1"} if pixels else {})},
                                **common)
    models.append(ModelEntry(names["preprocess"], "python", [image], [*part_in, geometry], mb, cfg.render(pre_cfg),
                             bundle.root, [stage_py, *small]))
    filename = Path(rel).name
    part_files = [(bundle.path_of(r), Path(r).name) for r in bundle.meta.files
                  if r == rel or (platform == "onnxruntime_onnx" and r.startswith(rel) and r != rel)]  # external data
    part_cfg = cfg.part_config(names[part], platform, part_in, part_out, model_filename=filename, **common)
    models.append(ModelEntry(names[part], platform, part_in, part_out, mb, cfg.render(part_cfg), bundle.root,
                             part_files))
    post_cfg = cfg.python_config(names["postprocess"], [*part_out, geometry], outputs,
                                 parameters={"stage": "postprocess", "part": part}, **common)
    models.append(ModelEntry(names["postprocess"], "python", [*part_out, geometry], outputs, mb, cfg.render(post_cfg),
                             bundle.root, [stage_py, *small]))
    steps = [
        (names["preprocess"], {image.name: image.name}, {**{t.name: f"{part}.{t.name}" for t in part_in},
                                                         GEOMETRY: GEOMETRY}),
        (names[part], {t.name: f"{part}.{t.name}" for t in part_in}, {t.name: f"{part}.out.{t.name}" for t in part_out}),
        (names["postprocess"], {**{t.name: f"{part}.out.{t.name}" for t in part_out}, GEOMETRY: GEOMETRY},
         {t.name: t.name for t in outputs}),
    ]
    ens_cfg = cfg.ensemble_config(name, [image], outputs, max_batch_size=mb, steps=steps,
                                  parameters=_parameters(bundle, {}))
    models.append(ModelEntry(name, "ensemble", [image], outputs, mb, cfg.render(ens_cfg), bundle.root, []))
    return models


# -- writing --------------------------------------------------------------------------------------
def write_repository(
    bundles: Sequence[str | os.PathLike | Bundle],
    out: str | os.PathLike,
    *,
    layout: str = "python",
    max_batch_size: int = 8,
    max_queue_delay_us: int = 2000,
    preferred_batch_sizes: Sequence[int] | None = None,
    instances: int = 1,
    instance_kind: str = "KIND_CPU",
    names: Sequence[str] | None = None,
    overwrite: bool = False,
    backend: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
) -> RepositoryReport:
    """Write a Triton model repository serving ``bundles`` at ``out`` and return what it holds.

    ``names`` (one per bundle; default: the bundle folders' names) name the served models.
    ``backend``, ``precision`` and ``threads`` are the runtime settings of python-layout models
    (``precision`` also picks the part file of an ensemble). An existing ``out`` needs
    ``overwrite``. Raises UsageError for bad options, BundleError for a bundle that fails its
    hashes, ExportError for a config that does not fit Triton's schema (none of them writes anything).
    """
    if layout not in LAYOUTS:
        raise UsageError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if not bundles:
        raise UsageError("give at least one bundle to serve")
    opts: dict[str, Any] = {
        "max_batch_size": _check_int(max_batch_size, "max batch size", 1),
        "max_queue_delay_us": _check_int(max_queue_delay_us, "max queue delay (µs)", 0),
        "instances": _check_int(instances, "instances", 1),
        "instance_kind": _instance_kind(instance_kind),
        "preferred_batch_sizes": None,
        "backend": backend, "precision": precision,
        "threads": None if threads is None else _check_int(threads, "threads", 1),
    }
    if preferred_batch_sizes:
        sizes = sorted({_check_int(b, "preferred batch size", 1) for b in preferred_batch_sizes})
        if sizes[-1] > max_batch_size:
            raise UsageError(f"preferred batch size {sizes[-1]} is above the max batch size {max_batch_size}")
        opts["preferred_batch_sizes"] = sizes
    if precision is not None and precision not in ("fp32", "fp16", "int8"):
        raise UsageError(f"unknown precision {precision!r}; choose one of ['fp32', 'fp16', 'int8']")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")

    opened = [b if isinstance(b, Bundle) else Bundle.open(b) for b in bundles]
    model_names = _model_names(opened, names)
    models: list[ModelEntry] = []
    for bundle, name in zip(opened, model_names):
        if bundle.task not in SERVED_TASKS:
            raise UsageError(f"{bundle.root} is a {bundle.task} bundle; Triton serves {list(SERVED_TASKS)} bundles")
        bundle.verify_all()  # every file's sha256, before anything is copied
        build = _python_model if layout == "python" else _ensemble_models
        models += build(bundle, name, opts)
    seen: set[str] = set()
    for m in models:
        if m.name in seen:
            raise UsageError(f"two models of the repository are named {m.name!r}; choose other --name values")
        seen.add(m.name)
        cfg.check_config(m.name, m.config)  # Triton's own schema, before anything is written
    _publish(models, out)
    return RepositoryReport(out, layout, models)


def _publish(models: list[ModelEntry], out: Path) -> None:
    """Stage the repository in a hidden folder beside ``out``, then rename it into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write the repository folder {out.parent}: {e.strerror or e}") from e
    try:
        for m in models:
            folder = staging / m.name
            version = folder / VERSION
            version.mkdir(parents=True)
            for src, rel in m.files:
                dst = version / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            (folder / "config.pbtxt").write_text(m.config, encoding="utf-8")
        backup = None
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, backup)
        try:
            os.replace(staging, out)
        except BaseException:
            if backup is not None:  # put the previous repository back
                os.replace(backup, out)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except OSError as e:
        raise OutputError(f"cannot write the repository {out}: {e.strerror or e}") from e
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
