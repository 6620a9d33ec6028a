"""Extras and pins: `vlexport validate` needs the `eval` extra, and every dependency is pinned."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from vlexport.errors import DependencyError
from vlexport.evaluation.detection import _pycocotools

ROOT = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_eval_extra_reaches_test_and_export_and_everything_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"pycocotools", "pyyaml"} <= {_name(r) for r in extras["eval"]}
    # The README's `pip install -e ".[export,test]"` still installs pycocotools.
    assert "vlexport[eval]" in extras["test"] and "vlexport[eval]" in extras["export"]
    assert {"huggingface-hub", "pyyaml"} <= {_name(r) for r in extras["export"]}
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    needed = {_name(r) for r in project["dependencies"]}
    for group in ("export", "eval", "serve", "test", "track"):
        needed |= {_name(r) for r in extras[group] if not r.startswith("vlexport[")}
    assert sorted(needed - set(pins)) == []


def test_missing_pycocotools_names_the_extra(monkeypatch):
    for mod in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes the import fail as if it were not installed
    with pytest.raises(DependencyError, match=r"pip install 'vlexport\[eval\]'"):
        _pycocotools()
