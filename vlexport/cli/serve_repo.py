"""The `triton` command: write a Triton Inference Server model repository from bundles."""

from __future__ import annotations

from pathlib import Path

import click

from vlexport.cli.group import cli


@cli.command("triton")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The model repository folder to write.")
@click.option("--layout", type=click.Choice(["python", "ensemble"]), default="python", show_default=True,
              help="python: one Python-backend model per bundle running the vlexport runtime (any server). "
                   "ensemble: the parts as onnxruntime/TensorRT models between pre/post-processing models "
                   "(GPU servers with those backends).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="max_batch_size of each model (an ensemble part with a fixed batch of 1 gets 0).")
@click.option("--max-queue-delay-us", default=2000, show_default=True, type=click.IntRange(0),
              help="How long the dynamic batcher waits to fill a batch (microseconds).")
@click.option("--preferred-batch", "preferred", multiple=True, type=click.IntRange(1),
              help="A batch size the dynamic batcher aims for (repeatable).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1),
              help="Model instances (instance_group count) per model.")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Where the instances run (KIND_CPU or KIND_GPU).")
@click.option("--name", "names", multiple=True, help="Served model name, one per bundle in order (repeatable) "
                                                     "[default: each bundle folder's name].")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]),
              help="python layout: the runtime backend inside the server (default: the best one there).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="The precision to serve (default: the fastest on the server's device).")
@click.option("--threads", type=click.IntRange(1), help="python layout: inference threads per instance (CPU).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out repository.")
def triton_cmd(bundles: tuple[Path, ...], out: Path, layout: str, max_batch: int, max_queue_delay_us: int,
               preferred: tuple[int, ...], instances: int, kind: str, names: tuple[str, ...], backend: str | None,
               precision: str | None, threads: int | None, overwrite: bool) -> None:
    """Write a Triton model repository serving BUNDLES (versioned folders, a checked config.pbtxt each).

    Every bundle's files are verified against their hashes and every config is checked against
    Triton's ModelConfig schema before anything is written; the repository appears all at once.

    \b
    Examples:
      vlexport triton bundles/yolo-yolov8n --out triton-repo
      vlexport triton bundles/yolo-yolov8n bundles/sclip --name yolo --name sclip --out repo --max-batch 16
      vlexport triton bundles/yolo-yolov8n --layout ensemble --kind gpu --instances 2 --out repo-gpu
      vlexport serve triton-repo          # then serve it
    """
    from vlexport.serve.repository import write_repository

    report = write_repository(list(bundles), out, layout=layout, max_batch_size=max_batch,
                              max_queue_delay_us=max_queue_delay_us, preferred_batch_sizes=list(preferred) or None,
                              instances=instances, instance_kind=f"KIND_{kind.upper()}", names=list(names) or None,
                              overwrite=overwrite, backend=backend, precision=precision, threads=threads)
    click.echo(report.summary())
