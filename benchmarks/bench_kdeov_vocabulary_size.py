"""KDEOV detector latency with a baked vocabulary of 1000 classes vs 80, side by side in one run.

Both bundles come from the same student (YOLOv8n backbone with the COCO weights, random text
tower) and differ only in the baked class embeddings; onnxruntime CPU, interleaved rounds.

    python benchmarks/bench_kdeov_vocabulary_size.py
    python benchmarks/bench_kdeov_vocabulary_size.py --preset tiny      # quick smoke run

Target (issue 12): 1000 classes at most 10 % slower than 80.
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
    ap.add_argument("--sizes", default="80,1000", help="vocabulary sizes to compare (the first is the baseline)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/kdeov_vocabulary_size.json"))
    args = ap.parse_args()

    import cv2
    import numpy as np

    from vlexport.export.kdeov import KDEOVExportOptions, export_kdeov
    from vlexport.runtime import load

    assets = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
    weights = assets / "weights" / "yolov8n_coco_state_dict.pt"
    sizes = [int(s) for s in args.sizes.split(",")]
    image = cv2.imread(str(assets / "images" / "bus.jpg"))
    contenders, tasks = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            names = [f"object number {i}" for i in range(n)]
            out = Path(tmp) / f"v{n}"
            export_kdeov(KDEOVExportOptions(out=out, preset=args.preset, classes=names, templates="single",
                                            backbone_weights=weights if args.preset != "tiny" else None,
                                            parity_count=1))
            task = load(out, precision="fp32", threads=args.threads)
            tasks.append(task)
            tensor, _ = task.preprocessor.batch([image])
            feeds = {"images": np.ascontiguousarray(tensor)}
            contenders[f"{n} classes, graph"] = (lambda t=task, f=feeds: t.backend.infer(f))
            contenders[f"{n} classes, detect()"] = (lambda t=task: t.detect(image))
        res = interleaved_latency(contenders, rounds=args.rounds)
        for task in tasks:
            task.close()

    base = {kind: res[f"{sizes[0]} classes, {kind}"]["median_ms"] for kind in ("graph", "detect()")}
    rows = [[k, f"{v['median_ms']:.2f}", f"{v['p90_ms']:.2f}", f"{v['median_ms'] / base[k.split(', ')[1]]:.3f}x"]
            for k, v in res.items()]
    print(f"\nKDEOV detector ({args.preset}), baked vocabularies {sizes}, batch 1, {args.threads} threads")
    print_table(rows, ["contender", "median ms", "p90 ms", f"vs {sizes[0]} classes"])
    ratio = res[f"{sizes[-1]} classes, graph"]["median_ms"] / base["graph"]
    print(f"\n{sizes[-1]} / {sizes[0]} classes latency (graph): {ratio:.3f} (target <= 1.10): "
          f"{'MET' if ratio <= 1.10 else 'NOT MET'}")
    write_json(args.json, {"benchmark": "kdeov_vocabulary_size", "preset": args.preset, "sizes": sizes,
                           "threads": args.threads, "results": res, "ratio": ratio, "target_ratio": 1.10,
                           "machine": machine_info()})


if __name__ == "__main__":
    main()
