"""The `run` command: bundles on images, video, cameras or streams."""

from __future__ import annotations

from pathlib import Path

import click

from vlexport.cli.group import cli


@cli.command("run")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--source", required=True, help="Image, folder of images, glob, video file, camera index or stream URL.")
@click.option("--detect", "detect_bundle", type=click.Path(path_type=Path), help="A detection bundle: runs on every frame.")
@click.option("--segment", "segment_bundle", type=click.Path(path_type=Path), help="A segmentation bundle: every --segment-every frames.")
@click.option("--segment-every", default=1, show_default=True, type=click.IntRange(1), help="Segment every K-th frame.")
@click.option("--caption", "caption_bundle", type=click.Path(path_type=Path),
              help="A captioner bundle: runs in the background every --caption-every seconds.")
@click.option("--caption-every", default=2.0, show_default=True, type=click.FloatRange(0),
              help="Seconds between captions (acquisition time) on video and streams.")
@click.option("--caption-every-frames", type=click.IntRange(1),
              help="Caption every K frames instead of by time (images: every one by default).")
@click.option("--save", type=click.Path(path_type=Path), help="Write an annotated video (or image, for a single image).")
@click.option("--jsonl", type=click.Path(path_type=Path), help="Write one JSON record per frame.")
@click.option("--stats-json", type=click.Path(path_type=Path), help="Write the run's statistics as JSON.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), help="Default: the fastest each bundle has for this device.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]),
              help="Inference backend (default: TensorRT when usable, else onnxruntime with its best provider).")
@click.option("--threads", type=click.IntRange(1), help="Inference threads (CPU) per model.")
@click.option("--score-threshold", type=float, help="Override the detection bundle's score threshold.")
@click.option("--iou-threshold", type=float, help="Override the detection bundle's NMS IoU threshold.")
@click.option("--max-detections", type=int, help="Override the detection bundle's maximum detections per frame.")
@click.option("--classes", "run_classes",
              help='Detect these classes instead of the bundle\'s, e.g. "forklift,pallet" (a --vocab-mode input '
                   'bundle exported --with-text-encoder; the names are embedded on the spot, no torch needed).')
@click.option("--max-length", type=int, help="Override the captioner's maximum caption length.")
@click.option("--track", is_flag=True, help="Give detections stable ids across frames (ByteTrack; the track extra).")
@click.option("--realtime", is_flag=True, help="Read a video file at its own frame rate, as a live source (late frames dropped).")
@click.option("--no-reconnect", is_flag=True, help="End the run when a live stream drops instead of reconnecting.")
@click.option("--max-frames", type=click.IntRange(1), help="Stop after this many frames.")
@click.option("--show", is_flag=True, help="Show the annotated frames in a window (q or Esc stops).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--server", help="A Triton server (vlexport serve) as host:port: run --model there, in the role of its task.")
@click.option("--model", "server_model", help="The served model's name (with --server).")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True,
              help="How to talk to --server (its HTTP or its gRPC port).")
@click.option("--encoding", type=click.Choice(["bgr", "jpeg", "png"]), default="bgr", show_default=True,
              help="How frames go to --server: raw BGR (exact), or JPEG/PNG-encoded (less to send).")
def run_cmd(bundle: Path | None, source: str, detect_bundle: Path | None, segment_bundle: Path | None,
            segment_every: int, caption_bundle: Path | None, caption_every: float, caption_every_frames: int | None,
            save: Path | None, jsonl: Path | None, stats_json: Path | None, precision: str | None,
            backend: str | None, threads: int | None, score_threshold: float | None, iou_threshold: float | None,
            max_detections: int | None, max_length: int | None, track: bool, realtime: bool, no_reconnect: bool,
            max_frames: int | None, show: bool, no_progress: bool, run_classes: str | None = None,
            server: str | None = None, server_model: str | None = None, protocol: str = "http",
            encoding: str = "bgr") -> None:
    """Run bundles on images, video, cameras or streams; write an annotated video and/or JSONL.

    One BUNDLE runs alone (its task decides what it does). Several bundles share one stream at
    their own rates: --detect on every frame, --segment every K frames, --caption every N seconds
    in the background; each result is attached to the frame it was computed on. Ctrl-C stops
    cleanly: the video and JSONL hold every frame processed so far.

    \b
    Examples:
      vlexport run bundles/yolo-yolov8n --source bus.jpg --save bus_annotated.jpg
      vlexport run bundles/yolo-yolov8n --source traffic.mp4 --save out.mp4 --jsonl out.jsonl --track
      vlexport run --detect bundles/yolo --segment bundles/seg --segment-every 5 \\
          --caption bundles/cap --caption-every 2 --source rtsp://camera/stream --save out.mp4
      vlexport run bundles/cap --source photos/ --jsonl captions.jsonl
      vlexport run bundles/kdeov-input --classes "forklift,pallet" --source warehouse.mp4 --save out.mp4
      vlexport run --server 127.0.0.1:8000 --model yolo --source traffic.mp4 --jsonl out.jsonl
    """
    from vlexport.runtime.run import RunRequest, run_bundles

    request = RunRequest(source=source, bundle=bundle, detect=detect_bundle, segment=segment_bundle,
                         caption=caption_bundle, segment_every=segment_every, caption_every_s=caption_every,
                         caption_every_frames=caption_every_frames, save=save, jsonl=jsonl, stats_json=stats_json,
                         precision=precision, backend=backend, threads=threads, score_threshold=score_threshold,
                         iou_threshold=iou_threshold, max_detections=max_detections, max_length=max_length,
                         classes=run_classes, track=track, realtime=realtime, reconnect=not no_reconnect,
                         max_frames=max_frames, show=show, progress=not no_progress, server=server,
                         model=server_model, protocol=protocol, encoding=encoding)
    try:
        stats = run_bundles(request)
    except KeyboardInterrupt as e:  # the outputs are complete; say what was done, then exit 130
        if getattr(e, "stats", None) is not None:
            click.echo(e.stats.summary(), err=True)
        raise
    click.echo(stats.summary())
