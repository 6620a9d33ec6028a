"""PyTorch eager rows of `vlexport bench`: the bundle's architecture rebuilt from its manifest.

Each family module ends with ``eager_parts(bundle)`` (see :mod:`vlexport.export.eager`): the
part's export wrapper with random weights (weights do not change latency). It is timed on the
feeds the runtime measurement recorded, on the CPU and, when torch sees one, the GPU. torch is
imported only here, and only when the comparison runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from vlexport.bench.decode import decode_timing, decode_tokens
from vlexport.bench.feeds import Recorded, tile
from vlexport.bench.options import BenchOptions
from vlexport.bench.report import BenchRow
from vlexport.bench.timing import measure
from vlexport.errors import EagerRebuildError, VlexportError
from vlexport.runtime.bundle import Bundle

__all__ = ["bench_torch", "eager_modules"]

log = logging.getLogger("vlexport")

_NOTE = "eager, random weights (latency only)"


def _eager_hook(family: str) -> Callable[[Bundle], dict[str, Any]]:
    """The family's registered ``eager_parts(bundle)`` (part name -> eval-mode module)."""
    from vlexport.errors import UsageError
    from vlexport.registry import get_family

    try:
        return get_family(family).load("eager_parts")
    except UsageError:  # not a registered family
        raise EagerRebuildError(f"no PyTorch rebuild for family {family!r}") from None


def eager_modules(bundle: Bundle) -> dict[str, Any]:
    """The bundle's parts as eager PyTorch modules; an :class:`EagerRebuildError` says why not."""
    try:
        return _eager_hook(bundle.family)(bundle)
    except EagerRebuildError:
        raise
    except (VlexportError, ImportError) as e:
        raise EagerRebuildError(f"cannot rebuild the {bundle.family} model from the manifest: {e}") from e


def _torch_step(module: Any, s: dict[str, Any], device: str) -> Callable:
    """A step for :mod:`vlexport.runtime.decoding` over the eager decoder."""
    import torch

    from vlexport.runtime.decoding import decoder_feeds

    def step(prefix, ids, mask, past):
        feeds = decoder_feeds(s, prefix, ids, mask, past)
        args = [torch.from_numpy(feeds[name]).to(device)
                for name in ("prefix_embeds", "input_ids", "attention_mask", "past_key_values")]
        with torch.inference_mode():
            logits, present = module(*args)
        return logits.float().cpu().numpy(), present.float().cpu().numpy()

    return step


def _as_torch(torch: Any, x: np.ndarray, device: str) -> Any:
    if x.dtype == np.float16:
        x = x.astype(np.float32)  # the eager model is FP32
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def bench_torch(bundle: Bundle, part: str, recorded: Recorded, options: BenchOptions, batch: int | None,
                rows: list[BenchRow]) -> dict[str, Any] | None:
    """PyTorch eager rows (CPU, and CUDA when torch sees a GPU); returns torch's version info or None.

    When the comparison cannot run (``--no-torch``, no torch, nothing recorded, no rebuild) one
    row says why instead.
    """
    def note_row(note: str) -> None:
        rows.append(BenchRow("pytorch", "eager", "fp32", part, note=note))

    if not options.torch:
        note_row("skipped (--no-torch)")
        return None
    try:
        import torch
    except ImportError:
        note_row("torch is not installed: pip install 'vlexport[export]' to compare with PyTorch eager")
        return None
    if recorded.calls is None:
        note_row("no runtime measurement ran, so there are no inputs to time PyTorch on")
        return None
    try:
        modules = eager_modules(bundle)
    except EagerRebuildError as e:
        note_row(str(e))
        return None
    info = bundle.part(part)
    names = [s.name for s in info.io.inputs]
    call_sets = {1: recorded.calls, **({batch: tile(recorded.calls, info, batch)} if batch else {})}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    previous = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        for device in devices:
            module = modules[part].to(device).eval()
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            row = BenchRow("pytorch", device, "fp32", part, threads=torch.get_num_threads(), note=_NOTE)
            log.info("bench: %s …", row.label)
            for k, calls in call_sets.items():
                args = [[_as_torch(torch, feeds[n], device) for n in names if n in feeds] for feeds in calls]

                def forward(module=module, args=args, sync=sync) -> None:
                    with torch.inference_mode():
                        for a in args:
                            module(*a)
                    sync()

                timing = measure(forward, options.runs, options.warmup, items=k)
                if k == 1:
                    row.latency = timing
                else:
                    row.batch, row.batched = k, timing
            rows.append(row)
            if "decoder" in modules and recorded.prefix is not None and recorded.caption_settings is not None:
                tokens = decode_tokens(recorded.caption_settings, options.decode_tokens)
                step = _torch_step(modules["decoder"].to(device), recorded.caption_settings, device)
                drow = BenchRow("pytorch", device, "fp32", "decoder", f"decode {tokens} tokens",
                                threads=torch.get_num_threads(), note=_NOTE)
                drow.latency = decode_timing(step, recorded.prefix, tokens, options)
                rows.append(drow)
    finally:
        torch.set_num_threads(previous)
    return {"torch": torch.__version__, "torch_threads": options.threads or previous}
