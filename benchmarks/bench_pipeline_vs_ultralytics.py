"""End-to-end FPS on a video: `vlexport run`'s pipeline vs Ultralytics' own `predict(stream=True)`.

Same weights (the shared YOLOv8n COCO checkpoint), same video, same onnxruntime, same number of
threads (2: all this machine's cores, Ultralytics' default too), no outputs written by either.
Ultralytics runs the ONNX file it exports itself. The pipeline runs the bundle at its fastest
precision for this machine (what `vlexport run` picks by default) and at FP32. The ceiling is the
model's pure inference throughput: the bundle's detector graph alone, fed one pre-processed
frame again and again. Contenders alternate over several rounds; medians are reported.

    python benchmarks/bench_pipeline_vs_ultralytics.py            # exports into a temporary folder
    python benchmarks/bench_pipeline_vs_ultralytics.py --bundle bundles/yolo-int8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def _export_bundle(tmp: Path, weights: Path) -> Path:
    from vlexport.export.bundle_export import PrecisionOptions
    from vlexport.export.yolo import YoloExportOptions, export_yolo

    print("exporting the YOLOv8n bundle (FP32 + FP16 + INT8 for the CPU) …")
    report = export_yolo(YoloExportOptions(
        checkpoint=weights, trust_checkpoint=True, out=tmp / "yolo",
        precision=PrecisionOptions(fp16=True, int8=True, int8_target="cpu",
                                   calib=str(ASSETS / "coco128" / "images" / "train2017"), calib_size=32)))
    return report.path


def _ultralytics_onnx(tmp: Path, weights: Path) -> Path:
    from ultralytics import YOLO

    local = tmp / weights.name
    shutil.copy(weights, local)
    print("exporting Ultralytics' own ONNX …")
    return Path(YOLO(str(local)).export(format="onnx", imgsz=640, verbose=False))


def ultralytics_fps(onnx_path: Path, video: Path, frames: int) -> float:
    from ultralytics import YOLO

    model = YOLO(str(onnx_path), task="detect")
    n = 0
    t0 = time.perf_counter()
    for _ in model.predict(source=str(video), stream=True, verbose=False, imgsz=640, device="cpu"):
        n += 1
        if n >= frames:
            break
    return n / (time.perf_counter() - t0)


def pipeline_fps(bundle: Path, video: Path, frames: int, precision: str | None, threads: int) -> tuple[float, dict]:
    from vlexport import runtime
    from vlexport.runtime.pipeline import Pipeline

    with runtime.load(bundle, precision=precision, threads=threads) as task:
        chosen = task.precision
        pipe = Pipeline(str(video), detect=task, max_frames=frames)
        stats = pipe.run()
    return stats.fps, {"precision": chosen, **stats.to_dict()}


def inference_ceiling(bundle: Path, video: Path, precision: str, threads: int, runs: int = 60) -> float:
    """Inferences per second of the detector graph alone on one real pre-processed frame."""
    import cv2

    from vlexport import runtime

    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    cap.release()
    assert ok
    with runtime.load(bundle, precision=precision, threads=threads) as task:
        tensor, _ = task.preprocessor.batch([frame])
        feeds = {"images": tensor}
        for _ in range(5):
            task.backend.infer(feeds)
        t0 = time.perf_counter()
        for _ in range(runs):
            task.backend.infer(feeds)
        return runs / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a YOLOv8n bundle with fp32 (+ int8 cpu target); default: export one")
    ap.add_argument("--weights", default=str(ASSETS / "weights" / "yolov8n_coco.pt"))
    ap.add_argument("--video", default=str(ASSETS / "video" / "car-detection.mp4"))
    ap.add_argument("--frames", type=int, default=377)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/pipeline_vs_ultralytics.json")
    args = ap.parse_args()
    video, weights = Path(args.video), Path(args.weights)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundle = Path(args.bundle) if args.bundle else _export_bundle(tmp, weights)
        ultra_onnx = _ultralytics_onnx(tmp, weights)
        runs: dict[str, list[float]] = {"ultralytics fp32": [], "vlexport default": [], "vlexport fp32": []}
        details: dict[str, dict] = {}
        for r in range(args.rounds):
            runs["ultralytics fp32"].append(ultralytics_fps(ultra_onnx, video, args.frames))
            fps, details["vlexport default"] = pipeline_fps(bundle, video, args.frames, None, args.threads)
            runs["vlexport default"].append(fps)
            fps, details["vlexport fp32"] = pipeline_fps(bundle, video, args.frames, "fp32", args.threads)
            runs["vlexport fp32"].append(fps)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()))
        default_precision = details["vlexport default"]["precision"]
        ceilings = {p: inference_ceiling(bundle, video, p, args.threads) for p in sorted({default_precision, "fp32"})}
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = [["Ultralytics predict(stream=True), its ONNX", "fp32", f"{med['ultralytics fp32']:.1f}", "1.00x", "-"],
            ["vlexport pipeline, default precision", default_precision, f"{med['vlexport default']:.1f}",
             f"{med['vlexport default'] / med['ultralytics fp32']:.2f}x",
             f"{med['vlexport default'] / ceilings[default_precision]:.0%}"],
            ["vlexport pipeline", "fp32", f"{med['vlexport fp32']:.1f}", f"{med['vlexport fp32'] / med['ultralytics fp32']:.2f}x",
             f"{med['vlexport fp32'] / ceilings['fp32']:.0%}"]]
    print_table(rows, ["end to end on " + video.name, "precision", "FPS (median)", "vs Ultralytics", "of inference ceiling"])
    print("inference ceiling (graph alone): " + ", ".join(f"{p} {v:.1f}/s" for p, v in ceilings.items()))
    print("targets: default >= 1.5x Ultralytics, fp32 >= 1.1x, both >= 90% of the ceiling")
    write_json(Path(args.out), {"video": str(video), "frames": args.frames, "threads": args.threads,
                                "rounds": runs, "median_fps": med, "inference_ceiling": ceilings,
                                "pipeline_stats": details, "machine": machine_info(), "numpy": np.__version__})


if __name__ == "__main__":
    main()
