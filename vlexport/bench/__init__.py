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

The modules, one job each: :mod:`~vlexport.bench.options` (what to measure),
:mod:`~vlexport.bench.timing` (one measurement), :mod:`~vlexport.bench.frames` (the frame),
:mod:`~vlexport.bench.feeds` (recording and replaying a task's feeds),
:mod:`~vlexport.bench.runner` (the runtime measurements and :func:`run_bench`),
:mod:`~vlexport.bench.decode` (a captioner's fixed-length decode),
:mod:`~vlexport.bench.torch_eager` (the PyTorch eager rows) and :mod:`~vlexport.bench.report`
(the rows, the table, the JSON and the chart).
"""

from __future__ import annotations

from vlexport.bench.frames import read_frame, synthetic_frame
from vlexport.bench.options import BACKENDS, DECODE_TOKENS, DEFAULT_BATCH, BenchOptions
from vlexport.bench.report import SCHEMA, BenchReport, BenchRow, check_output_path, write_chart, write_report_json
from vlexport.bench.runner import run_bench
from vlexport.bench.timing import Timing, latency_stats, measure

__all__ = [
    "BACKENDS",
    "DECODE_TOKENS",
    "DEFAULT_BATCH",
    "SCHEMA",
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
