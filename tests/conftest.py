"""Shared fixtures. Everything is real: TF models, an SQLite MLflow store in a temp folder,
files on disk. Tests stay fast by using 64 px inputs, a handful of images and 1-2 epochs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Keras, TensorFlow and matplotlib write under $HOME on import: point them at a temp folder
# before anything imports them. So do segx's own defaults: a test (or a command it starts) that
# sets no paths.output_dir writes under this session's temp folder, never the checkout's outputs/
# (conf/paths/default.yaml reads SEGX_OUTPUT_DIR), and MLflow's fluent API, pointed nowhere, does
# not create ./mlruns. The session check at the end (pytest_sessionfinish) fails the run if the
# checkout still gained a file.
_HOME = tempfile.mkdtemp(prefix="segx-tests-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["KERAS_HOME"] = os.path.join(_HOME, "keras")
os.environ["MPLCONFIGDIR"] = os.path.join(_HOME, "matplotlib")
os.environ["SEGX_OUTPUT_DIR"] = os.path.join(_HOME, "outputs")
os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + os.path.join(_HOME, "default-mlflow.db")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = os.path.join(_HOME, "hypothesis")  # not ./.hypothesis

from pathlib import Path  # noqa: E402

from hypothesis import settings  # noqa: E402

# Hypothesis keeps its example database in ./.hypothesis of the working folder: not in the checkout.
settings.register_profile("segx", database=None)
settings.load_profile("segx")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
ROOT = CONF.parent

# -- the checkout stays as it was ---------------------------------------------------------------
# Folders that are not the project's files: git's, the venvs, and Python's and the tools' caches.
_NOT_OURS = {".git", ".venv", ".venv-peer", "__pycache__", ".pytest_cache", ".ruff_cache"}


def checkout_files(root: Path = ROOT) -> set[str]:
    """Every file under the checkout, relative, outside :data:`_NOT_OURS`."""
    out = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _NOT_OURS and not d.endswith(".egg-info")]
        out.update(os.path.relpath(os.path.join(folder, f), root) for f in files)
    return out


def pytest_sessionstart(session):
    session.config._segx_checkout = checkout_files()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_segx_checkout", None)
    if before is None:
        return
    report = session.config.option.xmlpath  # make test's durations file (gitignored outputs/), written after this
    gained = sorted(f for f in checkout_files() - before if not (report and ROOT / f == Path(report).absolute()))
    if gained:
        shown = "\n  ".join(gained[:20]) + (f"\n  ... and {len(gained) - 20} more" if len(gained) > 20 else "")
        session.config.get_terminal_writer().line(
            f"segx: the tests wrote {len(gained)} file(s) into the checkout (every test works in tmp_path):\n  {shown}",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
