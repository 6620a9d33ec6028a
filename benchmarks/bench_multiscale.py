"""Multi-scale binary segmenter: the exported graph on onnxruntime vs PyTorch eager, and ABSI vs
hierarchical fusion, side by side (interleaved rounds), on the CPU with the same thread count.

For each preset and fusion, the same weights (random, BatchNorm statistics taken from the asset
images so that activations have realistic magnitudes) are saved as a checkpoint and exported with
`export_multiscale`, the way a user exports a trained model. The network alone is timed on the
same pre-processed bus.jpg tensor; "segment()" is the runtime end to end (letterbox, graph,
logits back to 810x1080, threshold).

    python benchmarks/bench_multiscale.py                     # r50 @ 352 and tiny @ 320, FP32/FP16/INT8
    python benchmarks/bench_multiscale.py --presets r50 --no-fp16 --no-int8 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_latency, machine_info, print_table, write_json  # noqa: E402

FUSIONS = ("absi", "hierarchical")


def _model_with_real_bn_stats(preset: str, fusion: str, images, seed: int = 0):
    """A preset's segmenter (random weights) whose BatchNorm statistics come from ``images``."""
    import torch

    from vlexport.models.multiscale.model import build_multiscale

    torch.manual_seed(seed)
    model = build_multiscale(preset, fusion)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for i in range(images.shape[0]):
            model(images[i:i + 1])
    return model.eval()


def bench_preset(preset: str, args, tmp: Path, assets: Path) -> dict:
    import cv2
    import numpy as np
    import torch

    from vlexport.export.multiscale import MultiScaleExportOptions, export_multiscale, multiscale_preprocess
    from vlexport.export.bundle_export import PrecisionOptions
    from vlexport.models.multiscale.model import MULTISCALE_PRESETS
    from vlexport.runtime import load
    from vlexport.runtime.preprocess import Preprocessor

    size = MULTISCALE_PRESETS[preset].image_size
    pre = Preprocessor(multiscale_preprocess(size))
    frames = [cv2.imread(str(p)) for p in sorted((assets / "images").glob("*.jpg"))]
    calib_images = torch.from_numpy(pre.batch(frames)[0])
    bus = cv2.imread(str(assets / "images" / "bus.jpg"))
    x = pre(bus)[0]
    xt = torch.from_numpy(x)

    contenders, info, tasks = {}, {}, []
    for fusion in FUSIONS:
        print(f"[{preset}/{fusion}] preparing the model and exporting…", flush=True)
        model = _model_with_real_bn_stats(preset, fusion, calib_images)
        ckpt = tmp / f"{preset}-{fusion}.pt"
        torch.save(model.state_dict(), ckpt)
        out = tmp / f"{preset}-{fusion}"
        precision = PrecisionOptions(fp16=args.fp16, int8=args.int8, calib=str(assets / "images") if args.int8 else None,
                                     calib_size=args.calib_size, calib_method="minmax", int8_target="cpu")
        report = export_multiscale(MultiScaleExportOptions(out=out, preset=preset, fusion=fusion, checkpoint=ckpt,
                                                           parity_count=1, precision=precision))
        info[fusion] = {"parity": report.parity, "export_seconds": round(report.seconds, 1),
                        "parameters": int(sum(p.numel() for p in model.parameters())),
                        "files_mb": {f: round((out / f).stat().st_size / 2**20, 1) for f in report.files
                                     if f.endswith(".onnx")}}

        def eager(model=model):
            with torch.inference_mode():
                model(xt)

        contenders[f"{fusion}: pytorch eager fp32"] = eager
        files = {"fp32": "segmenter.onnx", "fp16": "segmenter.fp16.onnx", "int8": "segmenter.int8.onnx"}
        for prec, name in files.items():
            if name not in report.files:
                continue
            task = load(out, precision=prec, backend="onnxruntime", threads=args.threads)
            tasks.append(task)
            contenders[f"{fusion}: onnxruntime {prec}"] = lambda task=task: task.backend.infer({"images": x})
            if prec == "fp32":
                contenders[f"{fusion}: runtime segment() fp32, 810x1080 in/out"] = lambda task=task: task.segment(bus)
                with torch.inference_mode():
                    ref = model(xt).numpy()
                got = task.backend.infer({"images": x})["logits"]
                info[fusion]["bench_input_fp32_max_abs"] = float(np.abs(got - ref).max())

    print(f"[{preset}] timing {len(contenders)} contenders, {args.rounds} rounds…", flush=True)
    res = interleaved_latency(contenders, warmup=args.warmup, rounds=args.rounds, per_round=args.per_round)
    for t in tasks:
        t.close()
    rows = []
    for name, r in res.items():
        fusion = name.split(":")[0]
        base = res[f"{fusion}: pytorch eager fp32"]["median_ms"]
        rows.append([name, f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{base / r['median_ms']:.2f}x"])
    print(f"\nmultiscale {preset} @ {size}x{size} (3 scales), {args.threads} threads, {res[next(iter(res))]['runs']} runs each")
    print_table(rows, ["contender", "median ms", "p90 ms", "speed-up vs eager (same fusion)"])
    fusion_rows = []
    for kind in ("pytorch eager fp32", "onnxruntime fp32", "onnxruntime fp16", "onnxruntime int8"):
        a, h = res.get(f"absi: {kind}"), res.get(f"hierarchical: {kind}")
        if a and h:
            fusion_rows.append([kind, f"{a['median_ms']:.1f}", f"{h['median_ms']:.1f}",
                                f"{h['median_ms'] / a['median_ms']:.2f}"])
    print()
    print_table(fusion_rows, ["backend", "absi ms", "hierarchical ms", "hierarchical / absi"])
    print()
    return {"image_size": size, "latency_ms": res, "models": info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="r50,tiny", help="comma-separated presets (each at its image size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="also time FP16 (slow on a CPU)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="also time INT8 (--int8-target cpu, minmax on the asset images)")
    ap.add_argument("--calib-size", type=int, default=4)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/multiscale.json"))
    args = ap.parse_args()

    import logging

    import torch

    logging.getLogger("vlexport").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    assets = Path(os.environ.get("VLEXPORT_ASSETS", "../shared/assets"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            results[preset] = bench_preset(preset, args, Path(tmp), assets)
    write_json(args.json, {"benchmark": "multiscale", "machine": machine_info(), "threads": args.threads,
                           "rounds": args.rounds, "per_round": args.per_round, "results": results})


if __name__ == "__main__":
    main()
