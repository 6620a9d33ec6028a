"""The `run` command: bundles on images, video, cameras or streams."""

from __future__ import annotations

from pathlib import Path

import click

from vlexport.cli.group import cli
from vlexport.errors import UsageError


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
def run_cmd(bundle: Path | None, source: str, detect_bundle: Path | None, segment_bundle: Path | None,
            segment_every: int, caption_bundle: Path | None, caption_every: float, caption_every_frames: int | None,
            save: Path | None, jsonl: Path | None, stats_json: Path | None, precision: str | None,
            backend: str | None, threads: int | None, score_threshold: float | None, iou_threshold: float | None,
            max_detections: int | None, max_length: int | None, track: bool, realtime: bool, no_reconnect: bool,
            max_frames: int | None, show: bool, no_progress: bool, run_classes: str | None = None) -> None:
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
    """
    from vlexport import runtime
    from vlexport.atomic import write_json_atomic
    from vlexport.runtime.sources import open_source
    from vlexport.runtime.sinks import run_on_source

    roles: dict[str, Path | None] = {"detect": detect_bundle, "segment": segment_bundle, "caption": caption_bundle}
    if bundle is not None:
        task_name = runtime.Bundle.open(bundle).task
        if task_name not in roles:
            raise UsageError(f"{bundle} is a {task_name} bundle; `run` takes detect, segment and caption bundles")
        if roles[task_name] is not None:
            raise UsageError(f"two {task_name} bundles: {bundle} and --{task_name} {roles[task_name]}")
        roles[task_name] = bundle
    if not any(roles.values()):
        raise UsageError("give a BUNDLE, or --detect/--segment/--caption bundles")
    detect_overrides = {k: v for k, v in {"score_threshold": score_threshold, "iou_threshold": iou_threshold,
                                          "max_detections": max_detections}.items() if v is not None}
    if detect_overrides and roles["detect"] is None:
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in detect_overrides)} apply to detection: "
                         "give a detection bundle")
    if max_length is not None and roles["caption"] is None:
        raise UsageError("--max-length applies to captioning: give a captioner bundle")
    new_classes = None
    if run_classes is not None:
        if roles["detect"] is None:
            raise UsageError("--classes applies to detection: give a detection bundle")
        from vlexport.runtime.text_encoder import check_class_names

        new_classes = check_class_names([c.strip() for c in run_classes.split(",") if c.strip()])
    overrides = {"detect": detect_overrides, "segment": {},
                 "caption": {"max_length": max_length} if max_length is not None else {}}
    if show:
        from vlexport.runtime.sinks import _check_display

        _check_display()
    tasks: dict[str, object] = {}
    src = None
    try:
        for role, path in roles.items():
            if path is not None:
                tasks[role] = runtime.load(path, precision=precision, backend=backend, threads=threads, **overrides[role])
                if tasks[role].bundle.task != role:
                    raise UsageError(f"--{role} {path} is a {tasks[role].bundle.task} bundle")
                if role == "detect" and new_classes is not None:
                    if not callable(getattr(tasks[role], "set_vocabulary", None)):
                        raise UsageError(f"{path}: this {tasks[role].bundle.family} bundle has a fixed vocabulary; "
                                         "--classes needs a kdeov bundle exported with --vocab-mode input")
                    tasks[role].set_vocabulary(new_classes)  # a baked bundle or no text_encoder: one clear error
        tracker = None
        if track:
            if "detect" not in tasks:
                raise UsageError("--track needs a detection bundle")
            from vlexport.runtime.tracking import Tracker

            tracker = Tracker()
        src = open_source(source, realtime=realtime, reconnect=not no_reconnect)
        main = next(tasks[r] for r in ("detect", "segment", "caption") if r in tasks)
        extra = {r: t for r, t in tasks.items() if t is not main}
        try:
            stats = run_on_source(main, src, save=save, jsonl=jsonl, progress=not no_progress, show=show,
                                  max_frames=max_frames, segment=extra.get("segment"), segment_every=segment_every,
                                  caption=extra.get("caption"), caption_every_s=caption_every,
                                  caption_every_frames=caption_every_frames, tracker=tracker)
        except KeyboardInterrupt as e:
            stats = getattr(e, "stats", None)
            if stats is not None:
                click.echo(stats.summary(), err=True)
                if stats_json is not None:
                    write_json_atomic(stats_json, stats.to_dict())
            raise
        click.echo(stats.summary())
        if stats_json is not None:
            write_json_atomic(stats_json, stats.to_dict())
    finally:
        if src is not None:
            src.close()
        for task in tasks.values():
            task.close()
