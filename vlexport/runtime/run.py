"""`vlexport run` as one library call: a :class:`RunRequest`, checked once, and :func:`run_bundles`.

>>> from vlexport.runtime.run import RunRequest, run_bundles
>>> stats = run_bundles(RunRequest(source="traffic.mp4", detect="bundles/yolo", caption="bundles/cap",
...                                caption_every_s=2.0, save="out.mp4", jsonl="out.jsonl"))

:meth:`RunRequest.plan` is the one place a request is checked and each bundle given its role
(reading the manifests, loading nothing): a bad combination is one UsageError line.
:func:`run_bundles` then loads the tasks, opens the source, and drives a
:class:`~vlexport.runtime.pipeline.Pipeline` with the sinks asked for (see :func:`run_tasks`).
:func:`run_on_source` does the same for task objects that are open already.

A served model takes a role too: ``RunRequest(source=..., server="127.0.0.1:8000", model="yolo")``
runs the model a Triton server serves (``vlexport serve``) in the role its task names, through the
same pipeline, sinks and statistics, with the round trip as the ``network`` stage. The remote task
class is named by reference (:data:`REMOTE_TASK_REF`, imported only then): the runtime does not
import the serving layer above it.

Ctrl-C: the video and JSONL are closed complete (every frame processed so far), ``stats_json`` is
written, and the KeyboardInterrupt is re-raised carrying ``.stats``; any other error discards
the outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlexport.errors import UsageError
from vlexport.runtime.bundle import Bundle
from vlexport.runtime.pipeline import ROLES, Pipeline, TaskSlot, role_slots, task_kind
from vlexport.runtime.sinks import AnnotatedSink, JsonlSink, RecordSink, WindowSink, check_display, open_frame_sink
from vlexport.runtime.sources import IMAGE_EXTS, Frame, ImageSource, Source, open_source
from vlexport.runtime.stats import PipelineStats

__all__ = ["RunRequest", "RunPlan", "run_bundles", "run_tasks", "run_on_source", "REMOTE_TASK_REF"]

#: The task class of a served model: ``RemoteTask(url, model, protocol, encoding=...)``.
REMOTE_TASK_REF = "vlexport.serve.client:RemoteTask"

PathLike = str | os.PathLike
_DETECT_OPTIONS = ("score_threshold", "iou_threshold", "max_detections")


@dataclass(frozen=True)
class RunPlan:
    """A checked request: each role's bundle (opened, not loaded), its task options, and the vocabulary."""

    bundles: dict[str, Bundle]
    paths: dict[str, Path]
    overrides: dict[str, dict[str, Any]]
    classes: list[str] | None


@dataclass
class RunRequest:
    """Everything `vlexport run` takes; the field names follow its options.

    ``bundle`` runs in the role its manifest names; ``detect`` (every frame), ``segment`` (every
    ``segment_every`` frames) and ``caption`` (every ``caption_every_s`` seconds of acquisition
    time, or every ``caption_every_frames`` frames; a folder of images: every image unless
    ``caption_every_frames`` says otherwise) share the stream. ``classes`` (a list, or one
    comma-separated string) replaces a ``--vocab-mode input`` detection bundle's vocabulary.
    ``save`` (annotated video, or image for one image), ``jsonl`` (a record per frame) and
    ``stats_json`` are the outputs; ``show`` opens a window. ``realtime`` reads a video file as a
    live source; ``reconnect`` reopens a dropped live stream. ``server`` (``host:port``) and
    ``model`` run a model a Triton server serves, in the role of its task, over ``protocol``
    (``http`` or ``grpc``), frames sent as ``encoding`` (``bgr``: raw, exact; ``jpeg``; ``png``).
    """

    source: str | int | os.PathLike
    bundle: PathLike | None = None
    detect: PathLike | None = None
    segment: PathLike | None = None
    caption: PathLike | None = None
    segment_every: int = 1
    caption_every_s: float = 2.0
    caption_every_frames: int | None = None
    save: PathLike | None = None
    jsonl: PathLike | None = None
    stats_json: PathLike | None = None
    precision: str | None = None
    backend: str | None = None
    threads: int | None = None
    score_threshold: float | None = None
    iou_threshold: float | None = None
    max_detections: int | None = None
    max_length: int | None = None
    classes: str | Sequence[str] | None = None
    track: bool = False
    realtime: bool = False
    reconnect: bool = True
    max_frames: int | None = None
    show: bool = False
    progress: bool = True
    server: str | None = None
    model: str | None = None
    protocol: str = "http"
    encoding: str = "bgr"

    def plan(self) -> RunPlan:
        """Check the request and give each bundle its role; a UsageError (one line) names the first problem.

        Opens (verifies) the bundles' manifests; loads no model and opens no source. ``show``
        without a display is an OutputError here, before anything is loaded.
        """
        for name, low in (("segment_every", 1), ("caption_every_frames", 1), ("max_frames", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise UsageError(f"--{name.replace('_', '-')} must be an integer of at least {low}, got {value!r}")
        if not isinstance(self.caption_every_s, (int, float)) or self.caption_every_s < 0:
            raise UsageError(f"--caption-every must be zero or more seconds, got {self.caption_every_s!r}")
        paths: dict[str, Path | None] = {role: _path(getattr(self, role)) for role in ROLES}
        bundles: dict[str, Bundle] = {}
        if self.bundle is not None:
            main = Bundle.open(self.bundle)
            if main.task not in ROLES:
                raise UsageError(f"{self.bundle} is a {main.task} bundle; "
                                 "`run` takes detect, segment and caption bundles")
            if paths[main.task] is not None:
                raise UsageError(f"two {main.task} bundles: {self.bundle} and --{main.task} {paths[main.task]}")
            paths[main.task] = Path(self.bundle)
            bundles[main.task] = main
        if (self.server is None) != (self.model is None):
            raise UsageError("--server and --model come together: the server's address and the model's name")
        if self.protocol not in ("http", "grpc"):
            raise UsageError(f"--protocol must be http or grpc, got {self.protocol!r}")
        if not any(paths.values()) and self.server is None:
            raise UsageError("give a BUNDLE, or --detect/--segment/--caption bundles, or --server URL --model NAME")
        detect_overrides = {k: getattr(self, k) for k in _DETECT_OPTIONS if getattr(self, k) is not None}
        if detect_overrides and paths["detect"] is None:
            raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in detect_overrides)} apply to detection: "
                             "give a detection bundle")
        if self.max_length is not None and paths["caption"] is None:
            raise UsageError("--max-length applies to captioning: give a captioner bundle")
        classes = None
        if self.classes is not None:
            if paths["detect"] is None:
                raise UsageError("--classes applies to detection: give a detection bundle")
            classes = _class_names(self.classes)
        if self.track and paths["detect"] is None:
            raise UsageError("--track needs a detection bundle")
        if self.show:
            check_display()
        for role, path in paths.items():
            if path is not None and role not in bundles:
                bundles[role] = Bundle.open(path)
                if bundles[role].task != role:
                    raise UsageError(f"--{role} {path} is a {bundles[role].task} bundle")
        overrides = {"detect": detect_overrides, "segment": {},
                     "caption": {"max_length": self.max_length} if self.max_length is not None else {}}
        return RunPlan(bundles={r: bundles[r] for r in ROLES if r in bundles},
                       paths={r: p for r, p in paths.items() if p is not None}, overrides=overrides, classes=classes)


def _path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(value)


def _class_names(classes: str | Sequence[str]) -> list[str]:
    from vlexport.runtime.text_encoder import check_class_names

    if isinstance(classes, str):  # the command line's "forklift, pallet"
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    return check_class_names(classes)


def run_bundles(request: RunRequest) -> PipelineStats:
    """Run ``request`` (see :class:`RunRequest`): load the tasks, run them over the source, write the outputs.

    Returns the statistics (also written to ``request.stats_json``). The tasks and the source are
    closed at the end, whatever happens.
    """
    from vlexport.atomic import write_json_atomic
    from vlexport.runtime import load

    plan = request.plan()
    tasks: dict[str, Any] = {}
    src: Source | None = None
    try:
        for role, bundle in plan.bundles.items():
            tasks[role] = load(bundle, precision=request.precision, backend=request.backend,
                               threads=request.threads, **plan.overrides[role])
        if request.server is not None:
            _add_remote(tasks, request)
        if plan.classes is not None:
            det = tasks["detect"]
            if not callable(getattr(det, "set_vocabulary", None)):
                raise UsageError(f"{plan.paths['detect']}: this {det.bundle.family} bundle has a fixed vocabulary; "
                                 "--classes needs a kdeov bundle exported with --vocab-mode input")
            det.set_vocabulary(plan.classes)  # a baked bundle or no text_encoder: one clear error
        tracker = None
        if request.track:
            from vlexport.runtime.tracking import Tracker

            tracker = Tracker()
        src = open_source(request.source, realtime=request.realtime, reconnect=request.reconnect)
        slots = role_slots(tasks.get("detect"), tasks.get("segment"), tasks.get("caption"),
                           segment_every=request.segment_every, caption_every_s=request.caption_every_s,
                           caption_every_frames=_caption_every_frames(src, request.caption_every_frames))
        try:
            stats = run_tasks(slots, src, save=request.save, jsonl=request.jsonl, progress=request.progress,
                              show=request.show, max_frames=request.max_frames, tracker=tracker)
        except KeyboardInterrupt as e:
            stats = getattr(e, "stats", None)
            if stats is not None and request.stats_json is not None:
                write_json_atomic(request.stats_json, stats.to_dict())
            raise
        if request.stats_json is not None:
            write_json_atomic(request.stats_json, stats.to_dict())
        return stats
    finally:
        if src is not None:
            src.close()
        for task in tasks.values():
            task.close()


def _add_remote(tasks: dict[str, Any], request: RunRequest) -> None:
    """Open the served model (reads its config from the server) and give it the role of its task."""
    from vlexport.registry import load_ref

    remote = load_ref(REMOTE_TASK_REF)(request.server, request.model, request.protocol, encoding=request.encoding)
    role = task_kind(remote)
    if role not in ROLES:
        remote.close()
        raise UsageError(f"model {request.model!r} is a {role} model; `run` takes detect, segment and caption")
    if role in tasks:
        remote.close()
        raise UsageError(f"two {role} tasks: a bundle and the served model {request.model!r}")
    tasks[role] = remote


def _caption_every_frames(src: Source, every_frames: int | None) -> int | None:
    # A folder of photos is not a stream: every photo is captioned unless told otherwise.
    return 1 if every_frames is None and isinstance(src, ImageSource) else every_frames


def run_tasks(slots: list[TaskSlot], src: Source, *, save: PathLike | None = None, jsonl: PathLike | None = None,
              progress: bool = True, show: bool = False, max_frames: int | None = None, tracker: Any = None,
              on_result: Callable[[Any], None] | None = None) -> PipelineStats:
    """Drive a :class:`Pipeline` of ``slots`` over the open ``src`` into the sinks asked for; returns the stats.

    ``save`` is an annotated video (an image when it has an image suffix and ``src`` is one image),
    ``jsonl`` one record per frame, ``show`` a window (q or Esc stops). The caller closes ``src``.
    """
    if save is not None and Path(save).suffix.lower() in IMAGE_EXTS and src.len_hint() != 1:
        raise UsageError(f"--save {save} is an image path but the source {src.spec!r} has more than one frame; "
                         "give a video path such as out.mp4")
    sinks: list[Any] = []
    try:
        if save is not None:
            sinks.append(AnnotatedSink(open_frame_sink(save, fps=src.fps)))
        if jsonl is not None:
            sinks.append(RecordSink(JsonlSink(jsonl)))
        pipe = Pipeline(src, tasks=slots, sinks=sinks, on_result=on_result, tracker=tracker, max_frames=max_frames)
        if show:
            sinks.append(WindowSink(str(src.spec), pipe.stop))
        return pipe.run(progress=progress)
    except KeyboardInterrupt:
        for sink in sinks:  # complete files with what was done (idempotent: the pipeline closed its own)
            sink.close()
        raise
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise


def run_on_source(
    task: Any,
    source: str | int | os.PathLike | Source,
    *,
    save: PathLike | None = None,
    jsonl: PathLike | None = None,
    progress: bool = True,
    show: bool = False,
    max_frames: int | None = None,
    on_result: Callable[[Frame, Any], None] | None = None,
    caption: Any = None,
    caption_every_s: float | None = 2.0,
    caption_every_frames: int | None = None,
    segment: Any = None,
    segment_every: int = 1,
    tracker: Any = None,
) -> PipelineStats:
    """Run an open task (detect, segment or caption) over ``source`` with the sinks asked for; returns the stats.

    :func:`run_tasks` for task objects: ``task`` takes the role its method names, ``segment=`` /
    ``caption=`` add tasks at their own rates (as in :class:`RunRequest`). ``on_result(frame,
    result)`` gets ``task``'s result (``None`` on frames it did not run). A spec ``source`` is
    opened and closed here; an open :class:`Source` is left open.
    """
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise UsageError(f"max_frames must be a positive integer, got {max_frames!r}")
    kind = task_kind(task)
    roles: dict[str, Any] = {"detect": None, "segment": segment, "caption": caption}
    if roles[kind] is not None:
        raise UsageError(f"two {kind} tasks given; pass the second one as a TaskSlot to Pipeline")
    roles[kind] = task
    if show:
        check_display()
    src = source if isinstance(source, Source) else open_source(source)
    try:
        slots = role_slots(roles["detect"], roles["segment"], roles["caption"], segment_every=segment_every,
                           caption_every_s=caption_every_s,
                           caption_every_frames=_caption_every_frames(src, caption_every_frames))
        callback = None
        if on_result is not None:
            callback = lambda fr: on_result(fr.frame, fr.results.get(kind))  # noqa: E731
        return run_tasks(slots, src, save=save, jsonl=jsonl, progress=progress, show=show, max_frames=max_frames,
                         tracker=tracker, on_result=callback)
    finally:
        if not isinstance(source, Source):
            src.close()
