"""Latency of the exported KDEOV detector vs PyTorch eager on the same model and input.

Side by side in one run, interleaved: PyTorch eager (fp32), onnxruntime CPU fp32 and fp16,
all limited to the same number of threads (default 2).

    python benchmarks/bench_kdeov_detector.py                # YOLOv8n backbone, 640x640
    python benchmarks/bench_kdeov_detector.py --preset tiny  # quick smoke run

Target (issue 2): the export at most half PyTorch's latency.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_latency, machine_info, print_table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="yolov8n-vitb32")
    ap.add_argument("--imgsz", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--image", default=None, help="Input image (default: $VLEXPORT_ASSETS/images/bus.jpg)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/kdeov_detector.json"))
    args = ap.parse_args()

    import cv2
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from vlexport.export.kdeov import KDEOVExportOptions, build_plan
    from vlexport.export.bundle_export import write_bundle
    from vlexport.runtime import load
    from vlexport.runtime.preprocess import Preprocessor

    with tempfile.TemporaryDirectory() as tmp:
        opts = KDEOVExportOptions(out=Path(tmp) / "b", preset=args.preset, imgsz=args.imgsz, templates="single", fp16=True)
        plan = build_plan(opts)
        write_bundle(plan, opts.out, fp16=True)
        detector = next(p for p in plan.parts if p.name == "detector").module.eval()

        assets = Path(os.environ.get("VLEXPORT_ASSETS", "../shared/assets"))
        image = cv2.imread(args.image or str(assets / "images" / "bus.jpg"))
        if image is None:
            image = np.full((480, 640, 3), 127, np.uint8)
        x_np, _ = Preprocessor(plan.preprocess)(image)
        x = torch.from_numpy(x_np)

        ort32 = load(opts.out, precision="fp32", threads=args.threads)
        ort16 = load(opts.out, precision="fp16", threads=args.threads)
        feeds = {"images": x_np}

        def torch_eager():
            # The model's own eager path: detect_raw + best class, as a PyTorch user runs it.
            with torch.inference_mode():
                detector.reference(x)

        contenders = {
            "pytorch eager fp32": torch_eager,
            "onnxruntime cpu fp32": lambda: ort32.backend.infer(feeds),
            "onnxruntime cpu fp16": lambda: ort16.backend.infer(feeds),
        }
        res = interleaved_latency(contenders, rounds=args.rounds)

    base = res["pytorch eager fp32"]["median_ms"]
    rows = [[k, f"{v['median_ms']:.2f}", f"{v['p90_ms']:.2f}", f"{v['median_ms'] / base:.2f}x"] for k, v in res.items()]
    size = plan.preprocess["size"]
    print(f"\nKDEOV detector ({args.preset}, {size[0]}x{size[1]}, batch 1, {args.threads} threads)")
    print_table(rows, ["contender", "median ms", "p90 ms", "vs pytorch"])
    ratio = res["onnxruntime cpu fp32"]["median_ms"] / base
    print(f"\nexport fp32 / pytorch latency ratio: {ratio:.2f} (target <= 0.5): {'MET' if ratio <= 0.5 else 'NOT MET'}")
    write_json(args.json, {"benchmark": "kdeov_detector", "preset": args.preset, "imgsz": size, "threads": args.threads,
                           "results": res, "ratio_fp32_vs_torch": ratio, "target_ratio": 0.5, "machine": machine_info()})


if __name__ == "__main__":
    main()
