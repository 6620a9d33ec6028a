"""Time ``DetectTask.set_vocabulary(names)``: class names → embeddings on the device, no torch.

80 names (COCO's) x the bundle's prompt templates (imagenet80: 80) go through the CLIP tokenizer
and the bundle's ``text_encoder`` part on onnxruntime (its best provider here), then the detector's
vocabulary is swapped. Reported: the cold call (tokenise + text encoder + bake, nothing cached),
its tokeniser share, the warm call (every name from the on-disk cache) and, on a small sample,
the text encoder at the full 77-token context vs cut after each run's longest prompt (what the
runtime feeds a ``length``-dynamic part). Without ``--bundle`` it exports a ``--vocab-mode input
--with-text-encoder`` bundle of ``--preset`` (random weights: the text tower's size is what
matters) with one class, so the export bakes only 80 prompts.

    python benchmarks/bench_set_vocabulary.py                           # yolov8n-vitb32: ViT-B/32 text tower
    python benchmarks/bench_set_vocabulary.py --preset tiny             # seconds, a 2-layer toy tower
    python benchmarks/bench_set_vocabulary.py --bundle bundles/kdeov-input --names 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402


def _export(args: argparse.Namespace, tmp: str) -> Path:
    from vlexport.export.kdeov import KDEOVExportOptions, export_kdeov

    print(f"exporting kdeov {args.preset} (--vocab-mode input --with-text-encoder, random weights) …", flush=True)
    t = time.perf_counter()
    report = export_kdeov(KDEOVExportOptions(out=Path(tmp) / "b", preset=args.preset, classes=["object"],
                                             templates="imagenet80", vocab_mode="input", with_text_encoder=True,
                                             parity_count=1))
    print(f"  exported in {time.perf_counter() - t:.0f} s", flush=True)
    return report.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a --vocab-mode input bundle with a text_encoder part (default: export one)")
    ap.add_argument("--preset", default="yolov8n-vitb32")
    ap.add_argument("--names", type=int, default=80, help="how many of COCO's names to set (1..80)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm-rounds", type=int, default=5)
    ap.add_argument("--sample", type=int, default=32, help="prompts for the 77-token vs cut comparison (0: skip)")
    ap.add_argument("--out", default=None, help="JSON path [default: benchmarks/results/set_vocabulary_<preset>.json]")
    args = ap.parse_args()
    from vlexport.models.clip.text import COCO80_CLASSES as COCO80

    if not 1 <= args.names <= len(COCO80):
        ap.error(f"--names must lie in 1..{len(COCO80)}")
    names = list(COCO80[: args.names])

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else _export(args, tmp)
        os.environ["VLEXPORT_CACHE"] = str(Path(tmp) / "cache")  # cold: nothing cached yet
        from vlexport.runtime import load

        task = load(bundle, precision="fp32", backend="onnxruntime", threads=args.threads)
        manifest = json.loads((bundle / "manifest.json").read_text())
        te_part = manifest["parts"]["text_encoder"]
        templates = manifest["vocabulary"]["prompt_templates"]
        prompts = len(names) * len(templates)
        print(f"set_vocabulary({len(names)} names) x {len(templates)} templates = {prompts} prompts "
              f"(text_encoder input {te_part['inputs'][0]['shape']}) …", flush=True)

        t = time.perf_counter()
        task.set_vocabulary(names)
        cold_s = time.perf_counter() - t
        enc = task.text_encoder
        runs = enc.runs

        backend, tok, in_name, _, dtype, fixed = enc._load()
        providers = list(getattr(backend, "providers", []))
        all_prompts = [tpl.format(n) for n in names for tpl in templates]
        t = time.perf_counter()
        ids = tok(all_prompts)
        tokenize_s = time.perf_counter() - t
        lengths = ids.argmax(axis=1) + 1

        warm = []
        for _ in range(args.warm_rounds):
            t = time.perf_counter()
            task.set_vocabulary(list(reversed(names)))
            warm.append(time.perf_counter() - t)
        assert enc.runs == runs, "the warm calls ran the text encoder"

        sample: dict[str, float] = {}
        if args.sample > 0 and fixed is None:
            x = ids[: args.sample].astype(dtype)
            cut = int(lengths[: args.sample].max())
            for label, feed in (("full_77_s", x), ("cut_s", x[:, :cut])):
                backend.infer({in_name: feed[:2]})  # warm-up
                t = time.perf_counter()
                backend.infer({in_name: np.ascontiguousarray(feed)})
                sample[label] = time.perf_counter() - t
            sample.update(prompts=args.sample, cut_length=cut, speedup=sample["full_77_s"] / sample["cut_s"])
        task.close()

    te = manifest["provenance"]["text_encoder"]
    result = {
        "bundle": str(args.bundle or f"exported {args.preset} (random weights)"),
        "clip_model": te.get("model"),
        "names": len(names), "templates": len(templates), "prompts": prompts,
        "text_encoder_runs": runs, "threads": args.threads, "providers": providers,
        "cold_s": cold_s, "cold_prompts_per_s": prompts / cold_s,
        "tokenize_s": tokenize_s,
        "mean_prompt_tokens": float(lengths.mean()), "max_prompt_tokens": int(lengths.max()),
        "warm_median_ms": statistics.median(warm) * 1000.0, "warm_rounds": len(warm),
        "full_context_vs_cut": sample,
        "machine": machine_info(),
    }
    rows = [["cold (nothing cached)", f"{cold_s:.2f} s", f"{prompts / cold_s:.0f} prompts/s, {runs} runs"],
            ["  of which tokenising", f"{tokenize_s:.2f} s", f"mean {lengths.mean():.1f} tokens/prompt"],
            ["warm (all cached)", f"{statistics.median(warm) * 1000:.1f} ms", f"median of {len(warm)}"]]
    if sample:
        rows.append([f"{sample['prompts']} prompts @77 vs cut @{sample['cut_length']}",
                     f"{sample['full_77_s']:.2f} s vs {sample['cut_s']:.2f} s", f"x{sample['speedup']:.1f}"])
    print_table(rows, ["set_vocabulary", "time", "notes"])
    out = Path(args.out or f"benchmarks/results/set_vocabulary_{args.preset if not args.bundle else 'bundle'}.json")
    write_json(out, result)


if __name__ == "__main__":
    main()
