"""A config is data: `_target_` is checked by what it resolves to, and bad values are one line
naming the key, before any file is written or MLflow run is created (issue 8, sections 2 and 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from segx.errors import SegxError
from segx.objects import checked_container, instantiate
from segx.workflows.member import train_member, validate_config
from tests.conftest import compose_config, tiny_train_overrides
from tests.helpers import run_in_process


def write_file_target(victim: Path) -> str:
    """A nested `_target_` that writes a file: Path.write_text(Path(victim), 'pwned'), reached
    through segx's own namespace (segx.config imports Path), so a prefix check lets it pass."""
    return f"{{_target_:segx.config.Path.write_text,_args_:[{{_target_:segx.config.Path,_args_:['{victim}']}},pwned]}}"


def refused_before_anything(tmp_path: Path, synthetic_root: Path, overrides: list[str], match: str) -> str:
    """Train with ``overrides``; assert one SegxError line and that no store, run, split or
    victim file was created."""
    out = tmp_path / "out"
    cfg = compose_config("train", [*tiny_train_overrides(out, synthetic_root), *overrides])
    with pytest.raises(SegxError, match=match) as info:
        train_member(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))  # no mlflow.db, no run, no split
    assert not (tmp_path / "pwned.txt").exists()
    return message


# --- section 2: names are checked by what they resolve to -------------------------------------


def test_segx_function_as_optimizer_is_refused_before_any_run(tmp_path, synthetic_root):
    # The first report: this deleted a member run after the MLflow run was created.
    message = refused_before_anything(
        tmp_path,
        synthetic_root,
        ["trainer.optimizer._target_=segx.tracking.runs.mlflow.delete_run", "+trainer.optimizer.run_id=abc"],
        r"trainer.optimizer._target_='segx.tracking.runs.mlflow.delete_run' is a function, not an optimizer class",
    )
    assert "tf_keras.optimizers.Adam" in message  # says what to use instead


def test_nested_function_in_an_optimizer_argument_is_refused(tmp_path, synthetic_root):
    victim = tmp_path / "pwned.txt"
    refused_before_anything(
        tmp_path,
        synthetic_root,
        [f"trainer.optimizer.learning_rate={write_file_target(victim)}"],
        r"trainer.optimizer.learning_rate._target_='segx.config.Path.write_text' is a function, "
        r"not a learning-rate schedule class",
    )


def test_nested_function_in_positional_args_is_refused(tmp_path, synthetic_root):
    victim = tmp_path / "pwned.txt"
    refused_before_anything(
        tmp_path,
        synthetic_root,
        ["~trainer.optimizer.learning_rate", f"+trainer.optimizer._args_=[{write_file_target(victim)}]"],
        r"trainer.optimizer._args_\[0\]._target_='segx.config.Path.write_text' is a function",
    )


def test_nested_class_of_another_kind_in_args_is_refused(tmp_path, synthetic_root):
    # pathlib.Path is a class, but not a schedule: an argument may build only its own kind.
    refused_before_anything(
        tmp_path,
        synthetic_root,
        [f"trainer.optimizer.learning_rate={{_target_:segx.config.Path,_args_:['{tmp_path}/x']}}"],
        r"learning_rate._target_='segx.config.Path' is the class pathlib.Path, not a learning-rate schedule",
    )


def test_function_target_on_the_command_line_exits_2_with_one_line(tmp_path, synthetic_root, capfd):
    out, victim = tmp_path / "out", tmp_path / "pwned.txt"
    args = [*tiny_train_overrides(out, synthetic_root), f"trainer.optimizer.learning_rate={write_file_target(victim)}"]
    proc = run_in_process(capfd, ["segx.train", *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segx: error: trainer.optimizer.learning_rate._target_="), lines
    assert not victim.exists()
    assert not (out / "mlflow.db").exists() and not (out / "splits").exists()


@pytest.mark.parametrize(
    "key,target,message",
    [
        (
            "trainer.optimizer",
            "albumentations.HorizontalFlip",
            "is an albumentations transform class, not an optimizer class",
        ),
        ("trainer.optimizer", "tf_keras.callbacks.ModelCheckpoint", "is a callback class, not an optimizer class"),
        (
            "trainer.optimizer",
            "tf_keras.layers.Dense",
            "is the class tf_keras.src.layers.core.dense.Dense, not an optimizer",
        ),
        ("trainer.optimizer", "tf_keras.optimizers", "is a module, not an optimizer class"),
        ("trainer.lr_schedule", "tf_keras.optimizers.Adam", "is an optimizer class, not a callback class"),
        (
            "trainer.lr_schedule",
            "tf_keras.optimizers.schedules.ExponentialDecay",
            "not a callback class; a schedule goes in trainer.optimizer.learning_rate",
        ),
        # segx's own Keras callback is a Callback subclass, but segx never builds its classes from YAML
        (
            "trainer.lr_schedule",
            "segx.training.fit.MemberCallback",
            "is not allowed; segx builds only a callback class",
        ),
        ("trainer.lr_schedule", "tf_keras.callbacks.RemoteMonitor", "is not allowed: it posts training logs to a URL"),
        ("trainer.lr_schedule", "tf_keras.callbacks.LambdaCallback", "is not allowed"),
        ("augment.transforms[0]", "tf_keras.optimizers.Adam", "is an optimizer class, not an albumentations transform"),
        ("augment.transforms[0]", "albumentations.core.serialization.load", "is a function, not an albumentations"),
        ("trainer.optimizer", "os.system", "is not allowed"),
        ("trainer.optimizer", "tf_keras.optimizers._private", "is not allowed"),
    ],
)
def test_class_of_the_wrong_kind_is_refused(key, target, message):
    with pytest.raises(SegxError, match=message) as info:
        checked_container({"_target_": target}, key)
    assert str(info.value).startswith(f"{key}._target_='{target}'") and "\n" not in str(info.value)


def test_wrong_kinds_are_refused_by_validate_config():
    for override, message in [
        ("trainer.optimizer._target_=albumentations.HorizontalFlip", "not an optimizer class"),
        ("trainer.optimizer._target_=tf_keras.callbacks.ModelCheckpoint", "is a callback class, not an optimizer"),
        ("augment=none", None),  # and a valid config passes
    ]:
        cfg = compose_config("train", [override])
        if message is None:
            validate_config(cfg)
            continue
        with pytest.raises(SegxError, match=message):
            validate_config(cfg)


def test_misspelt_class_and_argument_get_a_suggestion():
    with pytest.raises(
        SegxError, match=r"'tf_keras.optimizers.Adamm' does not exist .*did you mean 'tf_keras.optimizers.Adam'\?"
    ):
        checked_container({"_target_": "keras.optimizers.Adamm"}, "trainer.optimizer")
    with pytest.raises(
        SegxError,
        match=r"trainer.optimizer.learnig_rate is not an argument of tf_keras.optimizers.Adam; did you mean 'learning_rate'\?",
    ):
        checked_container({"_target_": "tf_keras.optimizers.Adam", "learnig_rate": 0.1}, "trainer.optimizer")
    # tf-keras would ignore `lr` with a warning and train at its default rate
    with pytest.raises(SegxError, match=r"trainer.optimizer.lr is not an argument .* did you mean 'learning_rate'\?"):
        checked_container({"_target_": "tf_keras.optimizers.SGD", "lr": 0.1}, "trainer.optimizer")
    # albumentations would drop the unknown name silently
    with pytest.raises(
        SegxError,
        match=r"augment.transforms\[0\].pp is not an argument of albumentations.HorizontalFlip; did you mean 'p'\?",
    ):
        checked_container([{"_target_": "albumentations.HorizontalFlip", "pp": 0.5}], "augment.transforms")
    with pytest.raises(SegxError, match=r"trainer.lr_schedule.factr is not an argument .*did you mean 'factor'\?"):
        checked_container({"_target_": "tf_keras.callbacks.ReduceLROnPlateau", "factr": 0.5}, "trainer.lr_schedule")


@pytest.mark.parametrize("special", ["_partial_", "_recursive_", "_convert_"])
def test_hydra_instantiate_options_are_refused(special):
    value = {"_partial_": True, "_recursive_": False, "_convert_": "none"}[special]
    node = {
        "_target_": "tf_keras.optimizers.Adam",
        "learning_rate": {
            "_target_": "tf_keras.optimizers.schedules.ExponentialDecay",
            "initial_learning_rate": 0.1,
            "decay_steps": 10,
            "decay_rate": 0.9,
            special: value,
        },
    }
    with pytest.raises(SegxError, match=rf"trainer.optimizer.learning_rate.{special} is not supported"):
        checked_container(node, "trainer.optimizer")


def test_target_outside_the_built_places_is_refused(tmp_path, synthetic_root):
    refused_before_anything(
        tmp_path,
        synthetic_root,
        ["+data.extra={_target_:tf_keras.optimizers.Adam}"],
        r"data.extra._target_ is not allowed here: segx builds objects only at trainer.optimizer",
    )


def test_a_required_object_without_target_is_refused():
    with pytest.raises(SegxError, match="trainer.optimizer has no _target_"):
        checked_container({"learning_rate": 0.1}, "trainer.optimizer")
    with pytest.raises(SegxError, match=r"augment.transforms\[1\]='HorizontalFlip' is not an object"):
        checked_container([{"_target_": "albumentations.VerticalFlip"}, "HorizontalFlip"], "augment.transforms")


# --- what is allowed still builds, exactly as checked ------------------------------------------


@pytest.mark.parametrize("spelling", ["keras.optimizers.Adam", "tf.keras.optimizers.Adam", "tf_keras.optimizers.Adam"])
def test_keras_spellings_build_tf_keras_adam_with_a_nested_schedule(spelling):
    from segx.backend import keras

    schedule = {"_target_": "tensorflow.keras.optimizers.schedules.ExponentialDecay", "_args_": [0.01, 100, 0.5]}
    optimizer = instantiate({"_target_": spelling, "learning_rate": schedule, "beta_1": 0.8}, "trainer.optimizer")
    assert type(optimizer) is keras.optimizers.Adam
    schedule = optimizer._learning_rate  # the public property gives the current value
    assert isinstance(schedule, keras.optimizers.schedules.ExponentialDecay)
    assert schedule.initial_learning_rate == 0.01 and schedule.decay_rate == 0.5
    assert float(optimizer.beta_1) == pytest.approx(0.8)
    legacy = instantiate(
        {"_target_": "keras.optimizers.legacy.SGD", "learning_rate": 0.1, "clipnorm": 1.0}, "trainer.optimizer"
    )
    assert isinstance(legacy, keras.optimizers.legacy.SGD) and legacy.clipnorm == 1.0


def test_default_callback_and_compose_with_nested_transforms_build():
    import albumentations as A
    import numpy as np

    from segx.backend import keras
    from segx.objects import build_augmentation

    cfg = compose_config("train", [])
    callback = instantiate(cfg.trainer.lr_schedule, "trainer.lr_schedule")
    assert isinstance(callback, keras.callbacks.ReduceLROnPlateau) and callback.monitor == "val/dice"
    transforms = [
        {
            "_target_": "albumentations.Compose",
            "p": 1.0,
            "transforms": [
                {
                    "_target_": "albumentations.OneOf",
                    "p": 1.0,
                    "transforms": [
                        {"_target_": "albumentations.HorizontalFlip", "p": 1.0},
                        {"_target_": "albumentations.VerticalFlip", "p": 1.0},
                    ],
                },
                {"_target_": "albumentations.RandomRotate90", "p": 0.5},
            ],
        },
    ]
    checked_container(transforms, "augment.transforms")
    pipeline = build_augmentation(transforms)
    inner = pipeline.transforms[0]
    assert isinstance(inner, A.Compose) and isinstance(inner.transforms[0], A.OneOf)
    assert [type(t).__name__ for t in inner.transforms[0].transforms] == ["HorizontalFlip", "VerticalFlip"]
    image = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    out = pipeline(image=image, mask=np.zeros((64, 64), np.uint8))
    assert out["image"].shape == (64, 64, 3) and not np.array_equal(out["image"], image)  # a flip always applies


def test_build_errors_are_one_line_naming_the_key():
    with pytest.raises(
        SegxError,
        match=r"trainer.lr_schedule: cannot build tf_keras.callbacks.ReduceLROnPlateau \(ValueError: .*factor >= 1.0",
    ) as info:
        instantiate({"_target_": "tf_keras.callbacks.ReduceLROnPlateau", "factor": 2.0}, "trainer.lr_schedule")
    assert "\n" not in str(info.value)


# --- section 6: values that used to give tracebacks -------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.loss.dice=nan", r"trainer.loss.dice=nan must be a finite number >= 0"),
        ("trainer.loss.bce=inf", r"trainer.loss.bce=inf must be a finite number >= 0"),
        ("seed=1e23", r"seed=1e\+23 must be an integer"),
        ("seed=4294967296", r"seed=4294967296 is out of range; use a value in \[0, 4294967295\]"),
        ("trainer.optimizer.learning_rate=fast", r"trainer.optimizer.learning_rate='fast' must be a positive number"),
        ("trainer.optimizer.learning_rate=nan", r"trainer.optimizer.learning_rate=nan must be a positive number"),
        ("trainer.lr_schedule.patience=three", r"trainer.lr_schedule.patience='three' must be a number"),
        ("trainer.early_stopping.min_delta=nan", r"trainer.early_stopping.min_delta=nan is not a finite number"),
        ("data.mask_threshold=nan", r"data.mask_threshold=nan is not a finite number"),
        ("+trainer.loss.dicee=1", r"unknown loss 'dicee'; did you mean 'dice'\?"),
    ],
)
def test_bad_values_are_one_line_before_any_run(tmp_path, synthetic_root, override, message):
    refused_before_anything(tmp_path, synthetic_root, [override], message)


@pytest.mark.parametrize("root", ["''", "'   '", "null"])
def test_empty_data_root_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch, root):
    monkeypatch.chdir(tmp_path)  # were it used, the working directory would be this empty folder
    out = tmp_path / "out"
    cfg = compose_config(
        "train",
        [
            "data=folder",
            f"data.root={root}",
            f"paths.output_dir={out}",
            f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
        ],
    )
    with pytest.raises(SegxError, match=r"data.root=.* is empty; pass data.root=PATH") as info:
        train_member(cfg)
    assert "\n" not in str(info.value)
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override,message",
    [
        ("ensemble.tolerance=nan", r"ensemble.tolerance=nan is not a finite number"),
        ("ensemble.threshold=nan", r"ensemble.threshold=nan is not a finite number"),
        ("ensemble.thresholds.step=inf", r"ensemble.thresholds.step=inf is not a finite number"),
        ("ensemble.greedy_min_gain=nan", r"ensemble.greedy_min_gain=nan is not a finite number"),
        ("ensemble.postprocess_min_sizes=[10,-5]", r"ensemble.postprocess_min_sizes\[1\]=-5 must be"),
        (
            "ensemble.train_overrides=['trainer.optimizer._target_=segx.tracking.runs.mlflow.delete_run']",
            r"ensemble.train_overrides \(backbone=resnet18\): "
            r"trainer.optimizer._target_='segx.tracking.runs.mlflow.delete_run' is a function",
        ),
    ],
)
def test_ensemble_values_are_refused_before_the_store_is_opened(tmp_path, override, message):
    from segx.workflows.ensemble import build_ensemble

    out = tmp_path / "out"
    cfg = compose_config(
        "ensemble",
        [
            f"paths.output_dir={out}",
            f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
            "ensemble.train_missing=true",
            "ensemble.members=[resnet18]",
            override,
        ],
    )
    with pytest.raises(SegxError, match=message):
        build_ensemble(cfg)
    assert not out.exists()
