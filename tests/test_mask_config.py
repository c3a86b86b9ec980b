"""Nonsense method settings are refused before any work (issue 10 item 8), whether they
come from the command line or from a class-set file."""
import math

import pytest

from text2mask.classes import load_class_set
from text2mask.errors import ConfigError
from text2mask.wsss.result import MaskConfig

VOC = load_class_set("voc")


def test_defaults_come_from_the_class_set():
    cfg = MaskConfig().resolved(VOC)
    assert (cfg.box_threshold, cfg.background_tau, cfg.background_power) == (0.2, 1.0, 2.0)
    coco = MaskConfig().resolved(load_class_set("coco"))
    assert (coco.box_threshold, coco.background_tau) == (0.5, 0.7)


@pytest.mark.parametrize("field, value, words", [
    ("box_threshold", math.nan, "box threshold nan"),
    ("box_threshold", -0.1, "box threshold -0.1"),
    ("box_threshold", 1.0, "box threshold 1.0"),
    ("background_tau", math.nan, "background tau nan"),
    ("background_tau", -1.0, "background tau -1.0"),
    ("background_tau", 0.0, "background tau 0.0"),
    ("background_power", math.inf, "background power p inf"),
    ("background_power", -2.0, "background power p -2.0"),
    ("confidence", 1.5, "confidence 1.5"),
    ("confidence", -0.01, "confidence -0.01"),
    ("confidence", math.nan, "confidence nan"),
    ("samples", 0, "samples must be >= 1"),
    ("timestep", 1000, "timestep must lie in 0..999"),
    ("crf_image", "bgr", "crf_image must be one of reference, rgb"),
])
def test_nonsense_is_refused(field, value, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        MaskConfig(**{field: value}).resolved(VOC)


def test_a_class_set_file_with_a_nan_tau_is_refused(tmp_path):
    # Refused when the file is read (classes.py) or, at the latest, when the config resolves.
    path = tmp_path / "bad.json"
    path.write_text('{"background_tau": NaN, "classes": [{"name": "dog"}]}')
    with pytest.raises(ConfigError, match=r"bad.*background tau nan must be"):
        MaskConfig().resolved(load_class_set(path))


def test_zero_box_threshold_still_disables_the_box_mask():
    assert MaskConfig(box_threshold=0.0).resolved(VOC).box_threshold == 0.0
