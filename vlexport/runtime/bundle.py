"""Read and verify a bundle folder (the writer lives in ``vlexport.export.bundle_writer``).

A bundle is a folder whose ``manifest.json`` (written last by the exporter) lists every file
with its sha256. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlexport.errors import BundleError
from vlexport.runtime.spec import PartIO

SCHEMA = "vlexport.bundle/1"
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class PartInfo:
    """One exported graph: its tensor contract and its files per precision."""

    name: str
    io: PartIO
    files: dict[str, str]
    engines: dict[str, Any]

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.files]


class Bundle:
    """A verified view of a bundle folder. Use :meth:`open`."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
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
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}); the bundle is corrupt, export it again") from e
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath} does not hold a JSON object; the bundle is corrupt")
        schema = manifest.get("schema")
        if schema != SCHEMA:
            raise BundleError(f"{root}: unknown bundle schema {schema!r}; this vlexport reads {SCHEMA!r}")
        for key in ("family", "task", "parts", "files", "preprocess"):
            if key not in manifest:
                raise BundleError(f"{mpath} lacks the required key {key!r}; the bundle is corrupt")
        return cls(root.resolve(), manifest)

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
        expected = self.manifest["files"].get(rel)
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
        for rel in self.manifest["files"]:
            self.verify(rel)
        return list(self.manifest["files"])

    # -- accessors ---------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.manifest["preprocess"]

    @property
    def postprocess(self) -> dict[str, Any]:
        return self.manifest.get("postprocess", {})

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("vocabulary", {}).get("classes", []))

    def part(self, name: str) -> PartInfo:
        parts = self.manifest["parts"]
        if name not in parts:
            raise BundleError(f"{self.root}: no part {name!r} in this bundle (it has {sorted(parts)})")
        p = parts[name]
        return PartInfo(name=name, io=PartIO.from_dict(p), files=dict(p.get("files", {})), engines=dict(p.get("engines", {})))

    def refused(self, part: str) -> dict[str, str]:
        """Precisions of ``part`` the export left out because they failed their checks: precision -> why."""
        refused = (self.manifest.get("validation") or {}).get("refused") or {}
        return {key.partition("/")[2]: str(why) for key, why in refused.items() if key.partition("/")[0] == part}

    @property
    def part_names(self) -> list[str]:
        return list(self.manifest["parts"])

    def load_vocab(self) -> dict[str, np.ndarray]:
        """The vocabulary arrays (``classes``, ``embeddings``) from the verified vocab file."""
        vocab = self.manifest.get("vocabulary") or {}
        rel = vocab.get("file")
        if not rel:
            raise BundleError(f"{self.root}: this bundle has no vocabulary file")
        path = self.verify(rel)
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise BundleError(f"{self.root}: cannot read {rel!r}: {e}") from e
