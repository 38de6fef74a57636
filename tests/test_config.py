"""Every config file composes; bad choices and unsafe targets fail at start, naming the key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from segx.config import CONF_DIR, check_group_choices, checked_container, group_options
from segx.errors import SegxError
from tests.conftest import compose_config

GROUPS = ["data", "augment", "backbone", "arch", "trainer", "mlflow", "experiment"]


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS for o in group_options(g)],
)
def test_every_group_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}", "data.root=/somewhere"] if group == "data" else [f"{group}={option}"]
    cfg = compose_config("train", overrides)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "backbone":
        assert cfg.backbone.name == option  # the file name is the command-line word
    if group == "augment":
        from segx.augment import build_augmentation

        build_augmentation(cfg.augment.transforms)


@pytest.mark.parametrize("name", ["ensemble", "predict"])
def test_other_entry_configs_compose(name):
    cfg = compose_config(name, [])
    assert "mlflow" in cfg


def test_unknown_backbone_suggests_closest():
    with pytest.raises(SegxError, match=r"unknown backbone 'resnet43'; did you mean 'resnet34'\?"):
        check_group_choices(["backbone=resnet43"])


def test_unknown_choice_in_multirun_list_is_named():
    with pytest.raises(SegxError, match="unknown arch 'unett'"):
        check_group_choices(["-m", "arch=unet,unett"])
    check_group_choices(["backbone=resnet18,mobilenetv2", "trainer.epochs=3"])  # valid: no error


@pytest.mark.parametrize(
    "target",
    ["os.system", "builtins.eval", "subprocess.Popen", "segxevil.x", "tensorflow.io.write_file"],
)
def test_targets_outside_allowlist_are_refused(target):
    with pytest.raises(SegxError, match="is not allowed"):
        checked_container({"opt": {"_target_": target, "command": "echo hi"}}, "trainer")


def test_keras_spellings_map_to_tf_keras():
    plain = checked_container({"_target_": "keras.optimizers.SGD", "learning_rate": 0.1}, "trainer.optimizer")
    assert plain["_target_"] == "tf_keras.optimizers.SGD"


def test_every_backbone_file_names_a_known_encoder():
    # Cheap check for every file; building each network is the slow test in test_backbones.py.
    import segx.backend  # noqa: F401
    from segx.models import backbone_names

    known = set(backbone_names())
    for option in group_options("backbone"):
        assert option in known, f"conf/backbone/{option}.yaml is not a segmentation-models encoder"
    assert (CONF_DIR / "backbone" / "resnet34.yaml").exists()


def test_unknown_config_key_suggests_closest():
    from segx.config import check_override_keys

    with pytest.raises(SegxError, match=r"unknown config key 'trainer.epochz'; did you mean 'trainer.epochs'\?"):
        check_override_keys("train", ["trainer.epochz=3"])
    with pytest.raises(SegxError, match=r"unknown config key 'ensemble.serch'; did you mean 'ensemble.search'\?"):
        check_override_keys("ensemble", ["ensemble.serch=grid"])
    # Valid keys, group choices that add keys, and +new keys pass.
    check_override_keys("train", ["data=folder", "data.root=/x", "trainer.epochs=3", "+trainer.extra=1", "arch.options.decoder_filters=[8]"])
