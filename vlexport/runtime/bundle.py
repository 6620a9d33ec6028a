"""Read and verify a bundle folder (the writer lives in ``vlexport.export.bundle_writer``).

A bundle is a folder whose ``manifest.json`` (written last by the exporter) lists every file
with its sha256. The manifest is typed and validated by :mod:`vlexport.runtime.manifest`; the
one edit made in place, recording a TensorRT engine built on the target, goes through
:meth:`Bundle.record_engine` and the one atomic writer. Nothing here unpickles anything.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import BundleError, OutputError
from vlexport.runtime.manifest import (
    MANIFEST,
    PRECISIONS,
    SCHEMA,
    EngineRecord,
    Manifest,
    PartRecord,
    Section,
    parse_manifest,
    read_manifest,
    write_manifest,
)

__all__ = ["Bundle", "PartRecord", "sha256_file", "MANIFEST", "SCHEMA", "PRECISIONS"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Bundle:
    """A verified view of a bundle folder. Use :meth:`open`.

    :attr:`meta` is the typed manifest (:class:`~vlexport.runtime.manifest.Manifest`);
    :attr:`manifest` the same as plain JSON data, for callers that read it as a dict.
    """

    def __init__(self, root: Path, manifest: Manifest | Mapping[str, Any]):
        self.root = root
        self.meta: Manifest = manifest if isinstance(manifest, Manifest) else parse_manifest(manifest, root / MANIFEST)
        self._raw: dict[str, Any] | None = None
        self._verified: set[str] = set()

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        root = Path(path)
        if not root.exists():
            raise BundleError(f"bundle not found: {root}")
        if not root.is_dir():
            raise BundleError(f"{root} is not a bundle: a bundle is a folder with a {MANIFEST}")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(
                f"{root} is not a bundle: it has no {MANIFEST} (an interrupted export leaves none; export again)"
            )
        return cls(root.resolve(), read_manifest(mpath))

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as plain JSON data (read-only by convention: write through :meth:`record_engine`)."""
        if self._raw is None:
            self._raw = self.meta.to_dict()
        return self._raw

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def reload(self) -> None:
        """Re-read the manifest from disk (another process may have recorded an engine); files
        whose hash entry did not change stay verified, so nothing is hashed again."""
        old = dict(self.meta.files)
        self._set(read_manifest(self.manifest_path))
        self._verified = {rel for rel in self._verified if self.meta.files.get(rel) == old.get(rel)}

    def _set(self, manifest: Manifest) -> None:
        self.meta = manifest
        self._raw = None

    # -- recording engines (the manifest's only in-place edit) -------------------------
    def _rewrite(self, edit: Any) -> None:
        """Apply ``edit(manifest)`` to a copy, write it atomically, then adopt it; if the write
        fails, the file on disk and this object both keep the previous manifest."""
        new = copy.deepcopy(self.meta)
        edit(new)
        try:
            write_manifest(self.manifest_path, new)
        except OSError as e:
            raise OutputError(
                f"cannot update {self.manifest_path}: {e.strerror or e}; make the bundle folder writable"
            ) from e
        self._set(new)

    def forget_engine(self, part: str, precision: str, file: str | None = None) -> None:
        """Drop the engine recorded for (part, precision), and ``file``'s hash, from the manifest
        (before the file's bytes are replaced, so the manifest never lists a stale hash)."""
        self.part(part)

        def edit(m: Manifest) -> None:
            m.parts[part].engines.pop(precision, None)
            if file is not None:
                m.files.pop(file, None)

        self._rewrite(edit)

    def record_engine(self, part: str, precision: str, record: EngineRecord) -> set[str]:
        """Record ``record`` as the engine of (part, precision) with its file's hash, atomically.

        Returns the files of the engine it replaced that the manifest no longer lists (for the
        caller to delete now that nothing refers to them).
        """
        old = self.part(part).engines.get(precision)
        stale = {old.file} - {record.file} if old is not None else set()

        def edit(m: Manifest) -> None:
            m.parts[part].engines[precision] = record
            for rel in stale:
                m.files.pop(rel, None)
            m.files[record.file] = record.sha256

        self._rewrite(edit)
        self._verified.discard(record.file)
        return stale

    # -- paths and hashes --------------------------------------------------------------
    def path_of(self, rel: str) -> Path:
        """Absolute path of a bundle file; refuses paths that leave the bundle folder."""
        if not isinstance(rel, str) or not rel or os.path.isabs(rel):
            raise BundleError(f"{self.root}: refusing file path {rel!r} (must be relative to the bundle)")
        full = (self.root / rel).resolve()
        if full != self.root and self.root not in full.parents:
            raise BundleError(f"{self.root}: refusing file path {rel!r}: it leaves the bundle folder")
        return full

    def verify(self, rel: str) -> Path:
        """Check a file's sha256 against the manifest and return its path (each file hashed once)."""
        path = self.path_of(rel)
        if rel in self._verified:
            return path
        expected = self.meta.files.get(rel)
        if expected is None:
            raise BundleError(f"{self.root}: file {rel!r} is not listed in the manifest's hashes")
        if not path.is_file():
            raise BundleError(f"{self.root}: file {rel!r} is missing; the bundle is incomplete")
        algo, _, digest = str(expected).partition(":")
        if algo != "sha256" or not digest:
            raise BundleError(f"{self.root}: file {rel!r} has an unsupported hash entry {expected!r}")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(
                f"{self.root}: file {rel!r} does not match its sha256 in the manifest "
                f"(expected {digest[:12]}…, got {actual[:12]}…); the bundle is corrupt or was modified"
            )
        self._verified.add(rel)
        return path

    def verify_all(self) -> list[str]:
        """Verify every file listed in the manifest; returns their names."""
        for rel in self.meta.files:
            self.verify(rel)
        return list(self.meta.files)

    # -- accessors ---------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.meta.family

    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.meta.preprocess

    @property
    def postprocess(self) -> dict[str, Any]:
        return self.meta.postprocess or {}

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    def section(self, name: str) -> Section:
        """A manifest section (``preprocess``, ``postprocess``, ``segment``, ``caption``, ...) with
        typed, checked reads; errors name this bundle."""
        return self.meta.section(name, where=str(self.root))

    def part(self, name: str) -> PartRecord:
        parts = self.meta.parts
        if name not in parts:
            raise BundleError(f"{self.root}: no part {name!r} in this bundle (it has {sorted(parts)})")
        return parts[name]

    def refused(self, part: str) -> dict[str, str]:
        """Precisions of ``part`` the export left out because they failed their checks: precision -> why."""
        return self.meta.refused(part)

    @property
    def part_names(self) -> list[str]:
        return list(self.meta.parts)

    def load_vocab(self) -> dict[str, np.ndarray]:
        """The vocabulary arrays (``classes``, ``embeddings``) from the verified vocab file."""
        vocab = self.meta.vocabulary or {}
        rel = vocab.get("file")
        if not rel:
            raise BundleError(f"{self.root}: this bundle has no vocabulary file")
        path = self.verify(rel)
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise BundleError(f"{self.root}: cannot read {rel!r}: {e}") from e
