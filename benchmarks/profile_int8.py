"""Where an ONNX graph's time goes on onnxruntime CPU, per node type and per node, and which parts
became integer kernels (QLinearConv, QLinearMatMul, ...) after onnxruntime's optimisations.

    python benchmarks/profile_int8.py detector.onnx detector.int8.onnx       # side by side
    python benchmarks/profile_int8.py fp32=a.onnx int8=b.onnx --threads 2 --runs 20 --json out.json

Each graph runs under the runtime's session options (2 intra-op threads, 1 inter-op thread by
default); the input is the first image of --image, letterboxed to the graph's input size, or
random data when the input is not an image. Prints one table and the slowest nodes; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402


def _feeds(path: Path, image: Path | None) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for arg in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        if image is not None and len(shape) == 4 and shape[1] == 3:
            import cv2

            from vlexport.runtime.preprocess import Preprocessor

            pre = Preprocessor({"size": [shape[2], shape[3]], "resize": "letterbox", "pad_value": 114,
                                "color": "RGB", "scale": 1 / 255.0, "mean": [0, 0, 0], "std": [1, 1, 1]})
            x = pre(cv2.imread(str(image)))[0]
            if arg.type == "tensor(uint8)":  # the cpu target's pixel input: the graph's own codes
                from vlexport.runtime.backends.onnxruntime import QUANTIZED_INPUTS_KEY, quantize_feed

                q = json.loads(sess.get_modelmeta().custom_metadata_map.get(QUANTIZED_INPUTS_KEY, "{}"))[arg.name]
                x = quantize_feed(x, q["scale"], q["zero_point"])
            feeds[arg.name] = x
        else:
            feeds[arg.name] = np.random.default_rng(0).random(shape, dtype=np.float32)
    return feeds


def main() -> None:
    from vlexport.calibration.profile import format_profile, profile_graph

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", help="ONNX files, optionally named: NAME=PATH")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--top", type=int, default=15, help="slowest nodes to list per graph")
    ap.add_argument("--image", type=Path,
                    default=Path(os.environ.get("VLEXPORT_ASSETS", "../shared/assets")) / "images" / "bus.jpg")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/profile_int8.json"))
    args = ap.parse_args()

    named = {}
    for g in args.graphs:
        name, _, path = g.partition("=") if "=" in g else (Path(g).name, "", g)
        named[name] = Path(path)
    image = args.image if args.image.is_file() else None
    profiles = {name: profile_graph(p, _feeds(p, image), threads=args.threads, runs=args.runs, top=args.top)
                for name, p in named.items()}
    print(f"\nonnxruntime CPU, {args.threads} threads, {args.runs} runs (kernel ms per run, node count)")
    print(format_profile(profiles))
    for name, p in profiles.items():
        print(f"\n{name}: slowest nodes")
        for d in p.by_node[: args.top]:
            print(f"  {d['ms']:7.3f} ms  {d['op_type']:<18} {d['name']}")
    write_json(args.json, {"benchmark": "profile_int8", "threads": args.threads, "runs": args.runs,
                           "graphs": {k: v.to_dict() for k, v in profiles.items()}, "machine": machine_info()})


if __name__ == "__main__":
    main()
