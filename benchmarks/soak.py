"""Soak run: detection + segmentation + captioning on one stream for 10,000+ frames.

Loops the shared videos (car-detection.mp4 then bottle-detection.mp4, again and again) through a
:class:`~vlexport.runtime.pipeline.Pipeline` with detection on every frame, segmentation every
``--segment-every`` frames and captioning every ``--caption-every`` seconds. It records the
resident memory (RSS) every 250 frames and checks, for every frame, that each result attached
to it was computed on that very frame (its stamp's index is the frame's index). Pass: RSS grows
by at most ``--max-growth-mb`` after the warm-up, and no result is attached to the wrong frame.

    python benchmarks/soak.py --detect bundles/yolo --segment bundles/seg --caption bundles/cap
    python benchmarks/soak.py          # exports small random-weight bundles first (minutes)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

ASSETS = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def rss_mb() -> float:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class LoopedVideos:
    """A file source that plays the given videos in a loop, with one running frame index."""

    live = False

    def __init__(self, videos: list[Path], total: int):
        from vlexport.runtime.sources import open_source

        self._open = open_source
        self.videos, self.total = videos, total
        self.spec, self.fps = "+".join(v.name for v in videos), 25.0
        self.frames_read = self.dropped = self.skipped = self.reconnects = 0

    def len_hint(self) -> int:
        return self.total

    def __iter__(self):
        from vlexport.runtime.results import FrameStamp
        from vlexport.runtime.sources import Frame

        n = 0
        for video in itertools.cycle(self.videos):
            with self._open(str(video)) as src:
                for f in src:
                    if n >= self.total:
                        return
                    yield Frame(n, f.image, FrameStamp(n, time.monotonic(), time.time()), f.source)
                    n += 1
                    self.frames_read = n

    def close(self) -> None:
        pass


def _bundles(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, Path]:
    from vlexport.export.captioner import CaptionerExportOptions, export_captioner
    from vlexport.export.multiscale import MultiScaleExportOptions, export_multiscale
    from vlexport.export.bundle_export import PrecisionOptions
    from vlexport.export.yolo import YoloExportOptions, export_yolo

    det = Path(args.detect) if args.detect else export_yolo(YoloExportOptions(
        checkpoint=ASSETS / "weights" / "yolov8n_coco.pt", trust_checkpoint=True, out=tmp / "yolo",
        precision=PrecisionOptions(int8=True, int8_target="cpu", calib=str(ASSETS / "coco128/images/train2017"),
                                   calib_size=16))).path
    seg = Path(args.segment) if args.segment else export_multiscale(MultiScaleExportOptions(
        out=tmp / "seg", preset="tiny", imgsz=256)).path
    cap = Path(args.caption) if args.caption else export_captioner(CaptionerExportOptions(
        out=tmp / "cap", preset="tiny", tokenizer=str(ASSETS / "tokenizers" / "gpt2"), max_length=12,
        parity_count=1, parity_steps=4)).path
    return det, seg, cap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detect")
    ap.add_argument("--segment")
    ap.add_argument("--caption")
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--segment-every", type=int, default=5)
    ap.add_argument("--caption-every", type=float, default=2.0)
    ap.add_argument("--warmup", type=int, default=500, help="frames before the memory baseline")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-growth-mb", type=float, default=20.0)
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args()

    from vlexport import runtime
    from vlexport.runtime.pipeline import Pipeline

    memory: list[tuple[int, float]] = []
    wrong: list[tuple[int, str, int]] = []
    counts = {"detect": 0, "segment": 0, "caption": 0}

    def check(result) -> None:
        for name, r in result.results.items():
            counts[name] += 1
            if r.stamp is None or r.stamp.index != result.index:
                wrong.append((result.index, name, -1 if r.stamp is None else r.stamp.index))
        if result.index % 250 == 0:
            memory.append((result.index, rss_mb()))
            if result.index % 1000 == 0:
                print(f"frame {result.index}: RSS {memory[-1][1]:.1f} MB, {counts}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        det_b, seg_b, cap_b = _bundles(args, Path(tmp))
        with runtime.load(det_b, threads=args.threads) as det, runtime.load(seg_b, threads=args.threads) as seg, \
                runtime.load(cap_b, threads=args.threads) as cap:
            videos = [ASSETS / "video" / "car-detection.mp4", ASSETS / "video" / "bottle-detection.mp4"]
            pipe = Pipeline(LoopedVideos(videos, args.frames), detect=det, segment=seg, caption=cap,
                            segment_every=args.segment_every, caption_every_s=args.caption_every, on_result=check)
            stats = pipe.run()
    base = next(m for i, m in memory if i >= args.warmup)
    peak_after = max(m for i, m in memory if i >= args.warmup)
    final = memory[-1][1]
    growth = final - base
    ok = growth <= args.max_growth_mb and not wrong and stats.processed == args.frames
    print(stats.summary())
    print(f"RSS after warm-up {base:.1f} MB, at the end {final:.1f} MB (growth {growth:+.1f} MB, peak {peak_after:.1f} MB); "
          f"results on the wrong frame: {len(wrong)}; {'PASS' if ok else 'FAIL'}")
    write_json(Path(args.out), {"frames": args.frames, "stats": stats.to_dict(), "results_per_task": counts,
                                "rss_mb": memory, "rss_growth_mb": growth, "rss_peak_after_warmup_mb": peak_after,
                                "wrong_frame": wrong[:50], "pass": ok, "machine": machine_info()})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
