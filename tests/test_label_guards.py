"""Labels, regions and flips that would train a wrong model, and configs that Hydra would
report in many lines, refused in one line naming the key and the fix (issue 27)."""

from __future__ import annotations

import numpy as np
import pytest

from segx.data.labels import Labels
from segx.errors import SegxError

TUMOUR = {"background": 0, "oedema": 1, "necrosis": 2, "enhancing": 4}


def test_a_class_in_no_region_is_refused_naming_it():
    with pytest.raises(SegxError, match=r"class enhancing is in no region.*data.regions.enhancing=\[enhancing\]"):
        Labels.from_config(TUMOUR, regions={"whole": ["oedema", "necrosis"], "core": ["necrosis"]})


def test_the_background_is_never_swapped_by_a_flip():
    labels = Labels.from_config({"background": 0, "a": 1, "b": 2})
    with pytest.raises(SegxError, match="data.flip_swap: background is the background"):
        labels.swap_table([["background", "a"]])
    with pytest.raises(SegxError, match="data.flip_swap: background is the background"):
        labels.swap_table([["a", "background"]])


def test_yaml_booleans_as_class_names_are_refused_naming_them(tmp_path):
    from omegaconf import OmegaConf

    path = tmp_path / "labels.yaml"
    path.write_text("background: 0\nyes: 1\non: 2\n")
    labels = OmegaConf.to_container(OmegaConf.load(path))  # yes and on are both True: one key
    with pytest.raises(SegxError, match=r"data.labels: class name True is not a name .*quote it"):
        Labels.from_config(labels)
    with pytest.raises(SegxError, match=r"data.labels: class name None is not a name"):
        Labels.from_config({"background": 0, None: 1})


@pytest.mark.parametrize(
    "name", ["LeftLung", "RightLung", "leftlung", "rightlung", "lungright", "kidneyLeft", "L_lung", "lung_left"]
)
def test_side_names_without_a_separator_are_sided(name):
    assert Labels.from_config({"background": 0, name: 1, "vessel": 2}).sided() == [name]


@pytest.mark.parametrize("name", ["liver", "lung", "bright", "upright", "cleft", "leftover", "lr"])
def test_words_that_only_contain_left_or_right_or_l_or_r_are_not_sided(name):
    assert Labels.from_config({"background": 0, name: 1}).sided() == []


def test_a_single_in_between_mask_value_gets_the_anti_aliasing_hint():
    labels = Labels.from_config({"background": 0, "a": 100, "b": 200})
    with pytest.raises(SegxError, match=r"150 \(1 px\).*in-between values: anti-aliased"):
        labels.encode(np.array([[0, 100, 150, 200]], np.uint8), "m.png")
    with pytest.raises(SegxError) as info:  # a value past every class: an unnamed class, no hint
        labels.encode(np.array([[0, 100, 250]], np.uint8), "m.png")
    assert "anti-aliased" not in str(info.value)
