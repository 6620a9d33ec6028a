import pytest

from vlexport.errors import UsageError
from vlexport.models.registry import create_model, get_family, list_models


def test_kdeov_presets_are_listed_and_buildable():
    names = list_models("kdeov/*")
    assert {"kdeov/tiny", "kdeov/yolov8n-vitb32", "kdeov/yolov5s-vitb32"} <= set(names)
    model = create_model("kdeov/tiny")
    assert model.config.backbone == "simple"
    assert get_family("kdeov").task == "detect"


@pytest.mark.parametrize("name, msg", [("nope/tiny", "unknown model family"), ("kdeov/huge", "unknown kdeov preset"),
                                       ("kdeov", "name a preset")])
def test_bad_names(name, msg):
    with pytest.raises(UsageError, match=msg):
        create_model(name)
