"""YOLOv8n INT8 on onnxruntime CPU: latency and held-out mAP, side by side in one run.

    python benchmarks/bench_int8_cpu.py --baseline-int8 "old cpu int8=OLD.int8.onnx"   # with older graphs
    python benchmarks/bench_int8_cpu.py --no-gate --rounds 20

Contenders, timed interleaved (2 intra-op threads, batch 1, bus.jpg):
  * vlexport FP32 and vlexport's ``--int8-target cpu`` INT8 (exported here, 32 calibration images);
  * optionally ``--baseline-int8 NAME=PATH`` (repeatable): another INT8 graph of the same FP32 detector (e.g. the cpu
    target's graph before a change, saved from an earlier export);
  * Ultralytics' own ONNX export (``YOLO(weights).export(format="onnx")``), FP32 and after a plain
    ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, default settings otherwise),
    and the same with uint8 activations, calibrated on the same 32 images.
mAP50-95 / mAP50 of vlexport FP32 and INT8 (and the baseline) on --val-size COCO128 images that
calibration did not use; with the gate (default), the export is repeated with ``--val`` and
``--max-drop``: its INT8 graph (the precision search's choice) joins the contenders, and the
points the search measured are reported. Targets (issue 15): INT8 <= 0.45x
FP32 latency and <= 1.0 point mAP50-95 below FP32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import image_feed, interleaved_latency, machine_info, paired_ratio, print_table, write_json  # noqa: E402

SEARCHED = "vlexport int8, searched (--val)"


def export_bundle(out: Path, assets: Path, calib_size: int, val: str | None = None, max_drop: float = 1.0,
                  calib_method: str = "auto"):
    from vlexport.export.bundle_export import PrecisionOptions
    from vlexport.export.yolo import YoloExportOptions, export_yolo

    return export_yolo(YoloExportOptions(
        checkpoint=assets / "weights" / "yolov8n_coco.pt", trust_checkpoint=True, out=out,
        precision=PrecisionOptions(int8=True, int8_target="cpu", calib=str(assets / "coco128" / "images" / "train2017"),
                                   calib_size=calib_size, calib_method=calib_method, val=val, max_drop=max_drop)))


def ultralytics_graphs(assets: Path, work: Path, feeds: list[dict[str, np.ndarray]]) -> tuple[Path, Path, Path]:
    """Ultralytics' ONNX export of the shared weights and plain quantize_static graphs of it: the
    default settings (int8 activations) and uint8 activations (onnxruntime's x86 fast path)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from ultralytics import YOLO

    weights = work / "yolov8n_coco.pt"
    shutil.copy(assets / "weights" / "yolov8n_coco.pt", weights)
    fp32 = Path(YOLO(str(weights)).export(format="onnx", imgsz=640, verbose=False))
    prepared = work / "ul_prepared.onnx"
    quant_pre_process(str(fp32), str(prepared))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    int8 = work / "ul_quantize_static.onnx"
    quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    uint8 = work / "ul_quantize_static_u8.onnx"
    quantize_static(str(prepared), str(uint8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8)
    return fp32, int8, uint8


def bundle_with_int8(src: Path, int8: Path, out: Path) -> Path:
    """A copy of bundle ``src`` whose INT8 detector is ``int8`` (hashes rewritten)."""
    from vlexport.runtime.bundle import sha256_file

    out.mkdir(parents=True)
    shutil.copy(src / "detector.onnx", out / "detector.onnx")
    shutil.copy(int8, out / "detector.int8.onnx")
    m = json.loads((src / "manifest.json").read_text())
    m["files"] = {f: "sha256:" + sha256_file(out / f) for f in m["files"]}
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def held_out_map(bundles: dict[str, tuple[Path, str]], assets: Path, calib_size: int, val_size: int) -> dict:
    from vlexport import runtime
    from vlexport.data.detection import load_detection_dataset
    from vlexport.data.readers import calibration_frames
    from vlexport.evaluation.detection import evaluate_detector

    calib = {str(Path(n).resolve())
             for n in calibration_frames(str(assets / "coco128" / "images" / "train2017"), calib_size, seed=0).names}
    ds = load_detection_dataset(str(assets / "coco128" / "data.yaml"))
    keep = [i for i, it in enumerate(ds.items) if str(Path(it.image_path).resolve()) not in calib][:val_size]
    subset = ds.subset(keep)
    out = {}
    for name, (bundle, precision) in bundles.items():
        task = runtime.load(bundle, precision=precision, backend="onnxruntime", score_threshold=0.001,
                            max_detections=300, threads=2)
        try:
            out[name] = evaluate_detector(task, subset).to_dict()
        finally:
            task.close()
        print(f"  {name}: mAP50-95 {100 * out[name]['map50_95']:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-int8", action="append", default=[], metavar="NAME=PATH",
                    help="another INT8 graph of the same FP32 detector to compare (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--val-size", type=int, default=96)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--calib-method", default="auto", help="--calib-method of both exports (default: auto)")
    ap.add_argument("--no-gate", action="store_true", help="skip the export with the accuracy gate")
    ap.add_argument("--keep", type=Path, help="keep the bundles and graphs in this folder")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/int8_cpu.json"))
    args = ap.parse_args()

    import cv2

    from vlexport.calibration.profile import profile_graph
    from vlexport.data.readers import calibration_frames
    from vlexport.runtime.backends.onnxruntime import OrtBackend
    from vlexport.runtime.bundle import Bundle
    from vlexport.runtime.preprocess import Preprocessor

    assets = Path(os.environ.get("VLEXPORT_ASSETS", "../shared/assets"))
    tmp = tempfile.TemporaryDirectory()
    work = args.keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    bundle = export_bundle(work / "yolo_cpu", assets, args.calib_size, calib_method=args.calib_method).path
    export_s = time.perf_counter() - t
    pre = Preprocessor(Bundle.open(bundle).preprocess)
    calib = calibration_frames(str(assets / "coco128" / "images" / "train2017"), args.calib_size, seed=0)
    feeds = [{"images": pre(f)[0]} for f in calib.frames]
    ul_fp32, ul_int8, ul_uint8 = ultralytics_graphs(assets, work, feeds)

    gate = None
    searched = None
    if not args.no_gate:
        t = time.perf_counter()
        rep = export_bundle(work / "yolo_cpu_gated", assets, args.calib_size, str(assets / "coco128" / "data.yaml"),
                            args.max_drop, args.calib_method)
        gate_s = time.perf_counter() - t
        manifest = json.loads((rep.path / "manifest.json").read_text())
        gate = {"rounds": rep.gate, "metrics": rep.metrics, "seconds": gate_s,
                "excluded_nodes": manifest.get("calibration", {}).get("excluded_nodes")}
        if (rep.path / "detector.int8.onnx").is_file():
            searched = rep.path

    graphs = {"vlexport fp32": bundle / "detector.onnx", "vlexport int8 (cpu target)": bundle / "detector.int8.onnx"}
    if searched is not None:  # the graph a user gets with --val: the precision search's choice
        graphs[SEARCHED] = searched / "detector.int8.onnx"
    baselines = {}
    for b in args.baseline_int8:
        name, _, path = b.partition("=") if "=" in b else ("baseline int8", "", b)
        baselines[name] = Path(path)
    graphs.update(baselines)
    graphs["ultralytics fp32"] = ul_fp32
    graphs["ultralytics + quantize_static"] = ul_int8
    graphs["ultralytics + quantize_static (uint8 act.)"] = ul_uint8
    x = {"images": pre(cv2.imread(str(assets / "images" / "bus.jpg")))[0]}
    backends = {k: OrtBackend(p, providers=["CPUExecutionProvider"], threads=args.threads) for k, p in graphs.items()}
    feeds_of = {k: image_feed(b, x["images"]) for k, b in backends.items()}
    lat = interleaved_latency({k: (lambda b=b, f=feeds_of[k]: b.infer(f)) for k, b in backends.items()},
                              rounds=args.rounds)
    profiles = {k: profile_graph(p, feeds_of[k], threads=args.threads, runs=5).to_dict() for k, p in graphs.items()}

    print("\nheld-out mAP (COCO128 images calibration did not use)")
    evals = {"vlexport fp32": (bundle, "fp32"), "vlexport int8 (cpu target)": (bundle, "int8")}
    for k, (name, path) in enumerate(baselines.items()):
        evals[name] = (bundle_with_int8(bundle, path, work / f"baseline_bundle_{k}"), "int8")
    if searched is not None:
        evals[SEARCHED] = (searched, "int8")
    maps = held_out_map(evals, assets, args.calib_size, args.val_size)

    base = lat["vlexport fp32"]["median_ms"]
    ul_base = lat["ultralytics fp32"]["median_ms"]
    rows = []
    for k, v in lat.items():
        ref = ul_base if k.startswith("ultralytics") else base
        m = maps.get(k)
        p = profiles[k]
        rows.append([k, f"{v['median_ms']:.2f}", f"{v['p90_ms']:.2f}", f"{v['median_ms'] / ref:.2f}x",
                     f"{v['median_ms'] / base:.2f}x", f"{100 * m['map50_95']:.2f}" if m else "-",
                     f"{p['integer_nodes']}/{p['float_compute_nodes']}/{p['qdq_nodes']}"])
    print(f"\nYOLOv8n 640, onnxruntime CPU, {args.threads} threads, batch 1, {lat['vlexport fp32']['runs']} runs each")
    print_table(rows, ["contender", "median ms", "p90 ms", "vs own fp32", "vs vlexport fp32", "mAP50-95",
                       "int/float-conv/QDQ nodes"])
    int8_ratio = lat["vlexport int8 (cpu target)"]["median_ms"] / base
    paired = {"vlexport int8 / vlexport fp32": paired_ratio(lat, "vlexport int8 (cpu target)", "vlexport fp32"),
              "ultralytics uint8 / ultralytics fp32": paired_ratio(lat, "ultralytics + quantize_static (uint8 act.)",
                                                                   "ultralytics fp32")}
    if searched is not None:
        paired[f"{SEARCHED} / vlexport fp32"] = paired_ratio(lat, SEARCHED, "vlexport fp32")
    print("paired ratios (median over rounds of the two contenders' medians in the same round): "
          + ", ".join(f"{k} {v:.3f}" for k, v in paired.items()))
    drop = 100 * (maps["vlexport fp32"]["map50_95"] - maps["vlexport int8 (cpu target)"]["map50_95"])
    targets = {"vlexport int8 (cpu target)": (int8_ratio, paired["vlexport int8 / vlexport fp32"], drop)}
    if searched is not None:
        targets[SEARCHED] = (lat[SEARCHED]["median_ms"] / base, paired[f"{SEARCHED} / vlexport fp32"],
                             100 * (maps["vlexport fp32"]["map50_95"] - maps[SEARCHED]["map50_95"]))
    print()
    for k, (ratio, pr, d) in targets.items():
        print(f"{k}: int8/fp32 latency {ratio:.3f}, paired {pr:.3f} (target <= 0.45: "
              f"{'MET' if max(ratio, pr) <= 0.45 else 'NOT MET'}); mAP50-95 drop {d:.2f} points "
              f"(target <= 1.0: {'MET' if d <= 1.0 else 'NOT MET'})")
    if gate is not None:
        print(f"\nprecision search (export with --val, {gate['seconds']:.0f} s in all): the points it measured")
        rows = [[str(r["round"]), str(r.get("excluded_groups", "-")), str(r["excluded_nodes"]),
                 f"{r['latency_ratio']:.3f}" if r.get("latency_ratio") else "-",
                 f"{r['paired_latency_ratio']:.3f}" if r.get("paired_latency_ratio") else "-", f"{r['drop_points']:.2f}",
                 "yes" if r.get("passed") else "no", "<- chosen" if r.get("chosen") else ""] for r in gate["rounds"]]
        print_table(rows, ["round", "layers float", "nodes float", "int8/fp32 latency", "side by side", "mAP drop",
                           "within", ""])
    write_json(args.json, {"benchmark": "int8_cpu", "threads": args.threads, "calib_size": args.calib_size,
                           "val_size": args.val_size, "export_seconds": export_s, "latency": lat, "map": maps,
                           "int8_ratio": int8_ratio, "paired_ratios": paired, "targets": {
                               k: {"latency_ratio": r, "paired_ratio": pr, "map_drop_points": d}
                               for k, (r, pr, d) in targets.items()}, "map_drop_points": drop, "gate": gate,
                           "profiles": {k: {f: v[f] for f in ("integer_nodes", "float_compute_nodes", "qdq_nodes",
                                                               "optimized_ops", "by_op_type")}
                                        for k, v in profiles.items()},
                           "machine": machine_info()})
    for b in backends.values():
        b.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
