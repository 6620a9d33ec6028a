"""Write a bundle folder atomically.

Files are written into a hidden staging folder beside the target. ``commit()`` hashes every
file, writes ``manifest.json`` last (with :func:`vlexport.runtime.manifest.write_manifest`, the
one manifest writer: temp file + rename) and only then moves the staging
folder into place. Any exception, Ctrl-C included, removes the staging folder, so an
interrupted export never leaves a folder that looks like a bundle.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vlexport import __version__
from vlexport.errors import OutputError
from vlexport.runtime.bundle import sha256_file
from vlexport.runtime.manifest import MANIFEST, SCHEMA, Manifest, parse_manifest, write_manifest


class BundleWriter:
    """Stage files for a bundle and publish them all at once.

    Use as a context manager::

        with BundleWriter(out, overwrite=True) as w:
            onnx_path = w.path("detector.onnx")   # write there
            w.commit(manifest_without_files)
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self.staging: Path | None = None
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        parent = self.out.parent
        if self.out.exists() and not self.overwrite:
            raise OutputError(f"{self.out} already exists; pass --overwrite to replace it or choose another --out")
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out} exists and is not a folder")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=parent))
        except OSError as e:
            raise OutputError(f"cannot write the output folder {parent}: {e.strerror or e}") from e
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, rel: str) -> Path:
        """Where to write the bundle file ``rel`` while staging."""
        if self.staging is None:
            raise RuntimeError("BundleWriter used outside its context")
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_vocab(self, classes: list[str], embeddings: np.ndarray, rel: str = "vocab.npz") -> str:
        """Store the vocabulary as plain arrays (no pickles)."""
        np.savez(self.path(rel), classes=np.asarray(classes, dtype=np.str_), embeddings=embeddings.astype(np.float32))
        return rel

    def _write_manifest(self, manifest: Manifest | Mapping[str, Any]) -> None:
        if self.staging is None:
            raise RuntimeError("BundleWriter used outside its context")
        # Checked as the runtime will read it (a bad field names itself) before anything is hashed.
        data = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
        typed = parse_manifest(data, MANIFEST, draft=True)
        (self.staging / MANIFEST).unlink(missing_ok=True)
        files = {}
        for p in sorted(self.staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.staging).as_posix()
                files[rel] = f"sha256:{sha256_file(p)}"
        stamp = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "vlexport": __version__}
        full = dataclasses.replace(typed, schema=SCHEMA, files=files, extra={**typed.extra, **stamp})
        write_manifest(self.staging / MANIFEST, full)

    def provisional(self, manifest: Manifest | Mapping[str, Any]) -> Path:
        """Make the hidden staging folder a readable bundle (for evaluating it before publishing).

        The folder stays hidden and is removed on failure; :meth:`commit` rewrites the manifest.
        """
        self._write_manifest(manifest)
        return self.staging

    def commit(self, manifest: Manifest | Mapping[str, Any]) -> Path:
        """Hash every staged file, write the manifest last and move the bundle into place."""
        self._write_manifest(manifest)
        backup = None
        if self.out.exists():
            backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, backup)
        os.replace(self.staging, self.out)
        self.staging = None
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        self.committed = True
        return self.out
