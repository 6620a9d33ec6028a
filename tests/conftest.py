"""Shared fixtures: real assets from VLEXPORT_ASSETS, an isolated cache, and exported bundles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the network or the user's cache: CLIP weights are unreachable here anyway,
# and the offline flag makes that fail fast instead of retrying.
os.environ.setdefault("VLEXPORT_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["VLEXPORT_CACHE"] = str(tmp_path_factory.mktemp("vlexport-cache"))
    yield


def assets_root() -> Path:
    """The shared assets folder (skips the calling test when it is absent)."""
    root = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
    if not (root / "images" / "bus.jpg").is_file():
        pytest.skip(f"shared assets not found at {root} (set VLEXPORT_ASSETS)")
    return root


@pytest.fixture(scope="session")
def assets() -> Path:
    return assets_root()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A KDEOV bundle from the tiny preset, FP32 + FP16, exported once per test session."""
    pytest.importorskip("torch")
    from vlexport.export.kdeov import KDEOVExportOptions, export_kdeov

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_kdeov(KDEOVExportOptions(out=out, preset="tiny", classes=["person", "bus", "car", "dog"],
                                    templates="single", fp16=True))
    return out


@pytest.fixture(scope="session")
def tiny_caption_bundle(tmp_path_factory) -> Path:
    """An untrained tiny captioner (random weights), FP32, at most 6 tokens per caption."""
    pytest.importorskip("torch")
    import torch

    from vlexport.export.captioner import CaptionerExportOptions, export_captioner
    from vlexport.models.captioner.model import build_captioner, save_captioner

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("caption")
    ckpt = save_captioner(build_captioner("tiny").eval(), tmp / "tiny.pt")
    return export_captioner(CaptionerExportOptions(out=tmp / "cap", checkpoint=ckpt, max_length=6, parity_count=1,
                                                   parity_steps=4,
                                                   tokenizer=str(assets_root() / "tokenizers" / "gpt2"))).path


@pytest.fixture(scope="session")
def tiny_segment_bundle(tmp_path_factory) -> Path:
    """A tiny multi-scale binary segmenter (random weights, ABSI fusion) at 128 px, FP32."""
    pytest.importorskip("torch")
    from vlexport.export.multiscale import MultiScaleExportOptions, export_multiscale

    out = tmp_path_factory.mktemp("segment") / "seg"
    return export_multiscale(MultiScaleExportOptions(out=out, preset="tiny", imgsz=128, parity_count=1)).path
