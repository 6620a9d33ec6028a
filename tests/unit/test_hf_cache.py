"""One Hugging Face cache locator: GPT-2 weights and the runtime tokenizer look in the same snapshot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vlexport.models.captioner.gpt2 import find_gpt2_files
from vlexport.models.common.hf_cache import cached_file, cached_snapshots, find_cached_files, hub_cache_dir
from vlexport.runtime.tokenizer import GPT2Tokenizer


def _snapshot(hub: Path, sha: str, files: dict[str, Path | bytes], mtime: float) -> Path:
    snap = hub / "models--gpt2" / "snapshots" / sha
    snap.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, snap / name)
        else:
            (snap / name).write_bytes(content)
        os.utime(snap / name, (mtime, mtime))
    return snap


@pytest.fixture
def xdg_hub(tmp_path, monkeypatch) -> Path:
    # Only XDG_CACHE_HOME set: huggingface_hub then uses $XDG_CACHE_HOME/huggingface/hub.
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "huggingface" / "hub"


def test_weights_and_tokenizer_share_the_cache_and_prefer_main(xdg_hub, assets):
    gpt2_dir = assets / "tokenizers" / "gpt2"
    assert hub_cache_dir() == xdg_hub
    assert cached_snapshots("gpt2") == [] and find_cached_files("gpt2", [("model.safetensors",)]) is None
    tok_files = {"vocab.json": gpt2_dir / "encoder.json", "merges.txt": gpt2_dir / "vocab.bpe"}
    main = _snapshot(xdg_hub, "aaa111", {**tok_files, "model.safetensors": b"main", "config.json": b"{}"}, 1_000)
    newer = _snapshot(xdg_hub, "bbb222", {**tok_files, "model.safetensors": b"newer"}, 2_000)
    # Without a ref the newest snapshot wins; refs/main then takes precedence.
    assert cached_snapshots("gpt2") == [newer, main]
    assert find_gpt2_files("gpt2") == (None, newer / "model.safetensors")
    (xdg_hub / "models--gpt2" / "refs").mkdir()
    (xdg_hub / "models--gpt2" / "refs" / "main").write_text("aaa111")
    assert cached_snapshots("gpt2") == [main, newer]
    assert find_gpt2_files("gpt2") == (main / "config.json", main / "model.safetensors")
    assert cached_file("gpt2", "config.json") == main / "config.json"
    assert cached_file("gpt2", "missing.bin") is None
    # The runtime tokenizer (no huggingface_hub) resolves the same cache folder and snapshot.
    tok = GPT2Tokenizer.from_hf_cache("gpt2")
    assert tok.files == (main / "vocab.json", main / "merges.txt")
    assert tok.encode(" Hello") == [18435]


def test_explicit_cache_dir_wins(tmp_path, xdg_hub):
    other = tmp_path / "elsewhere"
    snap = _snapshot(other, "ccc333", {"pytorch_model.bin": b"w"}, 1_000)
    assert find_cached_files("gpt2", [("model.safetensors",), ("pytorch_model.bin",)]) is None
    assert find_cached_files("gpt2", [("model.safetensors",), ("pytorch_model.bin",)], cache_dir=other) == (
        snap, (snap / "pytorch_model.bin",))
