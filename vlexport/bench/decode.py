"""A captioner's decoder timed on a fixed-length greedy decode (the end token never stops it)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from vlexport.bench.feeds import Recorded
from vlexport.bench.options import BenchOptions
from vlexport.bench.report import BenchRow
from vlexport.bench.timing import Timing, measure
from vlexport.runtime.bundle import Bundle

__all__ = ["bench_decoder", "decode_timing", "decode_tokens", "ort_chains", "ort_step"]

log = logging.getLogger("vlexport")


def ort_chains() -> list[list[str]]:
    """One provider list per usable onnxruntime provider, best first, each falling back to the rest."""
    from vlexport.runtime.backends.onnxruntime import available_providers

    providers = available_providers()
    return [providers[i:] for i in range(len(providers))]


def decode_tokens(settings: dict[str, Any], wanted: int) -> int:
    """``wanted``, or fewer when the decoder has no room for them after the image prefix (no prompt is fed)."""
    return max(1, min(wanted, settings["n_positions"] - settings["prefix_length"]))


def ort_step(decoder: Any, s: dict[str, Any]) -> Callable:
    """A step for :mod:`vlexport.runtime.decoding` over an onnxruntime decoder, in its own input dtypes."""
    dtypes = {spec.name: np.dtype(spec.dtype) for spec in decoder.inputs}

    def step(prefix, ids, mask, past):
        b = ids.shape[0]
        if past is None:
            past = np.zeros((s["num_layers"], 2, b, s["num_heads"], 0, s["head_dim"]), dtypes["past_key_values"])
        if prefix is None:
            prefix = np.zeros((b, 0, s["embed_size"]), dtypes["prefix_embeds"])
        out = decoder.infer({"prefix_embeds": np.ascontiguousarray(prefix, dtypes["prefix_embeds"]),
                             "input_ids": np.ascontiguousarray(ids, dtypes["input_ids"]),
                             "attention_mask": np.ascontiguousarray(mask, dtypes["attention_mask"]),
                             "past_key_values": np.ascontiguousarray(past, dtypes["past_key_values"])})
        return np.asarray(out["logits"], np.float32), out["present_key_values"]

    return step


def decode_timing(step: Callable, prefix: np.ndarray, tokens: int, options: BenchOptions) -> Timing:
    """The timing of a greedy decode of exactly ``tokens`` tokens after ``prefix`` (tokens per second)."""
    from vlexport.runtime.decoding import greedy_decode

    def run() -> None:
        # eos_token_id=-1: no token ends the decode, so every run decodes exactly `tokens` tokens.
        result = greedy_decode(step, prefix, max_length=tokens, eos_token_id=-1)
        if len(result.token_ids) != tokens:
            raise RuntimeError(f"the decode stopped after {len(result.token_ids)} of {tokens} tokens")

    return measure(run, options.runs, options.warmup, items=tokens, unit="tokens")


def bench_decoder(bundle: Bundle, recorded: Recorded, options: BenchOptions, rows: list[BenchRow],
                  skipped: list[dict[str, str]]) -> None:
    """The decoder's fixed-length decode per onnxruntime provider (never its TensorRT one) and precision."""
    from vlexport.runtime.backends.onnxruntime import TRT_EP, OrtBackend

    if recorded.prefix is None or recorded.caption_settings is None:
        return
    info = bundle.part("decoder")
    precisions = [p for p in info.precisions if not options.precisions or p in options.precisions]
    if not precisions:
        skipped.append({"what": "decoder", "reason": f"no {'/'.join(options.precisions)} decoder file; "
                                                     f"it has {', '.join(info.precisions)}"})
        return
    if options.backends and "onnxruntime" not in options.backends:
        skipped.append({"what": "decoder", "reason": "the decoder runs on onnxruntime only"})
        return
    tokens = decode_tokens(recorded.caption_settings, options.decode_tokens)
    for chain in (c for c in ort_chains() if c[0] != TRT_EP):  # the TensorRT EP is first when present
        for precision in precisions:
            path = bundle.verify(info.files[precision])
            with OrtBackend(path, providers=chain, threads=options.threads) as decoder:
                row = BenchRow("onnxruntime", decoder.device, precision, "decoder", f"decode {tokens} tokens",
                               threads=options.threads)
                log.info("bench: %s decode …", row.label)
                row.latency = decode_timing(ort_step(decoder, recorded.caption_settings), recorded.prefix,
                                            tokens, options)
                rows.append(row)
