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


def _step_fn(path: Path, threads: int, cfg: dict):
    """A decoder step for ``vlexport.runtime.decoding`` over one graph file (what CaptionTask does)."""
    from vlexport.runtime.backends.onnxruntime import OrtBackend
    from vlexport.runtime.decoding import decoder_feeds

    backend = OrtBackend(path, providers=["CPUExecutionProvider"], threads=threads)

    def step(prefix, ids, mask, past):
        out = backend.infer(decoder_feeds(cfg, prefix, ids, mask, past))
        return out["logits"], out["present_key_values"]

    return step, backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="captioner bundle (default: export --preset into a temporary folder)")
    ap.add_argument("--preset", default="vitb32-gpt2")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/caption_decode.json")
    args = ap.parse_args()

    from vlexport.calibration.weight_only import quantize_weights
    from vlexport.runtime import load
    from vlexport.runtime.decoding import greedy_decode

    with tempfile.TemporaryDirectory() as tmp:
        path = _bundle(args, tmp)
        task = load(path, precision="fp32", threads=args.threads)
        cfg = task.settings
        frame = (np.arange(360 * 480 * 3) % 251).astype(np.uint8).reshape(360, 480, 3)
        prefix = task.encode(frame)[0]["prefix"][None]
        task.close()
        decoders = {"fp32": path / "decoder.onnx"}
        for bits in (8, 4):  # timing only: with random weights the bundle's gate may refuse them
            file = Path(tmp) / f"decoder.w{bits}.onnx"
            quantize_weights(path / "decoder.onnx", file, bits=bits)
            decoders[f"{bits}-bit weights"] = file
        contenders, results, backends = {}, {}, []
        for label, file in decoders.items():
            step, backend = _step_fn(file, args.threads, cfg)
            backends.append(backend)
            for use_cache in (True, False):
                name = f"{label} {'kv_cache' if use_cache else 'recompute'}"

                def run(step=step, use_cache=use_cache, name=name):
                    results[name] = greedy_decode(step, prefix, max_length=args.tokens, eos_token_id=-1,
                                                  use_cache=use_cache)
                contenders[name] = run
        timing = interleaved_latency(contenders, warmup=1, rounds=args.rounds, per_round=1)
        for b in backends:
            b.close()
    rows, out = [], {"decoders": {}}
    for label in decoders:
        kv, re = timing[f"{label} kv_cache"], timing[f"{label} recompute"]
        same = results[f"{label} kv_cache"].token_ids == results[f"{label} recompute"].token_ids
        assert same, f"{label}: the two modes must decode the same tokens"
        assert len(results[f"{label} kv_cache"].token_ids) == args.tokens
        tps = {k: args.tokens / (t["median_ms"] / 1000.0) for k, t in (("kv_cache", kv), ("recompute", re))}
        speedup = tps["kv_cache"] / tps["recompute"]
        out["decoders"][label] = {"kv_cache": {**kv, "tokens_per_s": tps["kv_cache"]},
                                  "recompute": {**re, "tokens_per_s": tps["recompute"]}, "speedup": speedup,
                                  "identical_tokens": same}
        rows.append([label, f"{tps['kv_cache']:.1f}", f"{tps['recompute']:.1f}", f"{speedup:.2f}x"])
    print_table(rows, ["decoder", "KV cache tok/s", "recompute tok/s", f"speed-up at {args.tokens} tokens"])
    print("target: KV cache >= 3x recompute; both modes decode identical tokens")
    write_json(Path(args.out), {"bundle": str(args.bundle) if args.bundle else f"{args.preset} (random weights)",
                                "threads": args.threads, "tokens": args.tokens, **out, "machine": machine_info()})


if __name__ == "__main__":
    main()
