"""Several tasks on one stream, with decoding, inference and output overlapped.

A :class:`Pipeline` reads a source, runs its tasks on the frames at their own rates and hands
each frame, with the results computed on it, to its sinks, a callback or a generator::

    pipe = Pipeline("traffic.mp4", detect=load("bundles/yolo"), segment=load("bundles/seg"),
                    caption=load("bundles/cap"), segment_every=5, caption_every_s=2.0)
    for r in pipe:                       # in frame order
        r.frame.index, r.results.get("detect"), r.latest.get("caption")

Stages and threads (onnxruntime and OpenCV release the GIL, so threads overlap for real; the
benchmarks compare this with a sequential loop):

* **decode** — a file is decoded (and, for detection, letterboxed) a few frames ahead on a
  prefetch thread (bounded queue, nothing dropped); a live source has its own reader thread that
  keeps only the newest frame.
* **inference** — the loop thread runs the every-frame tasks inline; a task scheduled less often
  (every k frames or every N seconds) runs on its own worker (:class:`BackgroundTask`) so it never
  holds the others up.
* **output** — an output thread draws and writes each frame. A frame with a background job in
  flight waits there (later frames keep flowing through inference) until the job's result comes
  back, so every result is attached to the frame it was computed on, in frame order.

Statistics (:class:`~vlexport.runtime.stats.PipelineStats`, in ``stats.py``): frames read,
processed and dropped, FPS, and p50/p90/p99 latencies of decode, pre-process, inference,
post-process, the network round trip of a served model (a remote task's ``network`` timing)
and end to end (acquisition to the result leaving the output stage).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlexport.errors import UsageError
from vlexport.runtime.results import FrameResult
from vlexport.runtime.schedule import BackgroundTask
from vlexport.runtime.stats import PipelineStats

log = logging.getLogger("vlexport")

# FrameResult (results.py) and PipelineStats (stats.py) are re-exported: this is where users meet them.
__all__ = ["Pipeline", "TaskSlot", "FrameResult", "PipelineStats", "task_kind", "role_slots", "ROLES"]

#: The task roles of a stream, in the order their slots run.
ROLES = ("detect", "segment", "caption")

_STAGES = ("decode", "preprocess", "infer", "network", "postprocess", "end_to_end")
_TASK_STAGES = ("preprocess", "infer", "postprocess")
#: Stages only some tasks report (a served model's round trip): in the table only when measured.
_OPTIONAL_STAGES = ("network",)
_END = object()


def task_kind(task: Any) -> str:
    """``"detect"``, ``"segment"`` or ``"caption"``: which method a task object offers."""
    for kind in ("caption", "detect", "segment"):
        if callable(getattr(task, kind, None)):
            return kind
    raise UsageError(f"{type(task).__name__} has no detect, segment or caption method")


@dataclass
class TaskSlot:
    """One task on the stream: every frame (``every_frames=1``), every k frames, or every N seconds.

    ``kind`` (detect, segment or caption: the method called) is found from the task when not given.
    """

    name: str
    task: Any
    every_frames: int | None = 1
    every_s: float | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.kind is None:
            self.kind = task_kind(self.task)
        elif not callable(getattr(self.task, self.kind, None)):
            raise UsageError(f"task {self.name!r}: {type(self.task).__name__} has no {self.kind} method")
        if self.every_s is not None:
            self.every_frames = None
        if self.every_frames is None and self.every_s is None:
            raise UsageError(f"task {self.name!r}: give every_frames or every_s")
        if self.every_frames is not None and self.every_frames < 1:
            raise UsageError(f"task {self.name!r}: every_frames must be at least 1, got {self.every_frames}")
        if self.every_s is not None and self.every_s < 0:
            raise UsageError(f"task {self.name!r}: every_s must be zero or positive, got {self.every_s}")

    @property
    def inline(self) -> bool:
        """Every-frame tasks run in the inference loop; the others on a worker of their own."""
        return self.every_frames == 1


def role_slots(detect: Any = None, segment: Any = None, caption: Any = None, *, segment_every: int = 1,
               caption_every_s: float | None = 2.0, caption_every_frames: int | None = None) -> list[TaskSlot]:
    """The slots of the three roles: detect every frame, segment every ``segment_every`` frames,
    caption every ``caption_every_frames`` frames when given, else every ``caption_every_s`` seconds."""
    slots = []
    if detect is not None:
        slots.append(TaskSlot("detect", detect, kind="detect"))
    if segment is not None:
        slots.append(TaskSlot("segment", segment, every_frames=segment_every, kind="segment"))
    if caption is not None:
        slots.append(TaskSlot("caption", caption, every_frames=caption_every_frames,
                              every_s=None if caption_every_frames else caption_every_s, kind="caption"))
    return slots


def latency_percentiles(values: Sequence[float], decimals: int = 3) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation) of latencies in ms, rounded (3 decimals: µs)."""
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90, 99])
    return {"p50": round(float(p50), decimals), "p90": round(float(p90), decimals), "p99": round(float(p99), decimals)}


def percentiles(samples: Mapping[str, list[float]]) -> dict[str, dict[str, float]]:
    """:func:`latency_percentiles` of every non-empty sample list."""
    return {stage: latency_percentiles(values) for stage, values in samples.items() if values}


class _Prefetch:
    """Decodes a file source (and pre-processes for the tasks that can take it) ahead, on a thread.

    Bounded: nothing is dropped. Yields ``(frame, {task name: prepared input})``.
    """

    def __init__(self, source: Any, depth: int, decode_ms: list[float], preparers: dict[str, Any] | None = None):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._source = source
        self._decode_ms = decode_ms
        self._preparers = preparers or {}
        self._thread = threading.Thread(target=self._run, name="vlexport-decode", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        it = iter(self._source)
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    frame = next(it)
                except StopIteration:
                    break
                self._decode_ms.append((time.perf_counter() - t0) * 1000.0)
                prepared = {name: prepare(frame.image) for name, prepare in self._preparers.items()}
                if not self._put((frame, prepared)):
                    return
        except BaseException as e:  # surfaced in the loop thread
            self._put(e)
            return
        self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Pipeline:
    """Run detection, segmentation and captioning (any of them) on one source; see the module doc.

    Args:
        source: a spec for :func:`vlexport.runtime.sources.open_source` or an open source.
        tasks: extra or explicit :class:`TaskSlot` s; ``detect``/``segment``/``caption`` are shortcuts
            (detect every frame, segment every ``segment_every`` frames, caption every
            ``caption_every_s`` seconds of acquisition time or every ``caption_every_frames``).
        sinks: objects with ``write(FrameResult)`` and ``close()``/``abort()`` (see ``sinks.py``).
        on_result: called with each :class:`FrameResult` on the output thread.
        tracker: an object with ``update(Detections) -> Detections`` applied to ``detect`` results.
        max_frames: stop after this many frames.
        prefetch: frames decoded ahead for file sources.
        max_pending: most frames held while background results are awaited (the stream waits beyond).
    """

    def __init__(self, source: Any, *, detect: Any = None, segment: Any = None, caption: Any = None,
                 segment_every: int = 1, caption_every_s: float | None = 2.0, caption_every_frames: int | None = None,
                 tasks: list[TaskSlot] | None = None, sinks: list[Any] | None = None,
                 on_result: Callable[[FrameResult], None] | None = None, tracker: Any = None,
                 max_frames: int | None = None, prefetch: int = 4, max_pending: int = 256):
        shortcuts = role_slots(detect, segment, caption, segment_every=segment_every,
                               caption_every_s=caption_every_s, caption_every_frames=caption_every_frames)
        # detect runs first, before explicit slots; segment and caption come after them
        head = [s for s in shortcuts if s.name == "detect"]
        slots = head + list(tasks or []) + [s for s in shortcuts if s.name != "detect"]
        if not slots:
            raise UsageError("a pipeline needs at least one task (detect, segment or caption)")
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            raise UsageError(f"task names must be unique, got {names}")
        if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
            raise UsageError(f"max_frames must be a positive integer, got {max_frames!r}")
        self.slots = slots
        self.source_spec = source
        self.sinks = list(sinks or [])
        self.on_result = on_result
        self.tracker = tracker
        self.max_frames = max_frames
        self.prefetch = prefetch
        self.max_pending = max_pending
        self.stats = PipelineStats()
        self._stop = threading.Event()

    # -- frame by frame (a robot's own loop) ----------------------------------------------
    def process(self, image: np.ndarray, stamp: Any = None) -> dict[str, Any]:
        """Run every task on one frame now and return ``{task name: result}`` (no threads, no sinks).

        For a loop that owns its frames (a ROS callback, a robot's control loop). Tasks
        scheduled less often are the caller's business here: call this with what is due.
        """
        out = {}
        for slot in self.slots:
            result = getattr(slot.task, slot.kind)(image, stamp)
            if slot.kind == "detect" and self.tracker is not None:
                result = self.tracker.update(result)
            out[slot.name] = result
        return out

    def stop(self) -> None:
        """Ask a running pipeline to finish after the current frame (thread-safe)."""
        self._stop.set()

    # -- streaming ------------------------------------------------------------------------
    def run(self, progress: bool = False) -> PipelineStats:
        """Process the whole source (or ``max_frames``); returns the statistics.

        Ctrl-C stops reading, flushes every frame already processed through the output stage,
        closes the sinks (complete files) and re-raises with ``.stats`` attached.
        """
        for _ in self._stream(progress=progress, collect=False):
            pass
        return self.stats

    def __iter__(self) -> Iterator[FrameResult]:
        """Frame results in order, as the output stage emits them."""
        return self._stream(progress=False, collect=True)

    def _stream(self, progress: bool, collect: bool) -> Iterator[FrameResult]:
        from vlexport.runtime.sources import open_source

        self.stats = PipelineStats()  # one run's figures
        self._stop.clear()
        # A spec is opened here (and closed at the end); anything else iterable is a source already.
        own_source = isinstance(self.source_spec, (str, int, os.PathLike))
        src = open_source(self.source_spec) if own_source else self.source_spec
        samples: dict[str, list[float]] = {s: [] for s in _STAGES}
        out_q: queue.Queue = queue.Queue(maxsize=self.max_pending)
        results_q: queue.Queue = queue.Queue()
        workers = {s.name: BackgroundTask(getattr(s.task, s.kind), every_frames=s.every_frames, every_s=s.every_s,
                                          name=s.name) for s in self.slots if not s.inline}
        output = _OutputStage(self, out_q, results_q if collect else None, workers, samples)
        live = bool(getattr(src, "live", False))
        # Pre-processing moves to the decode thread for the tasks that accept a prepared input.
        preparers = {s.name: s.task.prepare for s in self.slots
                     if s.inline and getattr(s.task, "accepts_prepared", False)}
        frames = ((f, {}) for f in src) if live else _Prefetch(src, self.prefetch, samples["decode"], preparers)
        bar = _progress_bar(src, self.max_frames) if progress else None
        t_start = time.perf_counter()
        failed: BaseException | None = None
        try:
            output.start()
            n = 0
            for frame, prepared in frames:
                if self._stop.is_set():
                    break
                jobs: list[str] = []
                for name, worker in workers.items():
                    # Files keep the schedule exactly (wait for a busy worker); live streams never wait.
                    if worker.offer(frame.index, frame.image, frame.stamp.t_monotonic, frame.stamp, block=not live):
                        jobs.append(name)
                results, timing = {}, {s: 0.0 for s in _TASK_STAGES}
                for slot in self.slots:
                    if not slot.inline:
                        continue
                    run = getattr(slot.task, slot.kind)
                    if slot.name in prepared:
                        result = run(frame.image, frame.stamp, prepared=prepared[slot.name])
                    else:
                        result = run(frame.image, frame.stamp)
                    if slot.kind == "detect" and self.tracker is not None:
                        result = self.tracker.update(result)
                    results[slot.name] = result
                    task_ms = getattr(slot.task, "timings", {})
                    for s in _TASK_STAGES:
                        timing[s] += float(task_ms.get(s, 0.0))
                    for s in _OPTIONAL_STAGES:
                        if s in task_ms:
                            timing[s] = timing.get(s, 0.0) + float(task_ms[s])
                if any(slot.inline for slot in self.slots):
                    for s, ms in timing.items():
                        samples[s].append(ms)
                output.put(frame, results, jobs, timing)
                n += 1
                if bar is not None:
                    bar.update(1)
                if collect:
                    yield from _drain(results_q)
                output.raise_error()
                if self.max_frames is not None and n >= self.max_frames:
                    break
        except GeneratorExit:  # the consumer stopped iterating: a normal end (finally closes the sinks)
            return
        except KeyboardInterrupt as e:
            self.stats.interrupted = True
            output.finish(abort=False)
            self._finalize(src, samples, t_start, workers, output)
            e.stats = self.stats  # type: ignore[attr-defined]
            raise
        except BaseException as e:
            failed = e
            output.finish(abort=True)
            raise
        finally:
            if bar is not None:
                bar.close()
            if isinstance(frames, _Prefetch):
                frames.close()
            if failed is None and not self.stats.interrupted:
                output.finish(abort=False)
            if not self.stats.interrupted:
                self._finalize(src, samples, t_start, workers, output)
            for w in workers.values():
                w.close()
            if own_source:
                src.close()
        if failed is None:
            try:
                output.raise_error()
            except KeyboardInterrupt as e:  # raised by a callback or sink on the output thread
                self.stats.interrupted = True
                e.stats = self.stats  # type: ignore[attr-defined]
                raise
        if collect:
            yield from _drain(results_q)

    def _finalize(self, src: Any, samples: dict[str, list[float]], t_start: float, workers: dict[str, Any],
                  output: _OutputStage) -> None:
        st = self.stats
        st.seconds = time.perf_counter() - t_start
        st.processed = output.emitted
        st.read = int(getattr(src, "frames_read", st.processed))
        st.dropped = int(getattr(src, "dropped", 0))
        st.skipped = int(getattr(src, "skipped", 0))
        st.reconnects = int(getattr(src, "reconnects", 0))
        st.latency_ms = percentiles(samples)
        for slot in self.slots:
            w = workers.get(slot.name)
            st.tasks[slot.name] = {"kind": slot.kind, "every_frames": slot.every_frames, "every_s": slot.every_s,
                                   "runs": w.started if w is not None else st.processed,
                                   "skipped_busy": w.skipped_busy if w is not None else 0}


def _drain(q: queue.Queue) -> Iterator[FrameResult]:
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


def _progress_bar(src: Any, max_frames: int | None) -> Any:
    from pathlib import Path

    from tqdm import tqdm

    total = src.len_hint() if callable(getattr(src, "len_hint", None)) else None
    if max_frames is not None:
        total = max_frames if total is None else min(total, max_frames)
    return tqdm(total=total, unit="frame", desc=Path(str(src.spec)).name or str(src.spec), dynamic_ncols=True)


class _OutputStage:
    """The output thread: attaches background results, keeps frame order, draws and writes."""

    def __init__(self, pipe: Pipeline, q: queue.Queue, results_q: queue.Queue | None,
                 workers: dict[str, BackgroundTask], samples: dict[str, list[float]]):
        self.pipe, self.q, self.results_q, self.workers, self.samples = pipe, q, results_q, workers, samples
        self.latest: dict[str, Any] = {}
        self.emitted = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vlexport-output", daemon=True)
        self._arrived: dict[tuple[str, int], Any] = {}
        self._abort = False
        self._finished = False

    def start(self) -> None:
        self._thread.start()

    def put(self, frame: Any, results: dict[str, Any], jobs: list[str], timing: dict[str, float]) -> None:
        while True:
            if self._error is not None:
                return
            try:
                self.q.put((frame, results, jobs, timing), timeout=0.1)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def finish(self, abort: bool) -> None:
        """Flush (or, on ``abort``, discard) what is queued, stop the thread, close or abort the sinks."""
        if self._finished or self._thread.ident is None:
            return
        self._finished = True
        self._abort = abort
        self.q.put((_END, {}, [], {}))  # always delivered: the thread consumes until it sees it, even after an error
        self._thread.join()
        failed = self._error is not None and not isinstance(self._error, KeyboardInterrupt)
        for sink in self.pipe.sinks:
            if abort or failed:
                getattr(sink, "abort", sink.close)()
            else:
                sink.close()

    def _collect(self, name: str, worker: BackgroundTask, block_for: int | None) -> None:
        """Move finished jobs of ``worker`` into ``_arrived``; wait for frame ``block_for`` if given."""
        while True:
            done = worker.poll()
            if done is not None:
                self._arrived[(name, done.frame_index)] = done.result
                continue
            if block_for is None or (name, block_for) in self._arrived or not worker.busy:
                # Not busy and not arrived: poll once more (the job may have just finished).
                done = worker.poll()
                if done is not None:
                    self._arrived[(name, done.frame_index)] = done.result
                    continue
                return
            worker.wait(0.05)

    def _run(self) -> None:
        try:
            while True:
                frame, results, jobs, timing = self.q.get()
                if frame is _END:
                    return
                if self._abort:
                    continue
                for name in jobs:  # attach what was computed on this frame
                    self._collect(name, self.workers[name], frame.index)
                    result = self._arrived.pop((name, frame.index), None)
                    if result is not None:
                        results[name] = result
                for name, result in results.items():
                    self.latest[name] = result
                fr = FrameResult(frame, results, dict(self.latest), dict(timing))
                for sink in self.pipe.sinks:
                    sink.write(fr)
                fr.timings["end_to_end"] = (time.monotonic() - frame.stamp.t_monotonic) * 1000.0
                self.samples["end_to_end"].append(fr.timings["end_to_end"])
                self.emitted += 1
                if self.pipe.on_result is not None:
                    self.pipe.on_result(fr)
                if self.results_q is not None:
                    self.results_q.put(fr)
        except BaseException as e:  # surfaced in the loop thread; stop feeding
            self._error = e
            self.pipe.stop()
            while True:  # unblock the producer until it notices
                try:
                    item = self.q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item[0] is _END:
                    return

