"""Hostile but realistic values (issue 21): a name is never a path, counts are bounded by what
they can mean, and every refusal is one line (exit 2) before a run or a file is made."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segx import tracking
from segx.errors import SegxError
from tests.conftest import ROOT, compose_config, store_overrides
from tests.helpers import run_in_process, seed_store


def run(args, timeout=180, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "name", ["../../escaped", "/tmp/segx-absolute-name", "${oc.env:HOME}", "a/b", "..", "spaced name"]
)
def test_an_experiment_name_never_leaves_the_artifact_root(tmp_path, name):
    from mlflow.utils.file_utils import local_file_uri_to_path

    root = tmp_path / "artifacts"
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracking.experiment_id(client, name, str(root))
    location = Path(local_file_uri_to_path(client.get_experiment(exp).artifact_location)).resolve()
    assert location.parent == root.resolve(), location
    assert client.get_experiment(exp).name == name  # the name itself is kept, only its folder is safe


def test_names_that_spell_alike_get_their_own_folders(tmp_path):
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    folders = {
        client.get_experiment(tracking.experiment_id(client, n, str(tmp_path / "a"))).artifact_location
        for n in ("a/b", "a_b", "a:b")
    }
    assert len(folders) == 3
    assert tracking.artifact_folder_name("nuclei") == "nuclei"  # plain names stay as they are


def test_a_blank_experiment_name_is_refused(tmp_path):
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(SegxError, match="mlflow.experiment_name"):
        tracking.experiment_id(client, "  ", str(tmp_path / "a"))


def test_folds_beyond_the_cases_are_refused_before_memory_is_spent():
    from segx.data.split import make_folds

    with pytest.raises(SegxError, match=r"data.folds=1000000000000 is more than the 3 cases"):
        make_folds(["a", "b", "c"], 10**12, 0.0, 0)


def test_threads_are_bounded_by_the_cores():
    from segx.training.resources import job_threads

    with pytest.raises(SegxError, match=r"trainer.threads=100000 is over 4 per core \(2 cores here\)"):
        job_threads(100000, None, {}, 2)
    assert job_threads(8, None, {}, 2) == 8


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.folds=1000000000000", "fold=0"], "data.folds=1000000000000 is out of range; use a value in [2, 100]"),
        (["data.mode=patch", "data.overlap=0.99"], "data.overlap=0.99 is out of range; use a value in [0.0, 0.9]"),
        (["trainer.deterministic=maybe"], "trainer.deterministic='maybe' must be true or false"),
    ],
)
def test_training_refuses_in_one_line_before_any_run(tmp_path, overrides, message, capfd):
    result = run_in_process(capfd, ["segx.train", *store_overrides(tmp_path), *overrides])
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"segx: error: {message}"] or message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("ensemble.grid_step=0", "ensemble.grid_step=0 must be > 0"),
        ("ensemble.grid_step=0.3", "ensemble.grid_step=0.3 must divide 1"),
        ("ensemble.register_name=a/b", "ensemble.register_name='a/b': Invalid model name"),
        ("ensemble.postprocess=maybe", "ensemble.postprocess='maybe' must be true or false"),
        ("ensemble.train_missing=maybe", "ensemble.train_missing='maybe' must be true or false"),
        ("ensemble.preview_cases=-1", "ensemble.preview_cases=-1 is out of range"),
    ],
)
def test_the_ensemble_checks_what_the_search_and_registry_need_first(tmp_path, override, message):
    from segx.workflows.ensemble import validate_config

    overrides = [*store_overrides(tmp_path), override] + (["ensemble.search=grid"] if "grid_step" in override else [])
    with pytest.raises(SegxError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(compose_config("ensemble", overrides))


def test_the_ensemble_command_refuses_a_bad_registry_name_before_opening_the_store(tmp_path, capfd):
    result = run_in_process(capfd, ["segx.ensemble", *store_overrides(tmp_path), "ensemble.register_name=a:b"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "ensemble.register_name='a:b'" in result.stderr and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("workers=1000", "workers=1000 is out of range"),
        ("port=70000", "port=70000 is out of range; use a value in [1, 65535]"),
        ("postgres_port=70000", "postgres_port=70000 is out of range; use a value in [1, 65535]"),
        ("host=no-such-host.invalid", "host='no-such-host.invalid' is not an address of this machine"),
        (
            "extra_args=['--backend-store-uri=sqlite:///x.db']",
            "extra_args sets --backend-store-uri, which segx.server sets itself",
        ),
        ("extra_args=['--port','5009']", "extra_args sets --port, which segx.server sets itself; use port=... instead"),
    ],
)
def test_the_server_refuses_in_one_line_before_starting_anything(tmp_path, override, message):
    result = run(["segx.server", f"folder={tmp_path / 'server'}", override], timeout=120)
    assert result.returncode == 2, (result.stdout + result.stderr)[-2000:]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "server").exists() or not any((tmp_path / "server").iterdir())
    assert os.path.exists(ROOT)  # nothing else to clean: no PostgreSQL or MLflow was started


def test_values_from_the_environment_are_recorded_as_written_not_as_their_values(tmp_path, synthetic_root, monkeypatch):
    """A tracking URI with a password from the environment: the run's params and config.yaml keep
    ``${oc.env:...}``; the value (here the store's folder) is in neither."""
    seed_store(tmp_path / "s3cr3t-store")  # an empty store: creating one is not what this test is about
    from segx.workflows.member import train_member
    from tests.conftest import tiny_train_overrides

    secret = tmp_path / "s3cr3t-store"
    monkeypatch.setenv("SEGX_TEST_STORE", str(secret))
    overrides = [
        o for o in tiny_train_overrides(tmp_path, synthetic_root, epochs=1) if not o.startswith("mlflow.tracking_uri=")
    ]
    train_member(
        compose_config(
            "train",
            [
                *overrides,
                "mlflow.tracking_uri=sqlite:///${oc.env:SEGX_TEST_STORE}/mlflow.db",
                "mlflow.system_metrics=false",
            ],
        )
    )
    client = tracking.connect(f"sqlite:///{secret}/mlflow.db", create=False)
    (run,) = tracking.find_runs(client, client.get_experiment_by_name("segx").experiment_id, "member")
    assert run.data.params["mlflow.tracking_uri"] == "sqlite:///${oc.env:SEGX_TEST_STORE}/mlflow.db"
    assert not any("s3cr3t" in v for v in run.data.params.values())
    config = tracking.download(client, run.info.run_id, "config.yaml", tmp_path / "dl").read_text()
    assert "${oc.env:SEGX_TEST_STORE}" in config and "s3cr3t" not in config


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, synthetic_root):
    from segx.data.decoded import decode_cases
    from segx.data.folder import discover_cases

    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(SegxError, match=r"^data.cache_dir=.*/cache is a file, not a folder"):
        decode_cases(discover_cases(synthetic_root), tmp_path / "cache")


def test_a_full_cache_disk_is_one_line(tmp_path, synthetic_root):
    """The decoded cache on a 64 KB tmpfs (root mounts one; skipped with the reason elsewhere)."""
    from segx.data.decoded import decode_cases
    from segx.data.folder import discover_cases

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'})")
    try:
        with pytest.raises(
            SegxError, match=r"^data.cache_dir=.*: cannot write the decoded cache \(No space left on device"
        ):
            decode_cases(discover_cases(synthetic_root), disk / "cache")
        leftovers = [p.name for p in (disk / "cache").rglob("*") if ".tmp-" in p.name]
        assert not leftovers, leftovers  # no partial file stays behind
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_yaml_alias_bomb_is_refused_before_it_is_composed(tmp_path):
    """9 levels of 10 aliases: 10**9 values from 10 lines (it once took 5.2 GB and 10 minutes)."""
    own = tmp_path / "myconf" / "experiment"
    own.mkdir(parents=True)
    lines = ["# @package _global_", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (own / "bomb.yaml").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    result = run(
        ["segx.train", "--config-dir", str(tmp_path / "myconf"), "experiment=bomb", *store_overrides(tmp_path)],
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "bomb.yaml: its aliases expand to" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 60


def test_the_ensembles_extraction_folder_as_a_file_is_one_line(tmp_path, member_store, capfd):
    from tests.helpers import copy_store, ensemble_args, statuses

    store = copy_store(member_store[0], tmp_path / "store")
    (store / "cache").mkdir(exist_ok=True)
    shutil.rmtree(store / "cache" / "probs", ignore_errors=True)
    (store / "cache" / "probs").write_text("not a folder")
    before = statuses(store, "ensemble")  # the shared store may hold ensembles of other tests
    result = run_in_process(capfd, ensemble_args(store))
    assert result.returncode == 2, result.stderr[-2000:]
    # The shared store may hold runs other tests deleted: segx notes it skipped them, then refuses.
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("segx: skipped ")]
    assert lines == [
        f"segx: error: {store / 'cache' / 'probs'} (the members' extracted probabilities) is a file, "
        "not a folder; remove it (segx rebuilds it) or set paths.output_dir=..."
    ]
    assert statuses(store, "ensemble") == before  # refused before any run was made


def test_an_interpolation_as_a_config_key_is_one_line(tmp_path):
    own = tmp_path / "myconf" / "experiment"
    own.mkdir(parents=True)
    (own / "keyed.yaml").write_text('# @package _global_\ndata:\n  "${oc.env:HOME}": 1\n')
    result = run(
        ["segx.train", "--config-dir", str(tmp_path / "myconf"), "experiment=keyed", *store_overrides(tmp_path)]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "segx: error: config key '${oc.env:HOME}' (under data) is not a plain name (letters, "
        "digits, _ - . / and spaces): rename it; an interpolation cannot be a key"
    )
    assert not (tmp_path / "mlflow.db").exists()
