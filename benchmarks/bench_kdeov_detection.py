"""KDEOV trained for detection vs the COCO YOLOv8n it starts from, through exported bundles only.

COCO128 is split once (seeded): training images, calibration images, and evaluation images
used by neither (the INT8 accuracy gate of both exports measures on the training split). Both models are exported with `vlexport` (FP32, FP16, INT8 calibrated on the
calibration split) and scored with `vlexport validate` on the evaluation split.

    python benchmarks/bench_kdeov_detection.py                   # 80 COCO classes
    python benchmarks/bench_kdeov_detection.py --protocol ov     # 48 base / 17 novel (OVR-CNN, ViLD)

The text tower here has random weights (no pretrained CLIP can be downloaded): class text
embeddings are fixed vectors either way, so closed-vocabulary accuracy is meaningful, while
novel-class AP (``--protocol ov``) needs pretrained CLIP and is expected near zero here. On a
machine with CLIP weights add ``--clip-pretrained openai`` (or a local ViT-B-32.pt) and
``--distill-regions 1``.

Target (issue 12): KDEOV reaches at least 85 % of YOLOv8n's mAP50-95 on the evaluation images.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

# The 48 base and 17 novel COCO classes of OVR-CNN / ViLD (names as in COCO80).
BASE48 = ("person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep",
          "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard",
          "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza",
          "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster",
          "refrigerator", "book", "clock", "vase", "toothbrush")
NOVEL17 = ("airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup",
           "knife", "cake", "couch", "keyboard", "sink", "scissors")


def vlexport(*args: object) -> str:
    """Run the CLI as a user would; the output is echoed and returned."""
    cmd = [sys.executable, "-m", "vlexport.cli", *map(str, args)]
    print("$ vlexport " + " ".join(map(str, args)), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
        raise SystemExit(f"vlexport {args[0]} failed with exit status {done.returncode}")
    return done.stdout


def write_splits(coco128: Path, work: Path, n_train: int, n_calib: int, seed: int) -> dict[str, Path]:
    """Three YOLO data yamls over disjoint image lists of COCO128 (labels found beside the images)."""
    images = sorted((coco128 / "images" / "train2017").glob("*.jpg"))
    order = images[:]
    random.Random(seed).shuffle(order)
    parts = {"train": order[:n_train], "calib": order[n_train:n_train + n_calib], "eval": order[n_train + n_calib:]}
    names = (coco128 / "data.yaml").read_text().split("names:", 1)[1]
    out = {}
    for name, files in parts.items():
        listing = work / f"{name}.txt"
        listing.write_text("".join(f"{p}\n" for p in sorted(files)))
        yaml = work / f"{name}.yaml"
        yaml.write_text(f"path: {coco128}\ntrain: {listing}\nval: {listing}\nnames:{names}")
        out[name] = yaml
    return out


def validate(bundle: Path, data: Path, json_out: Path) -> dict:
    vlexport("validate", bundle, "--data", data, "--threads", 2, "--json", json_out)
    return json.loads(json_out.read_text())["metrics"]


def subset_ap50(bundle: Path, data: Path, names: tuple[str, ...]) -> dict:
    """AP50 over the given classes only, the detector predicting all of its classes (FP32)."""
    from vlexport import runtime
    from vlexport.data.detection import load_detection_dataset
    from vlexport.evaluation.detection import evaluate_detector

    task = runtime.load(bundle, precision="fp32", threads=2, score_threshold=0.001, max_detections=300)
    try:
        m = evaluate_detector(task, load_detection_dataset(data), progress=False, only_classes=names)
    finally:
        task.close()
    return {"ap50": m.map50, "ap50_95": m.map50_95, "classes": m.classes}


def int8_figures(bundle: Path, rounds: int, assets: Path) -> dict:
    """The bundle's FP32 and INT8 detector timed interleaved on bus.jpg, and its search's points."""
    import cv2

    from _common import image_feed, interleaved_latency, paired_ratio
    from vlexport.runtime.backends.onnxruntime import OrtBackend
    from vlexport.runtime.bundle import Bundle
    from vlexport.runtime.preprocess import Preprocessor

    b = Bundle.open(bundle)
    x = {"images": Preprocessor(b.preprocess)(cv2.imread(str(assets / "images" / "bus.jpg")))[0]}
    backends = {p: OrtBackend(bundle / f, providers=["CPUExecutionProvider"], threads=2)
                for p, f in (("fp32", "detector.onnx"), ("int8", "detector.int8.onnx"))}
    feeds = {k: image_feed(be, x["images"]) for k, be in backends.items()}
    lat = interleaved_latency({k: (lambda be=be, f=feeds[k]: be.infer(f)) for k, be in backends.items()}, rounds=rounds)
    manifest = json.loads((bundle / "manifest.json").read_text())
    gate = manifest.get("validation", {}).get("gate", {})
    chosen = next((r for r in gate.get("rounds", []) if r.get("chosen")), {})
    return {"fp32_ms": lat["fp32"]["median_ms"], "int8_ms": lat["int8"]["median_ms"],
            "ratio": lat["int8"]["median_ms"] / lat["fp32"]["median_ms"], "paired_ratio": paired_ratio(lat, "int8", "fp32"),
            "rounds": gate.get("rounds", []), "chosen_float_layers": chosen.get("excluded_groups", "-")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=["closed", "ov"], default="closed")
    ap.add_argument("--train", type=int, default=64, help="training images")
    ap.add_argument("--calib", type=int, default=16, help="calibration images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--freeze", default="heads")
    ap.add_argument("--templates", default="single")
    ap.add_argument("--clip-pretrained", default=None)
    ap.add_argument("--distill-regions", type=float, default=0.0)
    ap.add_argument("--no-int8", action="store_true", help="FP32 and FP16 only (the open-vocabulary figures need no INT8)")
    ap.add_argument("--calib-method", default="auto", help="--calib-method of both INT8 exports (default: auto)")
    ap.add_argument("--latency-rounds", type=int, default=20,
                    help="interleaved rounds timing each bundle's FP32 and INT8 detector (0: skip)")
    ap.add_argument("--kdeov-max-drop", type=float, default=1.0,
                    help="the KDEOV export's --max-drop (INT8 points of mAP50-95 allowed below FP32 on the gate's images)")
    ap.add_argument("--work", type=Path, default=None, help="keep the splits, checkpoint and bundles here")
    ap.add_argument("--reuse", action="store_true", help="reuse the YOLOv8n figures and the checkpoint found in --work")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kdeov_detection.json")
    args = ap.parse_args()

    assets = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
    weights = assets / "weights" / "yolov8n_coco_state_dict.pt"
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"kdeov-detection-{args.protocol}"
    work.mkdir(parents=True, exist_ok=True)
    splits = write_splits(assets / "coco128", work, args.train, args.calib, args.seed)
    clip = ["--clip-pretrained", args.clip_pretrained] if args.clip_pretrained else []
    timings: dict[str, float] = {}

    t = time.perf_counter()
    reuse_yolo = args.reuse and (work / "yolo.json").is_file()
    if not reuse_yolo:
        vlexport("yolo", "--checkpoint", weights, "--arch", "yolov8n", "--out", work / "yolo", "--overwrite", "--fp16",
                 "--int8", "--calib", splits["calib"], "--calib-size", args.calib, "--int8-target", "cpu",
                 "--calib-method", args.calib_method, "--val", splits["train"])
    timings["export_yolo_s"] = time.perf_counter() - t
    yolo = (json.loads((work / "yolo.json").read_text())["metrics"] if reuse_yolo
            else validate(work / "yolo", splits["eval"], work / "yolo.json"))

    train_classes = BASE48 if args.protocol == "ov" else None
    t = time.perf_counter()
    train = ["train-kdeov", "--data", splits["train"], "--backbone-weights", weights, "--out", work / "student.pt",
             "--steps", args.steps, "--batch-size", args.batch_size, "--freeze", args.freeze,
             "--templates", args.templates, "--distill-regions", args.distill_regions, *clip]
    if args.lr:
        train += ["--lr", args.lr]
    if train_classes:
        train += ["--classes", ",".join(train_classes)]
    if not (args.reuse and (work / "student.pt").is_file()):
        vlexport(*train)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    vocab = [] if args.protocol == "closed" else ["--classes", ",".join(BASE48 + NOVEL17)]
    int8 = [] if args.no_int8 else ["--int8", "--calib", splits["calib"], "--calib-size", args.calib,
                                    "--int8-target", "cpu", "--calib-method", args.calib_method,
                                    "--max-drop", args.kdeov_max_drop]
    vlexport("kdeov", "--checkpoint", work / "student.pt", "--templates", args.templates, *clip, *vocab,
             "--out", work / "kdeov", "--overwrite", "--fp16", *int8, "--val", splits["train"])
    timings["export_kdeov_s"] = time.perf_counter() - t
    kdeov = validate(work / "kdeov", splits["eval"], work / "kdeov.json")

    rows = []
    for prec in ("fp32", "fp16", "int8"):
        y, k = yolo.get(prec, {}), kdeov.get(prec, {})
        ratio = k.get("map50_95", 0) / y["map50_95"] if y.get("map50_95") else float("nan")
        rows.append([prec, f"{100 * y.get('map50_95', float('nan')):.2f}", f"{100 * k.get('map50_95', float('nan')):.2f}",
                     f"{100 * k.get('map50', float('nan')):.2f}", f"{100 * ratio:.1f} %"])
    print(f"\nCOCO128: {args.train} training, {args.calib} calibration, {len(splits)} splits; "
          f"evaluation on the other {128 - args.train - args.calib} images (onnxruntime CPU)")
    print_table(rows, ["precision", "YOLOv8n mAP50-95", "KDEOV mAP50-95", "KDEOV mAP50", "KDEOV / YOLOv8n"])
    result = {"protocol": args.protocol, "args": {k: str(v) for k, v in vars(args).items()},
              "yolo": yolo, "kdeov": kdeov, "timings": timings, "machine": machine_info()}
    if not args.no_int8 and args.latency_rounds:
        result["int8"] = {name: int8_figures(work / name, args.latency_rounds, assets) for name in ("yolo", "kdeov")}
        rows = [[name, f"{f['fp32_ms']:.2f}", f"{f['int8_ms']:.2f}", f"{f['ratio']:.3f}x",
                 f"{f['paired_ratio']:.3f}x", f"{len(f['rounds'])}", f"{f['chosen_float_layers']}"]
                for name, f in result["int8"].items()]
        print(f"\nINT8 vs FP32 detector latency, onnxruntime CPU, 2 threads, {args.latency_rounds} interleaved rounds")
        print_table(rows, ["bundle", "FP32 ms", "INT8 ms", "ratio", "paired ratio", "search points",
                           "float layers chosen"])
        for name, f in result["int8"].items():
            for r in f["rounds"]:
                ratio = r.get("latency_ratio")
                print(f"  {name} search round {r['round']}: {r['excluded_groups']} layer(s) float, latency "
                      f"{'-' if ratio is None else f'{ratio:.3f}x'}, {r['metric']} drop {r['drop_points']:.2f}"
                      f"{'  <- chosen' if r.get('chosen') else ''}")
    if args.protocol == "ov":
        result["base"] = subset_ap50(work / "kdeov", splits["eval"], BASE48)
        result["novel"] = subset_ap50(work / "kdeov", splits["eval"], NOVEL17)
        print(f"open vocabulary (FP32, 65-class vocabulary): base AP50 {100 * result['base']['ap50']:.2f} "
              f"({len(result['base']['classes'])} classes present), novel AP50 {100 * result['novel']['ap50']:.2f} "
              f"({len(result['novel']['classes'])} classes present)")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
