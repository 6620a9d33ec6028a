import json

import numpy as np
import pytest

from vlexport.errors import BundleError, OutputError
from vlexport.export.bundle_writer import BundleWriter
from vlexport.runtime.bundle import MANIFEST, SCHEMA, Bundle


def _manifest():
    return {"family": "kdeov", "task": "detect", "preset": "t", "parts": {}, "preprocess": {"size": [32, 32]}}


def test_commit_writes_manifest_last_with_hashes(tmp_path):
    out = tmp_path / "b"
    with BundleWriter(out) as w:
        w.path("a.bin").write_bytes(b"hello")
        w.write_vocab(["x", "y"], np.eye(2, dtype=np.float32))
        assert not out.exists()  # nothing visible before commit
        w.commit(_manifest())
    m = json.loads((out / MANIFEST).read_text())
    assert m["schema"] == SCHEMA
    assert set(m["files"]) == {"a.bin", "vocab.npz"}
    assert m["files"]["a.bin"].startswith("sha256:2cf24dba")
    b = Bundle.open(out)
    assert b.verify_all() == ["a.bin", "vocab.npz"]
    vocab = np.load(out / "vocab.npz", allow_pickle=False)
    assert list(vocab["classes"]) == ["x", "y"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging folder left behind


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_or_interrupt_leaves_nothing(tmp_path, exc):
    out = tmp_path / "b"
    with pytest.raises(exc):
        with BundleWriter(out) as w:
            w.path("a.bin").write_bytes(b"x")
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "b"
    with BundleWriter(out) as w:
        w.path("old.bin").write_bytes(b"1")
        w.commit(_manifest())
    with pytest.raises(OutputError, match="--overwrite"):
        with BundleWriter(out):
            pass
    with BundleWriter(out, overwrite=True) as w:
        w.path("new.bin").write_bytes(b"2")
        w.commit(_manifest())
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_failed_overwrite_keeps_the_old_bundle(tmp_path):
    out = tmp_path / "b"
    with BundleWriter(out) as w:
        w.path("old.bin").write_bytes(b"1")
        w.commit(_manifest())
    with pytest.raises(RuntimeError):
        with BundleWriter(out, overwrite=True) as w:
            w.path("new.bin").write_bytes(b"2")
            raise RuntimeError("parity failed")
    Bundle.open(out).verify_all()
    assert (out / "old.bin").exists()


def test_unwritable_parent_is_an_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        with BundleWriter(blocker / "sub" / "b"):
            pass


def test_tampered_file_is_refused(tmp_path):
    out = tmp_path / "b"
    with BundleWriter(out) as w:
        w.path("a.bin").write_bytes(b"hello")
        w.commit(_manifest())
    (out / "a.bin").write_bytes(b"HELLO")
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.open(out).verify("a.bin")
