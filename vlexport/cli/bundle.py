"""The bundle commands: `inspect`, `build` (TensorRT engines), `validate` and `bench`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vlexport.cli.group import cli
from vlexport.cli.report import metrics_table


@cli.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check every file's sha256.")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Write the INT8 precision search's latency/accuracy curve (every explored point) as a PNG.")
def inspect_cmd(bundle: Path, as_json: bool, verify: bool, plot: Path | None) -> None:
    """Show what a bundle holds: parts, tensors, files, vocabulary, parity, backends.

    \b
    Examples:
      vlexport inspect bundles/kdeov-yolov8n-vitb32
      vlexport inspect bundles/yolo-yolov8n --plot int8_search.png
    """
    from vlexport.runtime.bundle import Bundle
    from vlexport.runtime.describe import describe_bundle

    b = Bundle.open(bundle)
    if verify:
        b.verify_all()
    if plot is not None:
        from vlexport.calibration.search_curve import plot_search

        gate = (b.manifest.get("validation") or {}).get("gate") or {}
        if plot_search(gate, plot, title=f"{b.root.name}: INT8 precision search"):
            click.echo(f"wrote {plot}")
        else:
            click.echo("matplotlib is not installed: no chart written (pip install matplotlib)")
    if as_json:
        click.echo(json.dumps(b.manifest, indent=2))
        return
    click.echo(describe_bundle(b, verified=verify))


# --------------------------------------------------------------------------- build (TensorRT)
@cli.command("build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--fp16", "want", flag_value="fp16", help="Build FP16 engines only.")
@click.option("--int8", "want", flag_value="int8", help="Build INT8 engines only (from the QDQ graph).")
@click.option("--fp32", "want", flag_value="fp32", help="Build FP32 engines only.")
@click.option("--force", is_flag=True, help="Rebuild even when a matching engine exists.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1), help="Largest batch of dynamic-batch parts.")
def build_cmd(bundle: Path, want: str | None, force: bool, max_batch: int) -> None:
    """Build TensorRT engines for this GPU from the bundle's ONNX (cached, keyed by ONNX hash,
    TensorRT version, GPU name and precision; recorded in the manifest).

    \b
    Examples:
      vlexport build bundles/yolo-yolov8n            # every precision the bundle has
      vlexport build bundles/yolo-yolov8n --int8
    """
    from vlexport.runtime.backends.tensorrt_build import build_bundle_engines

    for name, precision, path in build_bundle_engines(bundle, want, force=force, max_batch=max_batch):
        click.echo(f"{name}/{precision}: {path.name}")


# --------------------------------------------------------------------------- validate
@cli.command("validate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Labelled dataset: a YOLO data.yaml or folder (images/ + labels/), or a COCO json.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Precisions to measure (repeatable) [default: every one the bundle has].")
@click.option("--max-images", type=click.IntRange(1), help="Evaluate on the first N images only.")
@click.option("--threads", type=click.IntRange(1), help="Inference threads (CPU).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the metrics as JSON.")
def validate_cmd(bundle: Path, data: str, precisions: tuple[str, ...], max_images: int | None, threads: int | None,
                 json_out: Path | None) -> None:
    """Task metric of every precision in a bundle on labelled data (detection: COCO mAP50-95, mAP50).

    \b
    Example:
      vlexport validate bundles/yolo-yolov8n --data coco128/data.yaml
    """
    from vlexport.evaluation.validate import validate_bundle

    metrics = validate_bundle(bundle, data, precisions=list(precisions) or None, max_images=max_images, threads=threads)
    click.echo(metrics_table(metrics))
    if json_out:
        from vlexport.atomic import write_json_atomic

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, {"bundle": str(bundle), "data": data, "metrics": metrics})
        click.echo(f"wrote {json_out}")


# --------------------------------------------------------------------------- bench
@cli.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--source", help="Video (or image, folder, camera, URL): its first frame is the one measured, "
                               "and the whole pipeline runs on it for the end-to-end FPS [default: a synthetic frame].")
@click.option("--runs", default=50, show_default=True, type=int, help="Timed runs per measurement.")
@click.option("--warmup", default=5, show_default=True, type=int, help="Untimed runs before each measurement.")
@click.option("--threads", type=int, help="CPU threads of onnxruntime and PyTorch [default: theirs].")
@click.option("--backend", "backends", multiple=True,
              help="Only this backend, onnxruntime or tensorrt (repeatable) [default: every one usable here].")
@click.option("--precision", "precisions", multiple=True,
              help="Only this precision, fp32, fp16 or int8 (repeatable) [default: every one the bundle has].")
@click.option("--batch", type=int, help="Batch of the extra throughput run of graphs with a dynamic batch axis [default: 8].")
@click.option("--max-frames", type=int, help="Stop the video run after this many frames [default: the whole source].")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch eager comparison.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="JSON file [default: bench-BUNDLE_NAME.json].")
@click.option("--png", "png_out", type=click.Path(path_type=Path), help="Chart [default: the JSON path with .png].")
def bench_cmd(bundle: Path, source: str | None, runs: int, warmup: int, threads: int | None,
              backends: tuple[str, ...], precisions: tuple[str, ...], batch: int | None, max_frames: int | None,
              no_torch: bool, json_out: Path | None, png_out: Path | None) -> None:
    """Latency and throughput of a bundle per backend and precision, beside PyTorch eager.

    For the main part (detector, segmenter, or a captioner's encoder and a 30-token decode): latency
    p50/p90/p99 and throughput of the graph, the task's end-to-end latency (pre-process + inference +
    post-process), the same architecture in PyTorch eager (when torch is installed), and with --source
    the pipeline's FPS on the video. Prints a table; writes a JSON file and a PNG chart.

    \b
    Examples:
      vlexport bench bundles/yolo-yolov8n --source traffic.mp4 --threads 2
      vlexport bench bundles/yolo-yolov8n --backend onnxruntime --precision fp32 --precision int8
      vlexport bench bundles/cap --runs 20 --no-torch --json results/cap.json
    """
    from vlexport.bench import BenchOptions, check_output_path, run_bench, write_chart, write_report_json

    opts = BenchOptions(source=source, runs=runs, warmup=warmup, threads=threads, backends=backends,
                        precisions=precisions, batch=batch, max_frames=max_frames, torch=not no_torch)
    for path, what in ((json_out, "--json"), (png_out, "--png")):
        if path is not None:
            check_output_path(path, what)
    report = run_bench(bundle, opts)
    click.echo(report.table())
    json_path = write_report_json(report, json_out or Path(f"bench-{report.name}.json"))
    click.echo(f"wrote {json_path}")
    png_path = png_out or json_path.with_suffix(".png")
    if write_chart(report, png_path):
        click.echo(f"wrote {png_path}")
    else:
        click.echo("matplotlib is not installed: no chart written (pip install matplotlib)")
