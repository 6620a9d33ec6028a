"""SCLIP sliding windows: the exported segmenter (all crops in one batch, onnxruntime CPU, numpy
stitching and post-processing) vs the PyTorch per-crop loop, on a 1024x768 image, side by side.

    python benchmarks/bench_sclip_slide.py                 # ViT-B/16, crop 224, stride 112
    python benchmarks/bench_sclip_slide.py --preset tiny   # quick smoke run
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
    ap.add_argument("--preset", default="vit-b16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pamr-steps", type=int, default=10, help="PAMR iterations for the PAMR comparison (0: skip it)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/sclip_slide.json"))
    args = ap.parse_args()

    import cv2
    import torch

    torch.set_num_threads(args.threads)
    from vlexport.export.sclip import SCLIPExportOptions, export_sclip
    from vlexport.models.sclip.model import SCLIPSegmenter
    from vlexport.runtime import load

    classes = ["sky", "tree", "road", "person", "bus", "car", "building", "grass"]
    assets = Path(os.environ.get("VLEXPORT_ASSETS", "../shared/assets"))
    image = cv2.resize(cv2.imread(str(assets / "images" / "bus.jpg")), (1024, 768))
    seg = SCLIPSegmenter.from_preset(args.preset, classes, templates=("a photo of a {}.",))
    seg_loop = SCLIPSegmenter(seg.loaded, seg.config, classes, templates=("a photo of a {}.",))
    seg_loop.slide_logits = seg_loop.slide_logits_loop  # same model, one crop at a time
    with tempfile.TemporaryDirectory() as tmp:
        export_sclip(SCLIPExportOptions(out=Path(tmp) / "b", preset=args.preset, classes=classes, templates="single",
                                        parity_count=1))
        task = load(Path(tmp) / "b", precision="fp32", threads=args.threads)

        crops, _, _ = task.preprocess(image)

        def crops_loop():
            with torch.inference_mode():
                for c in torch.from_numpy(crops):
                    seg.crop_logits(c[None])

        # End to end (image in, label map at 1024x768 out) and the network alone (the crops).
        res = interleaved_latency({
            "end to end: pytorch, per-crop loop": lambda: seg_loop.segment(image),
            "end to end: pytorch, one batch": lambda: seg.segment(image),
            "end to end: export (onnxruntime, one batch) + numpy runtime": lambda: task.segment(image),
            "crops only: pytorch per-crop loop": crops_loop,
            "crops only: onnxruntime one batch": lambda: task.backend.infer({"crops": crops}),
        }, warmup=1, rounds=args.rounds, per_round=1)
        windows = task.last_windows  # windows cut from the last frame
        pamr = {}
        if args.pamr_steps > 0:
            # PAMR at the image's own size: numpy in the runtime vs the exported `refiner` graph.
            pamr_tasks = {}
            for where in ("runtime", "graph"):
                out = Path(tmp) / f"pamr-{where}"
                export_sclip(SCLIPExportOptions(out=out, preset=args.preset, classes=classes, templates="single",
                                                parity_count=1, pamr_steps=args.pamr_steps, pamr_in=where))
                pamr_tasks[where] = load(out, precision="fp32", threads=args.threads)
            pamr = interleaved_latency({f"end to end with PAMR x{args.pamr_steps} in the {w}": (lambda t=t: t.segment(image))
                                        for w, t in pamr_tasks.items()}, warmup=1, rounds=args.rounds, per_round=1)
    base = res["end to end: pytorch, per-crop loop"]["median_ms"]
    rows = [[k, f"{v['median_ms']:.0f}", f"{v['median_ms'] / base:.2f}x"] for k, v in res.items()]
    print(f"\nSCLIP {args.preset} on a 1024x768 image ({windows} windows), {args.threads} threads")
    print_table(rows, ["contender", "median ms", "vs loop"])
    if pamr:
        print()
        print_table([[k, f"{v['median_ms']:.0f}"] for k, v in pamr.items()], ["PAMR", "median ms"])
    write_json(args.json, {"benchmark": "sclip_slide", "preset": args.preset, "windows": windows, "results": res,
                           "pamr": pamr, "machine": machine_info()})


if __name__ == "__main__":
    main()
