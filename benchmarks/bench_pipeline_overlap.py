"""What overlapping the stages buys: the threaded Pipeline vs a sequential loop, same work.

Both decode the video, detect on every frame, draw the detections and write an MP4 and a JSONL.
The sequential loop does it one step after the other in one thread (the way a first script
does); the Pipeline runs decoding (+ letterbox), inference and drawing/writing on three threads.
They alternate over several rounds; medians are reported.

    python benchmarks/bench_pipeline_overlap.py --bundle bundles/yolo-yolov8n
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def sequential(task, video: Path, out: Path, frames: int) -> float:
    from vlexport.runtime.draw import draw_detections
    from vlexport.runtime.sources import open_source
    from vlexport.runtime.sinks import JsonlSink, VideoSink

    src = open_source(str(video))
    n = 0
    t0 = time.perf_counter()
    with VideoSink(out / "seq.mp4", fps=src.fps) as vid, JsonlSink(out / "seq.jsonl") as js:
        for frame in src:
            dets = task.detect(frame.image, frame.stamp)
            vid.write(draw_detections(frame.image, dets))
            js.write({**frame.stamp.to_dict(), "detections": dets.records()})
            n += 1
            if n >= frames:
                break
    src.close()
    return n / (time.perf_counter() - t0)


def threaded(task, video: Path, out: Path, frames: int) -> float:
    from vlexport.runtime.run import run_on_source

    stats = run_on_source(task, str(video), save=out / "thr.mp4", jsonl=out / "thr.jsonl", progress=False,
                          max_frames=frames)
    return stats.fps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--video", default=str(ASSETS / "video" / "car-detection.mp4"))
    ap.add_argument("--frames", type=int, default=377)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/pipeline_overlap.json")
    args = ap.parse_args()

    from vlexport import runtime

    fps: dict[str, list[float]] = {"sequential (1 thread)": [], "pipeline (3 threads)": []}
    with runtime.load(args.bundle, precision=args.precision, threads=args.threads) as task, \
            tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            fps["sequential (1 thread)"].append(sequential(task, Path(args.video), Path(tmp), args.frames))
            fps["pipeline (3 threads)"].append(threaded(task, Path(args.video), Path(tmp), args.frames))
        precision = task.precision
    med = {k: statistics.median(v) for k, v in fps.items()}
    base = med["sequential (1 thread)"]
    print_table([[k, precision, f"{v:.1f}", f"{v / base:.2f}x"] for k, v in med.items()],
                ["decode + detect + draw + write MP4/JSONL", "precision", "FPS (median)", "vs sequential"])
    write_json(Path(args.out), {"bundle": args.bundle, "precision": precision, "threads": args.threads,
                                "rounds": fps, "median_fps": med, "machine": machine_info()})


if __name__ == "__main__":
    main()
