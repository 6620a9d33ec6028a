"""INT8 and FP16 vs FP32 latency of a detector bundle on onnxruntime CPU, side by side in one run.

    python benchmarks/bench_precisions.py BUNDLE                 # a bundle with fp32/fp16/int8
    python benchmarks/bench_precisions.py --export-yolo          # export YOLOv8n (COCO) first

Target (issue 3): INT8 at most 0.5x FP32 latency (YOLOv8n, 640, 2 threads).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import image_feed, interleaved_latency, machine_info, print_table, write_json  # noqa: E402


def export_yolo_bundle(out: Path, assets: Path) -> Path:
    from vlexport.export.bundle_export import PrecisionOptions
    from vlexport.export.yolo import YoloExportOptions, export_yolo

    export_yolo(YoloExportOptions(
        checkpoint=assets / "weights" / "yolov8n_coco.pt", trust_checkpoint=True, out=out,
        precision=PrecisionOptions(fp16=True, int8=True, calib=str(assets / "coco128" / "images" / "train2017"),
                                   calib_size=32)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", type=Path)
    ap.add_argument("--export-yolo", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/precisions.json"))
    args = ap.parse_args()

    import cv2

    from vlexport.runtime import load
    from vlexport.runtime.bundle import Bundle
    from vlexport.runtime.preprocess import Preprocessor

    assets = Path(os.environ.get("VLEXPORT_ASSETS", "../shared/assets"))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if args.export_yolo or bundle is None:
            bundle = export_yolo_bundle(Path(tmp) / "yolo", assets)
        precisions = Bundle.open(bundle).part("detector").precisions
        tasks = {p: load(bundle, precision=p, threads=args.threads, backend="onnxruntime") for p in precisions}
        image = cv2.imread(str(assets / "images" / "bus.jpg"))
        x, _ = Preprocessor(Bundle.open(bundle).preprocess)(image)
        feeds = {p: image_feed(t.backend, x) for p, t in tasks.items()}
        res = interleaved_latency({f"onnxruntime cpu {p}": (lambda t=t, f=feeds[p]: t.backend.infer(f)) for p, t in tasks.items()},
                                  rounds=args.rounds)
    base = res["onnxruntime cpu fp32"]["median_ms"]
    rows = [[k, f"{v['median_ms']:.2f}", f"{v['p90_ms']:.2f}", f"{v['median_ms'] / base:.2f}x"] for k, v in res.items()]
    print(f"\ndetector of {bundle} ({args.threads} threads, batch 1)")
    print_table(rows, ["contender", "median ms", "p90 ms", "vs fp32"])
    ratios = {p: res[f"onnxruntime cpu {p}"]["median_ms"] / base for p in precisions}
    if "int8" in ratios:
        print(f"\nint8 / fp32 latency: {ratios['int8']:.2f} (target <= 0.5): {'MET' if ratios['int8'] <= 0.5 else 'NOT MET'}")
    write_json(args.json, {"benchmark": "precisions", "bundle": str(bundle), "threads": args.threads, "results": res,
                           "ratios_vs_fp32": ratios, "machine": machine_info()})


if __name__ == "__main__":
    main()
