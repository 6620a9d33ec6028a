"""`vlexport bench`'s measurements on the runtime, and :func:`run_bench`, which runs them all.

For the bundle's main part and every backend and precision that runs here: the graph's latency
on the feeds the task gives it for the frame (and at a larger batch when its batch axis is
dynamic), and the task's end-to-end call; then a captioner's decode, the PyTorch eager rows
(:mod:`vlexport.bench.torch_eager`) and, with a source, the pipeline on it. Each backend is
loaded only while it is measured.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from vlexport.bench.decode import bench_decoder, ort_chains
from vlexport.bench.feeds import Feeds, Recorded, backend_of, frame_fn, record, replay, tile
from vlexport.bench.frames import first_frame
from vlexport.bench.options import DEFAULT_BATCH, BenchOptions
from vlexport.bench.report import BenchReport, BenchRow
from vlexport.bench.timing import measure
from vlexport.bench.torch_eager import bench_torch
from vlexport.errors import UsageError, VlexportError
from vlexport.runtime.bundle import PRECISIONS, Bundle, PartRecord

__all__ = ["run_bench"]

log = logging.getLogger("vlexport")


# -- choosing what to measure ----------------------------------------------------------------
def _precisions_for(info: PartRecord, backend: str, wanted: Sequence[str]) -> list[str]:
    from vlexport.runtime.backends import part_precisions

    have = part_precisions(info, backend)
    return [p for p in have if not wanted or p in wanted]


def _backends(options: BenchOptions) -> tuple[list[str], list[dict[str, Any]], list[dict[str, str]]]:
    """(backends to measure, describe_backends(), skipped entries for those that cannot run here)."""
    from vlexport.runtime.backends import describe_backends, resolve_backend

    described = describe_backends()
    if options.backends:
        for b in options.backends:
            resolve_backend(b)  # a named backend that cannot run here is the user's error: say why
        return list(dict.fromkeys(options.backends)), described, []
    usable = [d["name"] for d in described if d.get("available")]
    skipped = [{"what": d["name"], "reason": str(d.get("reason"))} for d in described if not d.get("available")]
    return usable, described, skipped


def _check_precisions(bundle: Bundle, info: PartRecord, backends: list[str], wanted: Sequence[str]) -> None:
    from vlexport.runtime.backends import part_precisions

    have = sorted({p for b in backends for p in part_precisions(info, b)}, key=PRECISIONS.index)
    missing = [p for p in wanted if p not in have]
    if missing:
        raise UsageError(f"{bundle.root}: part {info.name!r} cannot run in {', '.join(missing)} on "
                         f"{', '.join(backends)}; it has {', '.join(have)}")


def _batch_for(info: PartRecord, requested: int | None) -> int | None:
    """The batch of the throughput measurement: None when the graph's batch is fixed (or 1 is asked)."""
    first = info.io.inputs[0].shape[0] if info.io.inputs and info.io.inputs[0].shape else None
    dynamic = isinstance(first, str)
    if requested is not None and not dynamic and requested != first:
        raise UsageError(f"--batch {requested}: part {info.name!r} was exported with a fixed batch of {first}; "
                         "export it with --dynamic-batch to measure other batches")
    k = requested if requested is not None else (DEFAULT_BATCH if dynamic else None)
    return k if k is not None and k > 1 else None


# -- one task: every device it can run on ----------------------------------------------------
def _device_backends(task: Any, backend: str, threads: int | None) -> Iterator[tuple[Any, str | None]]:
    """(backend object, note) per device to measure; extra onnxruntime sessions are closed after use."""
    if backend != "onnxruntime":
        yield task.backend, None
        return
    from vlexport.runtime.backends.onnxruntime import OrtBackend

    for i, chain in enumerate(ort_chains()):
        if i == 0:
            yield task.backend, None  # the task's own session has every usable provider, best first
            continue
        try:
            other = OrtBackend(task.model_path, providers=chain, threads=threads)
        except VlexportError as e:
            yield None, f"{chain[0]}: {e}"
            continue
        try:
            yield other, None
        finally:
            other.close()


def _measure_row(task: Any, runner: Any, backend_name: str, calls: list[Feeds], frame: np.ndarray,
                 options: BenchOptions, batch: int | None) -> BenchRow:
    info = task.part
    row = BenchRow(backend_name, runner.device, task.precision, info.name, threads=options.threads)
    log.info("bench: %s …", row.label)
    row.latency = measure(lambda: replay(runner, calls), options.runs, options.warmup)
    if batch:
        tiled = tile(calls, info, batch)
        limit = getattr(runner, "max_batch", None)
        if limit is not None and any(x.shape[0] > limit for f in tiled for x in f.values()):
            row.note = f"batch {batch} exceeds the engine's max batch {limit}"
        else:
            row.batch = batch
            row.batched = measure(lambda: replay(runner, tiled), options.runs, options.warmup, items=batch)
    run_frame = frame_fn(task)
    stages: list[dict[str, float]] = []

    def end_to_end() -> None:
        run_frame(frame)
        stages.append(dict(task.timings))

    with backend_of(task, runner):
        row.end_to_end = measure(end_to_end, options.runs, options.warmup)
    timed = stages[options.warmup:]
    keys = [k for k in ("preprocess", "infer", "postprocess") if all(k in s for s in timed)]
    row.stages_ms = {k: round(float(np.mean([s[k] for s in timed])), 4) for k in keys} if timed else None
    return row


def _bench_runtime(bundle: Bundle, info: PartRecord, backends: list[str], frame: np.ndarray, options: BenchOptions,
                   batch: int | None, rows: list[BenchRow], skipped: list[dict[str, str]]) -> Recorded:
    from vlexport import runtime

    recorded = Recorded()
    for backend in backends:
        precisions = _precisions_for(info, backend, options.precisions)
        if not precisions:
            skipped.append({"what": backend, "reason": f"no {'/'.join(options.precisions)} model for part {info.name!r}"})
        for precision in precisions:
            try:
                task = runtime.load(bundle, precision=precision, backend=backend, threads=options.threads)
            except VlexportError as e:  # one combination that cannot load here must not hide the others
                skipped.append({"what": f"{backend} {precision}", "reason": str(e)})
                log.warning("bench: %s %s skipped: %s", backend, precision, e)
                continue
            try:
                calls = record(task, frame)
                if recorded.calls is None or (precision == "fp32" and recorded.precision != "fp32"):
                    recorded.calls, recorded.precision = calls, precision
                if bundle.task == "caption" and recorded.prefix is None:
                    recorded.prefix = np.asarray(task.encode(frame)[0]["prefix"])[None]
                    recorded.caption_settings = dict(task.settings)
                for runner, problem in _device_backends(task, backend, options.threads):
                    if runner is None:
                        skipped.append({"what": f"{backend} {precision}", "reason": str(problem)})
                        continue
                    row = _measure_row(task, runner, backend, calls, frame, options, batch)
                    if bundle.task == "caption":
                        e2e = (f"e2e: encode + the task's own decode (at most {task.settings['max_length']} tokens, "
                               "stops at the end token)")
                        row.note = f"{row.note}; {e2e}" if row.note else e2e
                    rows.append(row)
            finally:
                task.close()
    return recorded


# -- video -----------------------------------------------------------------------------------
def _bench_video(bundle: Bundle, frame: np.ndarray, options: BenchOptions) -> dict[str, Any]:
    """The pipeline on the source with the task a user gets (or the one restricted to), warmed up first."""
    from vlexport import runtime
    from vlexport.runtime.run import run_on_source

    precision = options.precisions[0] if len(options.precisions) == 1 else None
    backend = options.backends[0] if len(options.backends) == 1 else None
    task = runtime.load(bundle, precision=precision, backend=backend, threads=options.threads)
    try:
        for _ in range(options.warmup):
            frame_fn(task)(frame)
        where = {"backend": task.backend.name, "device": task.backend.device, "precision": task.precision}
        log.info("bench: the pipeline on %s (%s %s) …", options.source, where["backend"], where["precision"])
        stats = run_on_source(task, options.source, progress=False, max_frames=options.max_frames)
    finally:
        task.close()
    # The attributes every run_on_source stats object has; the full record goes under "stats".
    return {"source": options.source, **where, "frames": int(stats.frames), "seconds": round(float(stats.seconds), 4),
            "fps": round(float(stats.fps), 3), "latency_ms": dict(stats.latency_ms), "stats": stats.to_dict()}


# -- the whole bench -------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpus": os.cpu_count()}


def run_bench(bundle_path: str | os.PathLike | Bundle, options: BenchOptions | None = None) -> BenchReport:
    """Measure a bundle's main part on every backend and precision that runs here (see the module doc).

    User mistakes (a missing bundle, an unreadable source, a precision the bundle lacks, a batch a
    fixed-batch graph cannot take, a named backend that cannot run here) raise before anything is
    measured. A combination that fails to load (e.g. an engine build) is listed in ``skipped``.
    """
    from vlexport.runtime.tasks import task_class

    options = options or BenchOptions()
    options.check()
    bundle = bundle_path if isinstance(bundle_path, Bundle) else Bundle.open(bundle_path)
    part = task_class(bundle.task, bundle.family).part_name
    info = bundle.part(part)
    backends, described, skipped = _backends(options)
    _check_precisions(bundle, info, backends, options.precisions)
    batch = _batch_for(info, options.batch)
    frame, frame_source, live = first_frame(options.source)
    if live and options.max_frames is None:
        raise UsageError(f"the source {options.source!r} is live and has no end: pass --max-frames for the video run")

    rows: list[BenchRow] = []
    recorded = _bench_runtime(bundle, info, backends, frame, options, batch, rows, skipped)
    if bundle.task == "caption":
        bench_decoder(bundle, recorded, options, rows, skipped)
    machine = _machine()
    torch_info = bench_torch(bundle, part, recorded, options, batch, rows)
    if torch_info:
        machine.update(torch_info)
    video = _bench_video(bundle, frame, options) if options.source is not None else None
    return BenchReport(
        bundle=str(bundle.root), name=bundle.root.name, family=bundle.family, task=bundle.task,
        preset=bundle.manifest.get("preset"), part=part, options=options,
        frame={"source": frame_source, "height": int(frame.shape[0]), "width": int(frame.shape[1]),
               "pytorch_feeds_from": recorded.precision},
        backends=described, rows=rows, skipped=skipped, video=video, machine=machine,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


