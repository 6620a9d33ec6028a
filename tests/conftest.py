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


@pytest.fixture(scope="session")
def assets() -> Path:
    root = Path(os.environ.get("VLEXPORT_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
    if not (root / "images" / "bus.jpg").is_file():
        pytest.skip(f"shared assets not found at {root} (set VLEXPORT_ASSETS)")
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A KDEOV bundle from the tiny preset, FP32 + FP16, exported once per test session."""
    pytest.importorskip("torch")
    from vlexport.export.kdeov import KDEOVExportOptions, export_kdeov

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_kdeov(KDEOVExportOptions(out=out, preset="tiny", classes=["person", "bus", "car", "dog"],
                                    templates="single", fp16=True))
    return out
