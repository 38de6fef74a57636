"""Shared fixtures. Everything is real: TF models, an SQLite MLflow store in a temp folder,
files on disk. Tests stay fast by using 64 px inputs, a handful of images and 1-2 epochs."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
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


@pytest.fixture(autouse=True)
def _unscoped_runs_stay_with_their_test():
    """segx.tracking keeps the runs started but not yet in their scope (a command's exit ends
    them). A test that leaves one behind must not hand it to the next test, whose signal or
    error would then end it over a store that may be gone (a stopped server: a minute of retries)."""
    yield
    runs = sys.modules.get("segx.tracking.runs")
    if runs is not None:
        runs._unscoped.clear()


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


# -- session stores: trained once, read by many ---------------------------------------------------
# A session store is trained once and shared. A test that only reads gets it as it is, and the
# store is checked after the test: a test that changed any file under it fails (it would change
# what later tests read, so the order of the tests would matter). A test that writes asks for a
# private copy (``member_store_copy``), which it may change at will.


def store_state(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under a store (the database, artifacts, splits, caches) with its size and mtime."""
    state = {}
    for folder, _, files in os.walk(out):
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            state[os.path.relpath(os.path.join(folder, name), out)] = (stat.st_size, stat.st_mtime_ns)
    return state


@contextlib.contextmanager
def unchanged(out: Path):
    """The test reads ``out`` and changes nothing in it."""
    before = store_state(out)
    yield
    after = store_state(out)
    changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    assert not changed, (
        f"the test changed the shared session store {out} (ask for a private copy, member_store_copy): "
        + ", ".join(changed[:10])
    )


@pytest.fixture(scope="session")
def _session_store(tmp_path_factory, synthetic_root):
    """Two tiny trained members (resnet18, mobilenetv2) and their searched ensemble (registered
    as segx-test-ensemble, with its pyfunc model) in one store: (output_dir, {backbone: run_id},
    the ensemble's record). Built whole before any test reads it."""
    from segx import tracking
    from segx.workflows.ensemble import build_ensemble
    from segx.workflows.member import train_member
    from tests.helpers import seed_store

    out = seed_store(tmp_path_factory.mktemp("store"))  # an empty store: made once per process
    runs = {}
    for backbone in ("resnet18", "mobilenetv2"):
        cfg = compose_config("train", tiny_train_overrides(out, synthetic_root, backbone, epochs=2))
        train_member(cfg)
        client = tracking.connect(str(cfg.mlflow.tracking_uri))
        exp = client.get_experiment_by_name("segx").experiment_id
        runs[backbone] = tracking.find_runs(client, exp, "member", tags={"segx.backbone": backbone})[0].info.run_id
    cfg = compose_config(
        "ensemble",
        [*store_overrides(out), "ensemble.members=[resnet18,mobilenetv2]", "ensemble.register_name=segx-test-ensemble"],
    )
    record = build_ensemble(cfg)
    return out, runs, record


@pytest.fixture
def member_store(_session_store):
    """The session store, read only: (output_dir, {backbone: run_id})."""
    out, runs, _ = _session_store
    with unchanged(out):
        yield out, dict(runs)


@pytest.fixture
def ensemble_record(member_store, _session_store):
    """The session store's ensemble record (read only, like member_store)."""
    return _session_store[2]


@pytest.fixture
def member_store_copy(_session_store, tmp_path):
    """A private copy of the session store, for a test that writes: (output_dir, {backbone: run_id})."""
    from tests.helpers import copy_store

    out, runs, _ = _session_store
    with unchanged(out):  # nothing reaches the original through the copy's hard links
        yield copy_store(out, tmp_path / "store"), dict(runs)


# A small decoder keeps the fast tests' networks small: tf2onnx needs some 60-70 times a
# network's weights in memory while it converts it (3.9 GB at its peak for a default resnet18 Unet).
SMALL_DECODER = [32, 16, 16, 8, 8]


@pytest.fixture(scope="session")
def _native_store(tmp_path_factory):
    """Images of odd sizes (tests/helpers.py make_folder); a patch member (mobilenetv2, 32 px
    sliding window) and a resize member (efficientnetb0, 64 px), small decoders; their searched
    ensemble (grid, no post-processing, with its pyfunc model) and an equal-weight ensemble run of
    both, hand-written (so that both views are certainly in an export). test_native reads it,
    test_export works on private copies."""
    from segx import tracking
    from segx.workflows.ensemble import build_ensemble
    from segx.workflows.member import train_member
    from tests.helpers import ensemble_run, make_folder, native_overrides, seed_store

    tmp = tmp_path_factory.mktemp("native")
    root, out = make_folder(tmp / "data"), seed_store(tmp / "out")
    common = native_overrides(out, root, f"+arch.options.decoder_filters={SMALL_DECODER}".replace(" ", ""))
    patch = ["backbone=mobilenetv2", "data.mode=patch", "data.patch_size=32", "data.samples_per_epoch=8"]
    train_member(compose_config("train", [*common, *patch, "mlflow.run_name=patch"]))
    train_member(
        compose_config("train", [*common, "backbone=efficientnetb0", "data.image_size=64", "mlflow.run_name=resize"])
    )
    client = tracking.connect(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("segx").experiment_id
    runs = {r.info.run_name: r.info.run_id for r in tracking.find_runs(client, exp, "member")}
    ids = [runs["patch"], runs["resize"]]
    searched = build_ensemble(
        compose_config(
            "ensemble",
            [
                *store_overrides(out),
                f"ensemble.run_ids=[{ids[0]},{ids[1]}]",
                "ensemble.postprocess=false",
                "ensemble.search=grid",
            ],
        )
    )
    # The same members at equal weights, as a hand-written record (segx reads those too).
    record = {k: v for k, v in searched.to_json().items() if k != "run_id"}
    record["members"] = [{**m, "weight": 0.5, "weight_count": 1} for m in record["members"]]
    record.update(
        weight_denominator=2, threshold=0.5, postprocess={"min_size": 0, "fill_holes": False, "keep_largest": False}
    )
    equal = ensemble_run(client, exp, record, "ensemble-equal-handmade")
    return {
        "out": out,
        "root": root,
        "experiment": exp,
        "members": ids,
        "searched": searched.run_id,
        "record": searched,
        "equal": equal,
    }


@pytest.fixture
def native_store(_native_store):
    """The session's native store, read only (a dict: out, root, experiment, members [patch,
    resize], searched, record, equal)."""
    with unchanged(_native_store["out"]):
        yield dict(_native_store)
