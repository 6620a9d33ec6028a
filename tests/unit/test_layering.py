"""The import direction between the package's folders (CONTRIBUTING.md), checked on the source.

Every ``import vlexport...`` counts, the lazy ones inside functions too: a lazy import that runs
back up a floor still couples the floors.
"""

import ast
from pathlib import Path

import vlexport

PACKAGE = Path(vlexport.__file__).resolve().parent
BASE = {"errors", "atomic", "__init__"}

# What each folder may import besides itself and BASE. Lower floors never import higher ones.
ALLOWED = {
    "registry": set(),
    "runtime": {"registry"},  # the registry is torch-free strings: the runtime reads its task table
    "ros2": {"runtime"},
    "data": {"runtime"},
    "models": {"data", "runtime"},
    "evaluation": {"data", "runtime"},
    "calibration": {"data", "evaluation", "runtime"},
    "export": {"calibration", "data", "evaluation", "models", "registry", "runtime"},
    "bench": {"export", "registry", "runtime"},
    "serve": {"registry", "runtime"},  # torch-free: the server's models run the runtime
    "cli": {"bench", "calibration", "data", "evaluation", "export", "models", "registry", "runtime", "serve"},
}


def _floor(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_floors(tree: ast.AST) -> set[str]:
    floors = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vlexport":
            parts = node.module.split(".")
            if len(parts) > 1:
                floors.add(parts[1])
            else:  # from vlexport import runtime, __version__
                floors.update(a.name for a in node.names if (PACKAGE / a.name).is_dir()
                              or (PACKAGE / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            floors.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vlexport."))
    return floors


def test_every_folder_is_in_the_layering_table():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(ALLOWED), f"add {sorted(folders - set(ALLOWED))} to ALLOWED (and CONTRIBUTING.md)"


def test_no_import_runs_back_up_a_floor():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        floor = _floor(path)
        if floor in BASE or floor not in ALLOWED:
            continue
        extra = _imported_floors(ast.parse(path.read_text(encoding="utf-8"))) - BASE - {floor} - ALLOWED[floor]
        wrong += [f"{path.relative_to(PACKAGE)} imports vlexport.{e}" for e in sorted(extra)]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_lazy_imports():
    tree = ast.parse("def f():\n    from vlexport.export.bundle_export import write_bundle\n")
    assert _imported_floors(tree) == {"export"}
