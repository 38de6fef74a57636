"""Shared fixtures. Everything is real: TF models, an SQLite MLflow store in a temp folder,
files on disk. Tests stay fast by using 64 px inputs, a handful of images and 1-2 epochs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Keras, TensorFlow and matplotlib write under $HOME on import: point them at a temp folder
# before anything imports them.
_HOME = tempfile.mkdtemp(prefix="segx-tests-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["KERAS_HOME"] = os.path.join(_HOME, "keras")
os.environ["MPLCONFIGDIR"] = os.path.join(_HOME, "matplotlib")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
ROOT = CONF.parent


def compose_config(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def store_overrides(out: Path) -> list[str]:
    return [f"paths.output_dir={out}", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db"]


def tiny_train_overrides(out: Path, data_root: Path, backbone: str = "resnet18", epochs: int = 1) -> list[str]:
    return [
        *store_overrides(out),
        f"data.root={data_root}",
        "data.n_images=16",
        "data.source_size=64",
        "data.image_size=64",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        f"trainer.epochs={epochs}",
        "trainer.batch_size=4",
        "trainer.verbose=0",
        f"backbone={backbone}",
    ]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from segx.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), n_images=16, size=64, seed=0)


@pytest.fixture(scope="session")
def member_store(tmp_path_factory, synthetic_root):
    """Two tiny trained members in one store: (output_dir, {backbone: run_id})."""
    from segx.workflows.member import train_member

    out = tmp_path_factory.mktemp("store")
    runs = {}
    for backbone in ("resnet18", "mobilenetv2"):
        cfg = compose_config("train", tiny_train_overrides(out, synthetic_root, backbone, epochs=2))
        train_member(cfg)
        from segx import tracking

        client = tracking.connect(str(cfg.mlflow.tracking_uri))
        exp = client.get_experiment_by_name("segx").experiment_id
        runs[backbone] = tracking.find_runs(client, exp, "member", tags={"segx.backbone": backbone})[0].info.run_id
    return out, runs


@pytest.fixture(scope="session")
def ensemble_record(member_store):
    from segx.workflows.ensemble import build_ensemble

    out, runs = member_store
    cfg = compose_config(
        "ensemble",
        [*store_overrides(out), "ensemble.members=[resnet18,mobilenetv2]", "ensemble.register_name=segx-test-ensemble"],
    )
    return build_ensemble(cfg)
