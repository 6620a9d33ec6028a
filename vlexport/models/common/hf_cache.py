"""Weights already downloaded to the Hugging Face hub cache, found without the network.

One locator for every model family (CLIP towers, GPT-2): the lookups are huggingface_hub's own
(:func:`huggingface_hub.try_to_load_from_cache` for the ``main`` ref, :func:`huggingface_hub.scan_cache_dir`
for the other snapshots). The cache folder is the runtime tokenizer's :func:`hf_hub_cache`, which
applies huggingface_hub's rules (``HF_HUB_CACHE``, ``HF_HOME/hub``, ``XDG_CACHE_HOME``) when called:
``huggingface_hub.constants.HF_HUB_CACHE`` is fixed when the package is first imported, so a cache
set later (a test, a notebook) would otherwise be missed, and the runtime, which loads the GPT-2
tokenizer without huggingface_hub, would look in another place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from vlexport.runtime.tokenizer import hf_hub_cache

__all__ = ["hub_cache_dir", "cached_file", "cached_snapshots", "find_cached_files"]

log = logging.getLogger("vlexport")


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else the Hugging Face hub cache folder as resolved now."""
    return Path(cache_dir).expanduser() if cache_dir is not None else hf_hub_cache()


def cached_file(repo_id: str, filename: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached ``filename`` of ``repo_id`` at its ``main`` ref, or None (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hub_cache_dir(cache_dir)))
    except Exception:  # a malformed cache or repo id must not stop the export: treat as absent
        log.debug("Hugging Face cache lookup failed for %s/%s", repo_id, filename, exc_info=True)
        return None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def cached_snapshots(repo_id: str, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Snapshot folders of model ``repo_id`` in the cache: the ``main`` ref's first, then the newest."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(hub_cache_dir(cache_dir))
    except CacheNotFound:
        return []
    revisions = [r for repo in info.repos if repo.repo_id == repo_id and repo.repo_type == "model"
                 for r in repo.revisions]
    revisions.sort(key=lambda r: ("main" not in r.refs, -r.last_modified))
    return [Path(r.snapshot_path) for r in revisions]


def find_cached_files(
    repo_id: str, alternatives: Sequence[Sequence[str]], cache_dir: str | os.PathLike | None = None
) -> tuple[Path, tuple[Path, ...]] | None:
    """``(snapshot folder, files)`` of the first snapshot holding every file of one alternative.

    ``alternatives`` are tried in order within a snapshot (e.g. ``[("model.safetensors",),
    ("pytorch_model.bin",)]``), snapshots in :func:`cached_snapshots` order. None when no
    snapshot has them.
    """
    # The usual case, the main ref holding the files, needs no scan of the whole cache.
    for names in alternatives:
        found = [cached_file(repo_id, n, cache_dir) for n in names]
        if names and all(f is not None for f in found) and len({f.parent for f in found}) == 1:
            return found[0].parent, tuple(found)
    for snap in cached_snapshots(repo_id, cache_dir):
        for names in alternatives:
            files = tuple(snap / n for n in names)
            if all(f.is_file() for f in files):
                return snap, files
    return None
