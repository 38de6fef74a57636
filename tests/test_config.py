"""Every config file composes; bad choices and unsafe targets fail at start, naming the key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from segx.config import CONF_DIR, check_group_choices, group_options
from segx.errors import SegxError
from segx.objects import checked_container
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
        from segx.objects import build_augmentation

        build_augmentation(cfg.augment.transforms)


def test_every_entry_config_composes_resolves_and_validates():
    from segx.workflows.ensemble import validate_config as validate_ensemble
    from segx.workflows.member import validate_config as validate_train
    from segx.workflows.prepare import validate_data_config

    entries = {p.stem for p in CONF_DIR.glob("*.yaml")}
    assert entries == {
        "train",
        "ensemble",
        "predict",
        "check",
        "bench",
        "server",
        "export",
    }  # a new one needs a line here
    validate_train(compose_config("train", []))
    validate_ensemble(compose_config("ensemble", []))
    validate_data_config(compose_config("check", ["data.root=/somewhere"]).data)
    bench = OmegaConf.to_container(compose_config("bench", []), resolve=True)
    assert bench["mlflow"]["experiment_name"] == bench["profile"]["experiment_name"] != "segx"
    predict = compose_config("predict", [])
    missing = [k for k in ("ensemble_run_id", "input_dir", "output_dir") if OmegaConf.is_missing(predict, k)]
    assert missing == ["ensemble_run_id", "input_dir", "output_dir"]  # the user must give them
    for name in entries - {"predict"}:
        OmegaConf.to_container(compose_config(name, ["data.root=/somewhere"] if name == "check" else []), resolve=True)


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
    check_override_keys(
        "train",
        ["data=folder", "data.root=/x", "trainer.epochs=3", "+trainer.extra=1", "arch.options.decoder_filters=[8]"],
    )
