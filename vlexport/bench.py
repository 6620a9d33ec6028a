"""`vlexport bench`: how fast a bundle runs here, per backend and precision, beside PyTorch eager.

For the bundle's main part (the detector, the segmenter, or a captioner's encoder plus a fixed
30-token decode) and every backend (onnxruntime with each usable provider, TensorRT when usable)
and precision, on one real frame (the first of ``--source``, else a synthetic one):

* **inference**: latency percentiles over ``runs`` runs after ``warmup``, the graph fed exactly
  what the task feeds it for that frame (recorded from the task itself), and the throughput; a
  graph with a dynamic batch axis is also measured at a larger batch (8 by default);
* **end to end**: the task's own call (pre-process + inference + post-process) on the same frame;
* **PyTorch eager**: the same architecture rebuilt from the manifest with random weights (weights
  do not change latency), timed on the same inputs, when torch (the export extra) is installed;
* **video**: with a source, the pipeline's throughput on it
  (:func:`vlexport.runtime.sinks.run_on_source`, FPS and per-stage percentiles).

Measurements run one after the other, each backend loaded only while it is measured.
:func:`run_bench` returns a :class:`BenchReport`; :meth:`BenchReport.table` prints it,
:func:`write_report_json` and :func:`write_chart` write the JSON and the PNG (atomically).
torch and matplotlib are imported only when used; nothing here is imported by the runtime.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlexport import __version__
from vlexport.errors import OutputError, SourceError, UsageError, VlexportError
from vlexport.runtime.bundle import PRECISIONS, Bundle, PartInfo

__all__ = [
    "BACKENDS",
    "BenchOptions",
    "BenchReport",
    "BenchRow",
    "Timing",
    "check_output_path",
    "latency_stats",
    "measure",
    "read_frame",
    "run_bench",
    "synthetic_frame",
    "write_chart",
    "write_report_json",
]

log = logging.getLogger("vlexport")

SCHEMA = "vlexport.bench/1"
BACKENDS = ("onnxruntime", "tensorrt")
#: Batch measured for throughput when the graph's batch axis is dynamic (``--batch`` overrides).
DEFAULT_BATCH = 8
#: Tokens of the fixed-length caption decode (the end token is ignored so every run decodes as many).
DECODE_TOKENS = 30
_INFERENCE = "inference"


# -- options ---------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    """What to measure and how often; empty ``backends``/``precisions`` mean "all that run here"."""

    source: str | None = None
    runs: int = 50
    warmup: int = 5
    threads: int | None = None
    backends: Sequence[str] = ()
    precisions: Sequence[str] = ()
    batch: int | None = None
    max_frames: int | None = None
    torch: bool = True
    decode_tokens: int = DECODE_TOKENS

    def check(self) -> None:
        """Reject bad values with one UsageError line (before anything is loaded)."""
        for name, low in (("runs", 1), ("warmup", 0), ("decode_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        for name in ("threads", "batch", "max_frames"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for b in self.backends:
            if b not in BACKENDS:
                raise UsageError(f"unknown backend {b!r}; choose one of {', '.join(BACKENDS)}")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise UsageError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "runs": self.runs, "warmup": self.warmup, "threads": self.threads,
                "backends": list(self.backends), "precisions": list(self.precisions), "batch": self.batch,
                "max_frames": self.max_frames, "torch": self.torch, "decode_tokens": self.decode_tokens}


# -- timing ----------------------------------------------------------------------------------
def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 (linear interpolation), mean and min of latencies in ms, and the run count."""
    from vlexport.runtime.pipeline import latency_percentiles

    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("latency_stats needs at least one sample")
    return {**latency_percentiles(x, decimals=4), "mean": round(float(x.mean()), 4), "min": round(float(x.min()), 4),
            "runs": int(x.size)}


@dataclass
class Timing:
    """Latency percentiles (ms) of one measurement and its throughput (``unit`` per second)."""

    latency_ms: dict[str, float]
    per_s: float
    unit: str = "frames"

    def to_dict(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "per_s": round(self.per_s, 3), "unit": f"{self.unit}/s"}


def measure(fn: Callable[[], object], runs: int, warmup: int, items: int = 1, unit: str = "frames") -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed.

    The throughput is ``items`` per call over the wall time of the timed calls.
    """
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - start
    return Timing(latency_stats(samples), items * runs / wall if wall > 0 else float("inf"), unit)


# -- rows and report -------------------------------------------------------------------------
@dataclass
class BenchRow:
    """One measured (or skipped) combination of runner, device, precision and part."""

    runner: str  # "onnxruntime", "tensorrt" or "pytorch"
    device: str  # the execution provider, the GPU, or "cpu"/"cuda" for PyTorch
    precision: str
    part: str
    what: str = _INFERENCE  # or "decode N tokens"
    threads: int | None = None
    latency: Timing | None = None
    batched: Timing | None = None
    batch: int | None = None
    end_to_end: Timing | None = None
    stages_ms: dict[str, float] | None = None  # mean per stage over the end-to-end runs
    note: str | None = None

    @property
    def label(self) -> str:
        return f"{self.runner} {_short(self.device)} {self.precision}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner, "device": self.device, "precision": self.precision, "part": self.part,
            "what": self.what, "threads": self.threads,
            "latency": self.latency.to_dict() if self.latency else None,
            "batched": {"batch": self.batch, **self.batched.to_dict()} if self.batched else None,
            "end_to_end": self.end_to_end.to_dict() if self.end_to_end else None,
            "end_to_end_stages_ms": self.stages_ms,
            "note": self.note,
        }


@dataclass
class BenchReport:
    """Everything :func:`run_bench` measured; :meth:`to_dict` is the JSON file's content."""

    bundle: str
    name: str
    family: str
    task: str
    preset: str | None
    part: str
    options: BenchOptions
    frame: dict[str, Any]
    backends: list[dict[str, Any]]
    rows: list[BenchRow] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    video: dict[str, Any] | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "vlexport": __version__, "created": self.created,
            "bundle": self.bundle, "name": self.name, "family": self.family, "task": self.task,
            "preset": self.preset, "part": self.part, "options": self.options.to_dict(), "frame": self.frame,
            "machine": self.machine, "backends": self.backends, "rows": [r.to_dict() for r in self.rows],
            "skipped": self.skipped, "video": self.video,
        }

    def table(self) -> str:
        """The console table: one line per row, then the video run and what was skipped."""
        o = self.options
        threads = o.threads if o.threads is not None else "default"
        lines = [f"{self.name}: {self.family} {self.task}, part {self.part} · frame {self.frame['width']}x"
                 f"{self.frame['height']} ({self.frame['source']}) · threads {threads} · "
                 f"{o.runs} runs after {o.warmup} warm-up"]
        batch = next((r.batch for r in self.rows if r.batch), None)
        header = ["runner", "device", "prec", "what", "p50 ms", "p90 ms", "p99 ms", "mean ms", "throughput",
                  f"batch {batch}" if batch else "batched", "e2e p50", "e2e p90", "note"]
        body = []
        for r in self.rows:
            lat = r.latency.latency_ms if r.latency else None
            e2e = r.end_to_end.latency_ms if r.end_to_end else None
            body.append([
                r.runner, _short(r.device), r.precision, r.what if r.what != _INFERENCE else r.part,
                _ms(lat, "p50"), _ms(lat, "p90"), _ms(lat, "p99"), _ms(lat, "mean"),
                f"{r.latency.per_s:.1f} {r.latency.unit}/s" if r.latency else "-",
                f"{r.batched.per_s:.1f} {r.batched.unit}/s" if r.batched else "-",
                _ms(e2e, "p50"), _ms(e2e, "p90"), r.note or "",
            ])
        lines.append(_format_table(header, body))
        if self.video is not None:
            v = self.video
            lines.append(f"pipeline on {v['source']} ({v['backend']} {_short(v['device'])} {v['precision']}): "
                         f"{v['frames']} frames in {v['seconds']:.2f} s, {v['fps']:.1f} FPS")
            lines += [f"  {k:<12} p50 {p['p50']:8.2f}  p90 {p['p90']:8.2f}  p99 {p['p99']:8.2f} ms"
                      for k, p in v["latency_ms"].items()]
        for s in self.skipped:
            lines.append(f"skipped {s['what']}: {s['reason']}")
        return "\n".join(lines)


def _ms(stats: dict[str, float] | None, key: str) -> str:
    return "-" if stats is None else f"{stats[key]:.3f}"


def _short(device: str) -> str:
    return device.replace("ExecutionProvider", "")


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*["-" * w for w in widths]).rstrip()]
    out += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(out)


# -- the frame -------------------------------------------------------------------------------
def synthetic_frame(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A deterministic BGR uint8 frame: a colour gradient with a few filled shapes and some noise."""
    import cv2

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * x / width, 255 * y / height, 128 + 64 * np.sin(x / 37 + y / 53)], axis=-1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 80))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(img, (x0, y0), (x0 + int(rng.integers(30, 160)), y0 + int(rng.integers(30, 160))), color, -1)
    return img


def read_frame(source: str | None) -> tuple[np.ndarray, str]:
    """The first frame of ``source`` (a SourceError when none can be read), or a synthetic frame."""
    image, label, _ = _first_frame(source)
    return image, label


def _first_frame(source: str | None) -> tuple[np.ndarray, str, bool]:
    """(first frame, its label, whether the source is live: a camera or a stream, with no end)."""
    if source is None:
        return synthetic_frame(), "synthetic", False
    from vlexport.runtime.sinks import open_source

    with open_source(source) as src:
        for frame in src:
            return frame.image, str(source), bool(src.live)
    raise SourceError(f"source {source!r} gave no readable frame")


def check_output_path(path: str | os.PathLike, what: str) -> None:
    """Refuse an output path that is a folder, before anything is measured."""
    if Path(path).expanduser().is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path")


# -- recording what a task feeds its graph ---------------------------------------------------
Feeds = dict[str, np.ndarray]


class _FeedRecorder:
    """Stands in for a task's backend during one frame and keeps a copy of every feed it gets."""

    def __init__(self, backend: Any):
        self._backend = backend
        self.calls: list[Feeds] = []

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        self.calls.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self._backend.infer(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


@contextlib.contextmanager
def _backend_of(task: Any, backend: Any) -> Iterator[None]:
    """Run ``task`` through another backend of the same graph for a while (``backend`` is its public attribute)."""
    original = task.backend
    task.backend = backend
    try:
        yield
    finally:
        task.backend = original


def _frame_fn(task: Any) -> Callable[[np.ndarray], Any]:
    for name in ("caption", "detect", "segment"):
        fn = getattr(task, name, None)
        if callable(fn):
            return fn
    raise UsageError(f"vlexport bench runs detect, segment and caption bundles, not {type(task).__name__}")


def _record(task: Any, frame: np.ndarray) -> list[Feeds]:
    recorder = _FeedRecorder(task.backend)
    with _backend_of(task, recorder):
        _frame_fn(task)(frame)
    if not recorder.calls:
        raise VlexportError(f"{task.bundle.root}: the task ran no {task.part_name!r} inference on the frame")
    return recorder.calls


def _replay(backend: Any, calls: list[Feeds]) -> None:
    for feeds in calls:
        backend.infer(feeds)


def _tile(calls: list[Feeds], info: PartInfo, k: int) -> list[Feeds]:
    """The recorded feeds repeated ``k`` times along the batch axis (every input that has it)."""
    axis = info.io.inputs[0].shape[0]
    names = {s.name for s in info.io.inputs if s.shape and s.shape[0] == axis}
    return [{n: (np.concatenate([x] * k) if n in names else x) for n, x in feeds.items()} for feeds in calls]


# -- choosing what to measure ----------------------------------------------------------------
def _precisions_for(info: PartInfo, backend: str, wanted: Sequence[str]) -> list[str]:
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


def _check_precisions(bundle: Bundle, info: PartInfo, backends: list[str], wanted: Sequence[str]) -> None:
    from vlexport.runtime.backends import part_precisions

    have = sorted({p for b in backends for p in part_precisions(info, b)}, key=PRECISIONS.index)
    missing = [p for p in wanted if p not in have]
    if missing:
        raise UsageError(f"{bundle.root}: part {info.name!r} cannot run in {', '.join(missing)} on "
                         f"{', '.join(backends)}; it has {', '.join(have)}")


def _batch_for(info: PartInfo, requested: int | None) -> int | None:
    """The batch of the throughput measurement: None when the graph's batch is fixed (or 1 is asked)."""
    first = info.io.inputs[0].shape[0] if info.io.inputs and info.io.inputs[0].shape else None
    dynamic = isinstance(first, str)
    if requested is not None and not dynamic and requested != first:
        raise UsageError(f"--batch {requested}: part {info.name!r} was exported with a fixed batch of {first}; "
                         "export it with --dynamic-batch to measure other batches")
    k = requested if requested is not None else (DEFAULT_BATCH if dynamic else None)
    return k if k is not None and k > 1 else None


def _ort_chains() -> list[list[str]]:
    """One provider list per usable onnxruntime provider, best first, each falling back to the rest."""
    from vlexport.runtime.backends.onnxruntime import available_providers

    providers = available_providers()
    return [providers[i:] for i in range(len(providers))]


# -- one task: every device it can run on ----------------------------------------------------
def _device_backends(task: Any, backend: str, threads: int | None) -> Iterator[tuple[Any, str | None]]:
    """(backend object, note) per device to measure; extra onnxruntime sessions are closed after use."""
    if backend != "onnxruntime":
        yield task.backend, None
        return
    from vlexport.runtime.backends.onnxruntime import OrtBackend

    for i, chain in enumerate(_ort_chains()):
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
    row.latency = measure(lambda: _replay(runner, calls), options.runs, options.warmup)
    if batch:
        tiled = _tile(calls, info, batch)
        limit = getattr(runner, "max_batch", None)
        if limit is not None and any(x.shape[0] > limit for f in tiled for x in f.values()):
            row.note = f"batch {batch} exceeds the engine's max batch {limit}"
        else:
            row.batch = batch
            row.batched = measure(lambda: _replay(runner, tiled), options.runs, options.warmup, items=batch)
    run_frame = _frame_fn(task)
    stages: list[dict[str, float]] = []

    def end_to_end() -> None:
        run_frame(frame)
        stages.append(dict(task.timings))

    with _backend_of(task, runner):
        row.end_to_end = measure(end_to_end, options.runs, options.warmup)
    timed = stages[options.warmup:]
    keys = [k for k in ("preprocess", "infer", "postprocess") if all(k in s for s in timed)]
    row.stages_ms = {k: round(float(np.mean([s[k] for s in timed])), 4) for k in keys} if timed else None
    return row


@dataclass
class _Recorded:
    """What the first loaded task gives the rest: its feeds (for PyTorch), and for a captioner its prefix."""

    calls: list[Feeds] | None = None
    precision: str | None = None
    prefix: np.ndarray | None = None
    caption_settings: dict[str, Any] | None = None


def _bench_runtime(bundle: Bundle, info: PartInfo, backends: list[str], frame: np.ndarray, options: BenchOptions,
                   batch: int | None, rows: list[BenchRow], skipped: list[dict[str, str]]) -> _Recorded:
    from vlexport import runtime

    recorded = _Recorded()
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
                calls = _record(task, frame)
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


# -- captioner: a fixed-length decode --------------------------------------------------------
def _decode_tokens(settings: dict[str, Any], wanted: int) -> int:
    """``wanted``, or fewer when the decoder has no room for them after the image prefix (no prompt is fed)."""
    return max(1, min(wanted, settings["n_positions"] - settings["prefix_length"]))


def _ort_step(decoder: Any, s: dict[str, Any]) -> Callable:
    """A step for :mod:`vlexport.runtime.decoding` over an onnxruntime decoder, in its own input dtypes."""
    dtypes = {spec.name: np.dtype(spec.dtype) for spec in decoder.inputs}

    def step(prefix, ids, mask, past):
        b = ids.shape[0]
        if past is None:
            past = np.zeros((s["num_layers"], 2, b, s["num_heads"], 0, s["head_dim"]), dtypes["past_key_values"])
        if prefix is None:
            prefix = np.zeros((b, 0, s["embed_size"]), dtypes["prefix_embeds"])
        out = decoder.infer({"prefix_embeds": np.ascontiguousarray(prefix, dtypes["prefix_embeds"]),
                             "input_ids": np.ascontiguousarray(ids, dtypes["input_ids"]),
                             "attention_mask": np.ascontiguousarray(mask, dtypes["attention_mask"]),
                             "past_key_values": np.ascontiguousarray(past, dtypes["past_key_values"])})
        return np.asarray(out["logits"], np.float32), out["present_key_values"]

    return step


def _decode_timing(step: Callable, prefix: np.ndarray, tokens: int, options: BenchOptions) -> Timing:
    from vlexport.runtime.decoding import greedy_decode

    def run() -> None:
        # eos_token_id=-1: no token ends the decode, so every run decodes exactly `tokens` tokens.
        result = greedy_decode(step, prefix, max_length=tokens, eos_token_id=-1)
        if len(result.token_ids) != tokens:
            raise RuntimeError(f"the decode stopped after {len(result.token_ids)} of {tokens} tokens")

    return measure(run, options.runs, options.warmup, items=tokens, unit="tokens")


def _bench_decoder(bundle: Bundle, recorded: _Recorded, options: BenchOptions, rows: list[BenchRow],
                   skipped: list[dict[str, str]]) -> None:
    """The decoder's fixed-length decode per onnxruntime provider (never its TensorRT one) and precision."""
    from vlexport.runtime.backends.onnxruntime import TRT_EP, OrtBackend

    if recorded.prefix is None or recorded.caption_settings is None:
        return
    info = bundle.part("decoder")
    precisions = [p for p in info.precisions if not options.precisions or p in options.precisions]
    if not precisions:
        skipped.append({"what": "decoder", "reason": f"no {'/'.join(options.precisions)} decoder file; "
                                                     f"it has {', '.join(info.precisions)}"})
        return
    if options.backends and "onnxruntime" not in options.backends:
        skipped.append({"what": "decoder", "reason": "the decoder runs on onnxruntime only"})
        return
    tokens = _decode_tokens(recorded.caption_settings, options.decode_tokens)
    for chain in (c for c in _ort_chains() if c[0] != TRT_EP):  # the TensorRT EP is first when present
        for precision in precisions:
            path = bundle.verify(info.files[precision])
            with OrtBackend(path, providers=chain, threads=options.threads) as decoder:
                row = BenchRow("onnxruntime", decoder.device, precision, "decoder", f"decode {tokens} tokens",
                               threads=options.threads)
                log.info("bench: %s decode …", row.label)
                row.latency = _decode_timing(_ort_step(decoder, recorded.caption_settings), recorded.prefix,
                                             tokens, options)
                rows.append(row)


# -- PyTorch eager ---------------------------------------------------------------------------
class _NoEager(Exception):
    """The eager model cannot be rebuilt here; the message says why (it becomes the row's note)."""


def _config(cls: Any, data: dict[str, Any]) -> Any:
    """``cls(**data)`` from a manifest's model config (lists back to tuples); a mismatch is a _NoEager."""
    try:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})
    except TypeError as e:  # a manifest written by another vlexport version
        raise _NoEager(f"the manifest's model config does not fit this vlexport's {cls.__name__}: {e}") from e


def _model_config(bundle: Bundle) -> dict[str, Any]:
    return dict((bundle.manifest.get("model") or {}).get("config") or {})


def _kdeov_modules(bundle: Bundle) -> dict[str, Any]:
    from vlexport.export.kdeov import DetectorGraph
    from vlexport.models.kdeov.config import KDEOVConfig
    from vlexport.models.kdeov.model import build_kdeov

    config = KDEOVConfig.from_dict(_model_config(bundle))
    model = build_kdeov(config)
    if model.backbone.name != config.backbone:
        raise _NoEager(f"the {config.backbone} backbone needs ultralytics (pip install ultralytics)")
    baked = (bundle.manifest.get("vocabulary") or {}).get("mode", "baked") == "baked"
    return {"detector": DetectorGraph(model, bundle.load_vocab()["embeddings"], baked)}


def _yolo_modules(bundle: Bundle) -> dict[str, Any]:
    from vlexport.errors import CheckpointError
    from vlexport.export.yolo import YoloDetectorGraph
    from vlexport.models.common.backbones import LightweightVisualBackbone

    model = bundle.manifest.get("model") or {}
    provenance = bundle.manifest.get("provenance") or {}
    arch = model.get("arch") or provenance.get("arch") or bundle.manifest.get("preset")
    backbone = LightweightVisualBackbone(arch)
    if backbone.name != arch:
        raise _NoEager(f"rebuilding {arch} needs ultralytics (pip install ultralytics)")
    classes = model.get("num_classes")
    if classes is not None and backbone.num_source_classes != classes:
        # The class branch is as wide as the checkpoint's class list: only the checkpoint knows it.
        ckpt = provenance.get("checkpoint")
        if not ckpt or not Path(ckpt).is_file():
            raise _NoEager(f"the {classes}-class {arch} head needs its checkpoint, and {ckpt} no longer exists")
        try:
            backbone = LightweightVisualBackbone(arch, checkpoint=ckpt)
        except CheckpointError as e:
            raise _NoEager(f"cannot rebuild the {classes}-class {arch} head from {ckpt}: {e}") from e
    return {"detector": YoloDetectorGraph(backbone.eval())}


def _sclip_modules(bundle: Bundle) -> dict[str, Any]:
    import torch

    from vlexport.models.clip.weights import load_clip_model
    from vlexport.models.sclip.config import SCLIPConfig
    from vlexport.models.sclip.model import SCLIPSegmenter

    data = _model_config(bundle)
    legacy = data.pop("quick_gelu", None)  # bundles from before the loader decided the activation
    tower = (bundle.manifest.get("provenance") or {}).get("text_encoder") or {}
    activation = tower.get("activation") or ("quickgelu" if legacy else "auto")
    # Random weights: the same latency; the activation as exported.
    config = _config(SCLIPConfig, {**data, "clip_pretrained": None, "clip_activation": activation})
    seg = SCLIPSegmenter(load_clip_model(config.clip_model, None, activation=activation, allow_random=True), config)
    seg.text_embeddings = torch.from_numpy(np.ascontiguousarray(bundle.load_vocab()["embeddings"], np.float32))
    return {"segmenter": seg.crop_part()}


def _captioner_modules(bundle: Bundle) -> dict[str, Any]:
    from vlexport.models.captioner.model import CaptionDecoderStep, CaptionEncoderGraph, CaptionerConfig, build_captioner
    from vlexport.models.captioner.gpt2 import GPT2Config

    config = _config(CaptionerConfig, {**_model_config(bundle), "clip_pretrained": None, "gpt2_weights": None})
    gpt2 = _config(GPT2Config, (bundle.manifest.get("model") or {}).get("gpt2") or {})
    captioner = build_captioner(config, gpt2_config=gpt2).eval()
    return {"encoder": CaptionEncoderGraph(captioner).eval(), "decoder": CaptionDecoderStep(captioner.gpt2).eval()}


def _detr_modules(bundle: Bundle) -> dict[str, Any]:
    from vlexport.export.detr import DetectorGraph
    from vlexport.models.detr.model import DETRConfig, build_detr

    config = _config(DETRConfig, _model_config(bundle))
    return {"detector": DetectorGraph(build_detr(config).eval(), bool(config.masks)).eval()}


def _multiscale_modules(bundle: Bundle) -> dict[str, Any]:
    from vlexport.models.multiscale.model import MULTISCALE_PRESETS, build_multiscale

    cfg = _model_config(bundle)
    fusion = cfg.pop("fusion", "absi")
    preset = bundle.manifest.get("preset")
    # Every config field is passed, so the preset only has to exist.
    preset = preset if preset in MULTISCALE_PRESETS else next(iter(MULTISCALE_PRESETS))
    return {"segmenter": build_multiscale(preset, fusion, **cfg)}


#: family -> builder of its parts' eager modules (the export wrappers, random weights).
_EAGER: dict[str, Callable[[Bundle], dict[str, Any]]] = {
    "kdeov": _kdeov_modules, "yolo": _yolo_modules, "sclip": _sclip_modules,
    "captioner": _captioner_modules, "detr": _detr_modules, "multiscale": _multiscale_modules,
}


def _eager_modules(bundle: Bundle) -> dict[str, Any]:
    build = _EAGER.get(bundle.family)
    if build is None:
        raise _NoEager(f"no PyTorch rebuild for family {bundle.family!r}")
    try:
        return build(bundle)
    except (VlexportError, ImportError) as e:
        raise _NoEager(f"cannot rebuild the {bundle.family} model from the manifest: {e}") from e


def _torch_step(module: Any, s: dict[str, Any], device: str) -> Callable:
    import torch

    from vlexport.runtime.decoding import decoder_feeds

    def step(prefix, ids, mask, past):
        feeds = decoder_feeds(s, prefix, ids, mask, past)
        args = [torch.from_numpy(feeds[name]).to(device)
                for name in ("prefix_embeds", "input_ids", "attention_mask", "past_key_values")]
        with torch.inference_mode():
            logits, present = module(*args)
        return logits.float().cpu().numpy(), present.float().cpu().numpy()

    return step


def _bench_torch(bundle: Bundle, part: str, recorded: _Recorded, options: BenchOptions, batch: int | None,
                 rows: list[BenchRow]) -> dict[str, Any] | None:
    """PyTorch eager rows (CPU, and CUDA when torch sees a GPU); returns torch's version info or None."""
    def note_row(note: str) -> None:
        rows.append(BenchRow("pytorch", "eager", "fp32", part, note=note))

    if not options.torch:
        note_row("skipped (--no-torch)")
        return None
    try:
        import torch
    except ImportError:
        note_row("torch is not installed: pip install 'vlexport[export]' to compare with PyTorch eager")
        return None
    if recorded.calls is None:
        note_row("no runtime measurement ran, so there are no inputs to time PyTorch on")
        return None
    try:
        modules = _eager_modules(bundle)
    except _NoEager as e:
        note_row(str(e))
        return None
    info = bundle.part(part)
    names = [s.name for s in info.io.inputs]
    call_sets = {1: recorded.calls, **({batch: _tile(recorded.calls, info, batch)} if batch else {})}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    previous = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        for device in devices:
            module = modules[part].to(device).eval()
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            row = BenchRow("pytorch", device, "fp32", part, threads=torch.get_num_threads(),
                           note="eager, random weights (latency only)")
            log.info("bench: %s …", row.label)
            for k, calls in call_sets.items():
                args = [[_as_torch(torch, feeds[n], device) for n in names if n in feeds] for feeds in calls]

                def forward(module=module, args=args, sync=sync) -> None:
                    with torch.inference_mode():
                        for a in args:
                            module(*a)
                    sync()

                timing = measure(forward, options.runs, options.warmup, items=k)
                if k == 1:
                    row.latency = timing
                else:
                    row.batch, row.batched = k, timing
            rows.append(row)
            if "decoder" in modules and recorded.prefix is not None and recorded.caption_settings is not None:
                tokens = _decode_tokens(recorded.caption_settings, options.decode_tokens)
                step = _torch_step(modules["decoder"].to(device), recorded.caption_settings, device)
                drow = BenchRow("pytorch", device, "fp32", "decoder", f"decode {tokens} tokens",
                                threads=torch.get_num_threads(), note="eager, random weights (latency only)")
                drow.latency = _decode_timing(step, recorded.prefix, tokens, options)
                rows.append(drow)
    finally:
        torch.set_num_threads(previous)
    return {"torch": torch.__version__, "torch_threads": options.threads or previous}


def _as_torch(torch: Any, x: np.ndarray, device: str) -> Any:
    if x.dtype == np.float16:
        x = x.astype(np.float32)  # the eager model is FP32
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


# -- video -----------------------------------------------------------------------------------
def _bench_video(bundle: Bundle, frame: np.ndarray, options: BenchOptions) -> dict[str, Any]:
    """The pipeline on the source with the task a user gets (or the one restricted to), warmed up first."""
    from vlexport import runtime
    from vlexport.runtime.sinks import run_on_source

    precision = options.precisions[0] if len(options.precisions) == 1 else None
    backend = options.backends[0] if len(options.backends) == 1 else None
    task = runtime.load(bundle, precision=precision, backend=backend, threads=options.threads)
    try:
        for _ in range(options.warmup):
            _frame_fn(task)(frame)
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
    frame, frame_source, live = _first_frame(options.source)
    if live and options.max_frames is None:
        raise UsageError(f"the source {options.source!r} is live and has no end: pass --max-frames for the video run")

    rows: list[BenchRow] = []
    recorded = _bench_runtime(bundle, info, backends, frame, options, batch, rows, skipped)
    if bundle.task == "caption":
        _bench_decoder(bundle, recorded, options, rows, skipped)
    machine = _machine()
    torch_info = _bench_torch(bundle, part, recorded, options, batch, rows)
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


# -- outputs ---------------------------------------------------------------------------------
def _bars(ax: Any, ypos: np.ndarray, timings: list[Timing | None], colours: list[str], label: str,
          height: float) -> None:
    """Horizontal p50 bars with a whisker to p90 and the p50 written after it (rows without a timing: none)."""
    keep = [i for i, t in enumerate(timings) if t is not None]
    if not keep:
        return
    p50 = np.array([timings[i].latency_ms["p50"] for i in keep])
    p90 = np.array([timings[i].latency_ms["p90"] for i in keep])
    ax.barh(ypos[keep], p50, height=height, xerr=np.stack([np.zeros_like(p50), p90 - p50]), capsize=2,
            color=[colours[i] for i in keep], label=label)
    for y, v, w in zip(ypos[keep], p50, p90):
        ax.text(w, y, f"  {v:.2f}", va="center", fontsize=7)


def write_report_json(report: BenchReport, path: str | os.PathLike) -> Path:
    """Write :meth:`BenchReport.to_dict` as JSON, atomically; returns the path."""
    from vlexport.atomic import write_json_atomic

    path = Path(path).expanduser()
    check_output_path(path, "--json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report.to_dict())
    return path


def write_chart(report: BenchReport, path: str | os.PathLike) -> bool:
    """A PNG bar chart of p50 latency (whisker to p90) per runner/device/precision, one panel per
    measured thing (inference of the part, a caption decode); False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from vlexport.atomic import atomic_write

    panels: dict[str, list[BenchRow]] = {}
    for r in report.rows:
        if r.latency is not None:
            panels.setdefault(f"{r.part}: {r.what}", []).append(r)
    path = Path(path).expanduser()
    check_output_path(path, "--png")
    path.parent.mkdir(parents=True, exist_ok=True)
    count = max(1, sum(len(v) for v in panels.values()))
    fig = Figure(figsize=(9, 1.4 + 0.5 * count + 0.8 * len(panels)))
    canvas = FigureCanvasAgg(fig)
    colours = {"onnxruntime": "tab:blue", "tensorrt": "tab:green", "pytorch": "tab:gray"}
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "nothing was measured", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (title, rows) in zip(axes, panels.items()):
        ypos = np.arange(len(rows), dtype=np.float64)
        two = any(r.end_to_end for r in rows)  # inference and end-to-end bars side by side
        _bars(ax, ypos - 0.2 * two, [r.latency for r in rows], [colours.get(r.runner, "tab:orange") for r in rows],
              "inference", 0.38 if two else 0.6)
        if two:
            _bars(ax, ypos + 0.2, [r.end_to_end for r in rows], ["tab:orange"] * len(rows),
                  "end to end (pre-process + inference + post-process)", 0.38)
            ax.legend(fontsize=8, loc="best")
        ax.set_yticks(ypos, [r.label for r in rows])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("latency, ms (bar: p50, whisker: p90)")
    title = f"vlexport bench: {report.name} ({report.family} {report.task})"
    if report.video is not None:
        title += f"\npipeline on {Path(str(report.video['source'])).name}: {report.video['fps']:.1f} FPS"
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        canvas.print_png(f)
    return True
