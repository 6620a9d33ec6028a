"""Tokens per second of the runtime's KV-cache decode vs recomputing the whole sequence every step.

Both use the same exported decoder graph and the same greedy loop (``vlexport.runtime.decoding``);
the end token is disabled so that every run decodes exactly ``--tokens`` tokens. The two modes
are timed in alternating rounds in one process, so machine noise hits both alike.

    python benchmarks/bench_caption_decode.py                      # exports ViT-B/32 + GPT-2 small (random)
    python benchmarks/bench_caption_decode.py --bundle bundles/cap --tokens 30
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_latency, machine_info, print_table, write_json  # noqa: E402


def _bundle(args: argparse.Namespace, tmp: str) -> Path:
    if args.bundle:
        return Path(args.bundle)
    from vlexport.export.captioner import CaptionerExportOptions, export_captioner

    assets = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
    print(f"exporting captioner {args.preset} (random weights) …")
    report = export_captioner(CaptionerExportOptions(out=Path(tmp) / "cap", preset=args.preset,
                                                     tokenizer=str(assets / "tokenizers" / "gpt2"), parity_count=1,
                                                     parity_steps=2))
    return report.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="captioner bundle (default: export --preset into a temporary folder)")
    ap.add_argument("--preset", default="vitb32-gpt2")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/caption_decode.json")
    args = ap.parse_args()

    from vlexport.runtime import load
    from vlexport.runtime.decoding import greedy_decode

    with tempfile.TemporaryDirectory() as tmp:
        path = _bundle(args, tmp)
        task = load(path, precision="fp32", threads=args.threads)
        frame = (np.arange(360 * 480 * 3) % 251).astype(np.uint8).reshape(360, 480, 3)
        prefix = task.encode(frame)[0]["prefix"][None]
        results = {}

        def decode(use_cache: bool):
            def run():
                r = greedy_decode(task._step, prefix, max_length=args.tokens, eos_token_id=-1, use_cache=use_cache)
                results[use_cache] = r
            return run

        timing = interleaved_latency({"kv_cache": decode(True), "recompute": decode(False)}, warmup=1,
                                     rounds=args.rounds, per_round=1)
        task.close()
    assert results[True].token_ids == results[False].token_ids, "the two modes must decode the same tokens"
    assert len(results[True].token_ids) == args.tokens
    rows, out = [], {}
    for name, t in timing.items():
        tps = args.tokens / (t["median_ms"] / 1000.0)
        out[name] = {**t, "tokens": args.tokens, "tokens_per_s": tps}
        rows.append([name, f"{t['median_ms']:.0f}", f"{tps:.1f}"])
    speedup = out["kv_cache"]["tokens_per_s"] / out["recompute"]["tokens_per_s"]
    print_table(rows, ["decode", f"ms per {args.tokens} tokens (median)", "tokens/s"])
    print(f"KV cache speed-up: {speedup:.2f}x (target >= 3x); identical tokens: yes")
    write_json(Path(args.out), {"bundle": str(path) if args.bundle else f"{args.preset} (random weights)",
                                "threads": args.threads, "results": out, "speedup": speedup, "machine": machine_info()})


if __name__ == "__main__":
    main()
