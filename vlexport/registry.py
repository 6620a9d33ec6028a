"""The model families: one record per family, naming every hook the CLI, exporter, runtime and bench use.

This module imports nothing heavy (no torch, no click, no OpenCV): every hook is a
``"package.module:attr"`` string, loaded only when asked for with :func:`load_ref`. The runtime
reads :attr:`Family.tasks` from here, and ``vlexport --help`` lists :attr:`Family.summary`.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from vlexport.errors import UsageError

__all__ = ["Family", "HOOKS", "create_model", "families", "families_markdown", "get_family", "list_models", "load_ref"]

#: The hook fields of :class:`Family` (each a ``"module:attr"`` reference).
HOOKS = ("options", "build_plan", "command", "export", "eager_parts", "create_model")


def load_ref(ref: str) -> Any:
    """The object a ``"package.module:attr.sub"`` reference names (the module is imported now)."""
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"a reference reads 'package.module:attr', got {ref!r}")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    return obj


@dataclass(frozen=True)
class Family:
    """One exportable model kind and where its pieces live.

    Attributes:
        name: the family, its CLI command and its bundles' ``family``.
        summary: one line, for ``vlexport --help`` and docs.
        task: the runtime task its bundles declare (``detect``, ``segment``, ``caption``).
        presets: preset names for :func:`create_model` (each family has ``tiny``: seconds, random weights).
        options: the family's export options dataclass (every CLI option as a typed field).
        build_plan: builds the :class:`~vlexport.export.bundle_export.ExportPlan` from options.
        command: the family's CLI declaration (:class:`vlexport.export.command.FamilyCommand`).
        export: writes the bundle from the family's resolved export options.
        eager_parts: ``eager_parts(bundle) -> {part: nn.Module}``, the PyTorch rebuild of a bundle's parts.
        create_model: ``create_model(preset, **kw) -> nn.Module``.
        tasks: runtime task name -> ``"vlexport.runtime.tasks.x:Class"``.
    """

    name: str
    summary: str
    task: str
    presets: tuple[str, ...]
    options: str
    build_plan: str
    command: str
    export: str
    eager_parts: str
    create_model: str
    tasks: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", MappingProxyType(dict(self.tasks)))

    def load(self, hook: str) -> Any:
        """The object behind one hook, e.g. ``family.load("options")``."""
        if hook not in HOOKS:
            raise ValueError(f"unknown hook {hook!r}; the hooks are {', '.join(HOOKS)}")
        return load_ref(getattr(self, hook))


_DETECT = "vlexport.runtime.tasks.detect:DetectTask"
_SEGMENT = "vlexport.runtime.tasks.segment:SegmentTask"


def _family(name: str, summary: str, task: str, presets: tuple[str, ...], tasks: Mapping[str, str],
            create_model: str) -> Family:
    module = f"vlexport.export.{name}"
    return Family(name=name, summary=summary, task=task, presets=presets, options=f"{module}:Options",
                  build_plan=f"{module}:build_plan", command=f"{module}:COMMAND", export=f"{module}:export",
                  eager_parts=f"{module}:eager_parts", create_model=create_model, tasks=tasks)


# In the order of the README; `vlexport --help` sorts them with the other commands.
_FAMILIES: dict[str, Family] = {f.name: f for f in (
    _family("kdeov", "Export a KDEOV open-vocabulary detector (a YOLO student distilled from CLIP).",
            "detect", ("tiny", "yolov8n-vitb32", "yolov5s-vitb32"), {"detect": _DETECT},
            "vlexport.export.kdeov:create_model"),
    _family("yolo", "Export an Ultralytics YOLOv8/YOLOv5u detection checkpoint (closed vocabulary).",
            "detect", ("tiny", "yolov8n", "yolov5s"), {"detect": _DETECT},
            "vlexport.export.yolo:create_model"),
    _family("sclip", "Export SCLIP open-vocabulary segmentation (text embeddings baked in).",
            "segment", ("tiny", "vit-b16", "vit-l14-336"), {"segment": _SEGMENT},
            "vlexport.models.sclip.model:SCLIPSegmenter.from_preset"),
    _family("captioner", "Export the CLIP + GPT-2 captioner (encoder and KV-cache decoder parts).",
            "caption", ("tiny", "vitb32-gpt2"), {"caption": "vlexport.runtime.tasks.caption:CaptionTask"},
            "vlexport.models.captioner.model:build_captioner"),
    _family("detr", "Export DETR (set-prediction detection, masks too for segmentation models).",
            "detect", ("tiny", "tiny-segm", "r50", "r50-dc5", "r101", "r101-dc5", "r50-panoptic",
                       "r50-dc5-panoptic", "r101-panoptic"),
            {"detect": "vlexport.runtime.tasks.detr:DetrTask"}, "vlexport.models.detr.model:build_detr"),
    _family("multiscale", "Export the multi-scale binary segmenter (scales and fusion in one graph).",
            "segment", ("tiny", "r50"), {"segment": "vlexport.runtime.tasks.binary_segment:BinarySegmentTask"},
            "vlexport.models.multiscale.model:build_multiscale"),
)}


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())


def get_family(name: str) -> Family:
    """The family called ``name``, or a UsageError listing the known ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UsageError(f"unknown model family {name!r}; choose one of {', '.join(sorted(_FAMILIES))}") from None


def list_models(pattern: str = "*") -> list[str]:
    """Every ``family/preset`` name matching a glob pattern, e.g. ``list_models("kdeov/*")``."""
    names = [f"{f.name}/{p}" for f in _FAMILIES.values() for p in f.presets]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def create_model(name: str, preset: str = "tiny", **kwargs: Any) -> Any:
    """Build a family's PyTorch model from a preset: ``create_model("kdeov", "tiny")`` or ``"kdeov/tiny"``.

    A preset in the name wins over ``preset``; an empty one (``"kdeov/"`` or ``preset=""``) is an error.
    Needs the export extra (torch); returns an ``nn.Module``.
    """
    family_name, slash, named = name.partition("/")
    family = get_family(family_name)
    preset = named if slash else preset
    if not preset:
        raise UsageError(f"name a preset: {', '.join(f'{family.name}/{p}' for p in family.presets)}")
    if preset not in family.presets:
        raise UsageError(f"unknown {family.name} preset {preset!r}; choose one of {', '.join(family.presets)}")
    return family.load("create_model")(preset, **kwargs)


def families_markdown() -> str:
    """The family table of ``docs/families.md``, written from the registry (a test keeps the file current)."""
    lines = ["# Model families", "",
             "Generated from `vlexport/registry.py` (see CONTRIBUTING.md); each family is `vlexport NAME --help`.", "",
             "| family | task | presets | runtime tasks | summary |", "|---|---|---|---|---|"]
    for f in families():
        tasks = ", ".join(f"{name}: `{ref.rpartition(':')[2]}`" for name, ref in f.tasks.items())
        lines.append(f"| `{f.name}` | {f.task} | {', '.join(f'`{p}`' for p in f.presets)} | {tasks} | {f.summary} |")
    return "\n".join(lines) + "\n"
