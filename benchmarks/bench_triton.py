"""Served YOLOv8n (a real Triton server, loopback, dynamic batching) vs the in-process runtime.

Both sides do the same work per image: decode the JPEG file's bytes, detect. In process: one
task, the images one after the other (what one ``vlexport run`` does). Served: ``--clients``
concurrent gRPC clients send the JPEG bytes (``IMAGE``; one shape, so Triton can batch them),
``--requests`` in all (bounded), and Triton's dynamic batcher groups them; the batch sizes it
formed come from its statistics API (``batch_stats``). Throughput, p50/p99 latency and the
batch sizes go to a table and a JSON file.

    python benchmarks/bench_triton.py                          # exports the shared YOLOv8n
    python benchmarks/bench_triton.py --bundle bundles/yolo --clients 16 --requests 512
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", ROOT.parent / "shared" / "assets"))
MODEL = "yolo"


def _bundle(args: argparse.Namespace, tmp: Path) -> Path:
    if args.bundle:
        return Path(args.bundle)
    from vlexport.export.yolo import YoloExportOptions, export_yolo

    print("exporting the shared YOLOv8n …")
    out = tmp / "yolo"
    export_yolo(YoloExportOptions(checkpoint=ASSETS / "weights" / "yolov8n_coco.pt", out=out, trust_checkpoint=True,
                                  parity_count=1))
    return out


def _repository(bundle: Path, out: Path, args: argparse.Namespace) -> Path:
    options = dict(max_batch_size=args.max_batch, max_queue_delay_us=args.queue_delay_us, instances=args.instances)
    from vlexport.serve.repository import write_repository

    write_repository([bundle], out, layout="python", names=[MODEL], **options)
    return out


def _images(n: int) -> list[bytes]:
    folder = ASSETS / "coco128" / "images" / "train2017"
    files = sorted(folder.glob("*.jpg"))[:n]
    if not files:
        raise SystemExit(f"no images in {folder} (set VLEXPORT_ASSETS)")
    return [f.read_bytes() for f in files]


def _pcts(ms: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(ms), [50, 99])
    return {"p50": round(float(p50), 2), "p99": round(float(p99), 2)}


def in_process(bundle: Path, blobs: list[bytes], total: int) -> dict:
    import cv2

    from vlexport.runtime import load

    task = load(bundle)
    for b in blobs[:3]:  # warm-up
        task.detect(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR))
    lat = []
    t0 = time.perf_counter()
    for i in range(total):
        s = time.perf_counter()
        task.detect(cv2.imdecode(np.frombuffer(blobs[i % len(blobs)], np.uint8), cv2.IMREAD_COLOR))
        lat.append((time.perf_counter() - s) * 1e3)
    wall = time.perf_counter() - t0
    task.close()
    return {"images": total, "seconds": round(wall, 3), "throughput": round(total / wall, 2), "latency_ms": _pcts(lat)}


def _batch_counts(stats: dict) -> dict[int, int]:
    model = stats["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model.get("batch_stats", [])}


def served(url: str, blobs: list[bytes], total: int, clients: int) -> dict:
    from vlexport.serve.client import RemoteTask

    tasks = [RemoteTask(url, MODEL, "grpc") for _ in range(clients)]
    for t in tasks[:1]:  # warm-up (the first request also loads lazy state in the model)
        for b in blobs[:3]:
            t.infer_arrays({"IMAGE": (np.array([[b]], np.object_), "BYTES")})
    before = _batch_counts(tasks[0].statistics())
    lat: list[float] = []
    lock = threading.Lock()
    next_i = [0]

    def work(task: RemoteTask) -> None:
        while True:
            with lock:
                i = next_i[0]
                if i >= total:
                    return
                next_i[0] += 1
            blob = np.array([[blobs[i % len(blobs)]]], np.object_)
            s = time.perf_counter()
            task.infer_arrays({"IMAGE": (blob, "BYTES")})
            with lock:
                lat.append((time.perf_counter() - s) * 1e3)

    threads = [threading.Thread(target=work, args=(t,)) for t in tasks]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    for _ in range(20):  # the last execution's figures land just after its responses
        after = _batch_counts(tasks[0].statistics())
        formed = {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0) > 0}
        if sum(k * v for k, v in formed.items()) >= total:
            break
        time.sleep(0.1)
    for t in tasks:
        t.close()
    executions = sum(formed.values())
    return {"images": total, "clients": clients, "seconds": round(wall, 3), "throughput": round(total / wall, 2),
            "latency_ms": _pcts(lat), "batches": formed,
            "mean_batch": round(sum(k * v for k, v in formed.items()) / max(executions, 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a YOLO detect bundle (default: export the shared YOLOv8n)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=256, help="requests in all (served) / images (in process)")
    ap.add_argument("--images", type=int, default=32, help="distinct COCO images cycled through")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--queue-delay-us", type=int, default=2000)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/triton.json"))
    args = ap.parse_args()

    from vlexport.serve.env import ensure_server_env
    from vlexport.serve.server import TritonServer

    blobs = _images(args.images)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        bundle = _bundle(args, tmp)
        repo = _repository(bundle, tmp / "repo", args)
        env = ensure_server_env(progress=print)
        print(f"in process: {args.requests} images …")
        local = in_process(bundle, blobs, args.requests)
        with TritonServer(repo, env=env, log_path=tmp / "server.log") as server:
            print(f"served: {args.requests} requests from {args.clients} gRPC clients …")
            remote = served(server.grpc_url, blobs, args.requests, args.clients)
    ratio = remote["throughput"] / local["throughput"]
    rows = [["in process", "1", f"{local['throughput']:.1f}", f"{local['latency_ms']['p50']:.1f}",
             f"{local['latency_ms']['p99']:.1f}", "-"],
            ["served (Triton)", str(args.clients), f"{remote['throughput']:.1f}", f"{remote['latency_ms']['p50']:.1f}",
             f"{remote['latency_ms']['p99']:.1f}", " ".join(f"{k}x{v}" for k, v in remote["batches"].items())]]
    print_table(rows, ["", "clients", "img/s", "p50 ms", "p99 ms", "batches (size x count)"])
    print(f"served / in-process throughput: {ratio:.2f}; mean batch {remote['mean_batch']}")
    write_json(args.json, {"machine": machine_info(), "options": {k: (str(v) if isinstance(v, Path) else v)
                                                                  for k, v in vars(args).items()},
                           "in_process": local, "served": remote, "served_over_in_process": round(ratio, 3),
                           "batches_over_1": any(k > 1 for k in remote["batches"])})


if __name__ == "__main__":
    main()
