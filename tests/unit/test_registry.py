import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlexport.errors import UsageError
from vlexport.registry import HOOKS, create_model, families, get_family, list_models, load_ref


def test_kdeov_presets_are_listed_and_buildable():
    names = list_models("kdeov/*")
    assert {"kdeov/tiny", "kdeov/yolov8n-vitb32", "kdeov/yolov5s-vitb32"} <= set(names)
    model = create_model("kdeov/tiny")
    assert model.config.backbone == "simple"
    assert get_family("kdeov").task == "detect"


@pytest.mark.parametrize("name, msg", [("nope/tiny", "unknown model family"), ("kdeov/huge", "unknown kdeov preset"),
                                       ("kdeov/", "name a preset")])
def test_bad_names(name, msg):
    with pytest.raises(UsageError, match=msg):
        create_model(name)


# -- the registry itself ------------------------------------------------------------------------


def test_the_six_families_are_registered():
    assert [f.name for f in families()] == ["kdeov", "yolo", "sclip", "captioner", "detr", "multiscale"]
    with pytest.raises(UsageError, match="unknown model family 'nope'; choose one of captioner, detr, kdeov"):
        get_family("nope")


def test_create_model_takes_the_preset_as_an_argument():
    assert create_model("kdeov").config.backbone == "simple"  # the default preset is tiny
    assert create_model("multiscale", preset="tiny").config.backbone == "resnet18"
    with pytest.raises(UsageError, match="unknown detr preset 'huge'; choose one of tiny, tiny-segm"):
        create_model("detr", preset="huge")


def test_load_ref_follows_attributes():
    assert load_ref("vlexport.registry:Family.load") is get_family("kdeov").load.__func__
    with pytest.raises(ValueError, match="package.module:attr"):
        load_ref("vlexport.registry")


@pytest.mark.parametrize("family", [f.name for f in families()])
def test_every_family_has_every_hook(family):
    """Each hook loads and is what it says; the summary is one line and the presets are the models'."""
    from vlexport.export.command import FamilyCommand, PrecisionFields

    fam = get_family(family)
    assert fam.summary and "\n" not in fam.summary and len(fam.summary) <= 78, fam.summary
    assert "tiny" in fam.presets
    for hook in HOOKS:
        if hook == "eager_parts":
            continue  # test_eager_parts_hook_loads
        assert callable(fam.load(hook)) or isinstance(fam.load(hook), FamilyCommand), (family, hook)
    options = fam.load("options")
    assert dataclasses.is_dataclass(options) and issubclass(options, PrecisionFields)
    assert isinstance(fam.load("command"), FamilyCommand)
    for task, ref in fam.tasks.items():
        assert isinstance(load_ref(ref), type), (family, task, ref)
    assert fam.task in fam.tasks


@pytest.mark.parametrize("family", [f.name for f in families()])
def test_eager_parts_hook_loads(family):
    """``eager_parts(bundle)`` rebuilds a bundle's parts in PyTorch for ``vlexport bench``."""
    fam = get_family(family)
    assert callable(fam.load("eager_parts"))


@pytest.mark.parametrize("family", [f.name for f in families()])
def test_options_fields_are_the_command_parameters_with_their_defaults(family):
    """Each family's Options has one field per CLI option, and Options() holds what the command parses."""
    from vlexport.cli import cli

    fam = get_family(family)
    options = fam.load("options")
    required = {"checkpoint": "model.pt"} if family == "yolo" else {}
    args = [a for k, v in required.items() for a in (f"--{k}", v)]
    parsed = cli.commands[family].make_context(family, args).params
    assert set(parsed) == {f.name for f in dataclasses.fields(options)}
    expected = dataclasses.asdict(options(**{k: Path(v) for k, v in required.items()}))
    assert parsed == expected


def test_presets_match_the_models():
    from vlexport.models.captioner.model import CAPTIONER_PRESETS
    from vlexport.models.detr.model import DETR_PRESETS
    from vlexport.models.kdeov.config import KDEOV_PRESETS
    from vlexport.models.multiscale.model import MULTISCALE_PRESETS
    from vlexport.models.sclip.config import SCLIP_PRESETS

    for name, presets in (("kdeov", KDEOV_PRESETS), ("captioner", CAPTIONER_PRESETS), ("detr", DETR_PRESETS),
                          ("multiscale", MULTISCALE_PRESETS), ("sclip", SCLIP_PRESETS)):
        assert set(get_family(name).presets) == set(presets), name


def test_importing_the_registry_and_the_cli_does_not_import_torch():
    code = ("import sys\n"
            "import vlexport.registry, vlexport.cli, vlexport.runtime.tasks\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m.startswith('vlexport.export.')"
            " and m not in ('vlexport.export.command', 'vlexport.export.exporter')]\n"
            "assert not bad, bad\n"
            "from vlexport.runtime.tasks import task_class\n"
            "assert task_class('detect', 'detr').__name__ == 'DetrTask'\n"
            "assert task_class('segment', 'multiscale').__name__ == 'BinarySegmentTask'\n"
            "assert task_class('detect', 'not-a-family').__name__ == 'DetectTask'\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_cli_lists_each_family_with_its_summary():
    from vlexport.cli import cli

    out = CliRunner().invoke(cli, ["--help"], terminal_width=120).output
    for fam in families():
        assert f"  {fam.name:<16} {fam.summary}\n" in out, out


def test_export_model_is_the_python_call_of_an_export_command(tmp_path):
    import json

    from vlexport.export import multiscale
    from vlexport.export.exporter import export_model

    with pytest.raises(UsageError, match="needs calibration data"):  # checked before any model is built
        export_model("multiscale", multiscale.Options(preset="tiny", int8=True, out=tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    with pytest.raises(UsageError, match="multiscale exports take vlexport.export.multiscale.Options"):
        export_model("multiscale", multiscale.MultiScaleExportOptions(out=tmp_path / "b"))
    report = export_model(get_family("multiscale"), multiscale.Options(preset="tiny", imgsz=64, out=tmp_path / "b"))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert report.path == tmp_path / "b" and manifest["family"] == "multiscale" and manifest["preset"] == "tiny"


def test_docs_family_table_is_generated_from_the_registry():
    from vlexport.registry import families_markdown

    table = (Path(__file__).resolve().parents[2] / "docs" / "families.md").read_text()
    assert table == families_markdown(), "docs/families.md is stale: regenerate it (CONTRIBUTING.md)"
    for f in families():
        assert f"| `{f.name}` | {f.task} |" in table
