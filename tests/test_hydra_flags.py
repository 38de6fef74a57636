"""Hydra's own flags behave as Hydra documents them, and each job leaves its log."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_train_overrides
from tests.helpers import run_in_process, seed_store


def run(args, timeout=300, env=None):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def test_info_prints_each_line_once():
    result = run(["segx.train", "--info"])
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert text.count("Hydra 1.") == 1 and text.count("Installed Hydra Plugins") == 1


def test_a_job_writes_its_log_in_its_hydra_folder(tmp_path, synthetic_root, capfd):
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    result = run(["segx.train", *tiny_train_overrides(tmp_path, synthetic_root), "trainer.epochs=1"], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (log,) = (tmp_path / "hydra").glob("*-train/train.log")
    text = log.read_text()
    assert "segx: member run" in text and "best epoch" in text  # what the console showed
    bad = run_in_process(capfd, ["segx.train", *tiny_train_overrides(tmp_path, synthetic_root), "trainer.epochs=0"])
    assert bad.returncode == 2
    logs = sorted((tmp_path / "hydra").glob("*-train/train.log"))
    assert any("segx: error: trainer.epochs=0 is out of range" in p.read_text() for p in logs)


def test_shell_completion_reaches_hydra():
    result = run(["segx.train", "-sc", "install=bash"])
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout and "segx: error" not in result.stderr  # Hydra's bash snippet
    # What bash passes when completing `segx-train backbone=res<TAB>` (the console script).
    query = run(["segx.train", "-sc", "query=bash"], env={"COMP_LINE": "segx-train backbone=res"})
    assert query.returncode == 0, query.stderr
    assert "backbone=resnet34" in query.stdout and "backbone=resnet18" in query.stdout


def test_a_users_own_config_folder_is_searched_by_the_prechecks_too(tmp_path, synthetic_root, capfd):
    seed_store(tmp_path / "out")  # an empty store: creating one is not what this test is about
    own = tmp_path / "myconf" / "backbone"
    own.mkdir(parents=True)
    (own / "myres.yaml").write_text("name: resnet18\nencoder_weights: null\nencoder_freeze: false\n")
    overrides = [*tiny_train_overrides(tmp_path / "out", synthetic_root), "backbone=myres"]
    result = run(["segx.train", "--config-dir", str(tmp_path / "myconf"), *overrides], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resnet18-unet" in result.stdout
    same = run_in_process(
        capfd, ["segx.train", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", *overrides, "trainer.epochs=0"]
    )
    assert "unknown backbone" not in same.stderr and "trainer.epochs=0 is out of range" in same.stderr
    typo = run(["segx.train", "--config-dir", str(tmp_path / "myconf"), *overrides[:-1], "backbone=myress"])
    assert typo.returncode == 2 and "unknown backbone 'myress'; did you mean 'myres'?" in typo.stderr


def test_each_command_help_lists_its_own_groups():
    helps = {
        name: run([module, "--help"])
        for name, module in [
            ("train", "segx.train"),
            ("ensemble", "segx.ensemble"),
            ("predict", "segx.predict"),
            ("bench", "segx.bench"),
        ]
    }
    for result in helps.values():
        assert result.returncode == 0, result.stderr
    assert "backbone: " in helps["train"].stdout and "resnet34" in helps["train"].stdout
    assert "profile:" not in helps["train"].stdout  # a bench group, which train refuses
    for name in ("ensemble", "predict"):
        groups = helps[name].stdout.split("== Groups")[1].split("== Config")[0]
        assert groups.split("\n")[1:-2] == ["mlflow: local", "experiment: dsb2018 | sandstone"], (
            groups
        )  # not training groups
        assert f"segx.{name}:" in helps[name].stdout
    assert "profile: full | quick" in helps["bench"].stdout


# Slow: a two-job sweep; the reproduce command rebuilding the recorded config stays fast (test_console_scripts:
# a member by hand; test_reproduce: an ensemble).
@pytest.mark.slow
def test_info_reproduce_rebuilds_exactly_each_jobs_config(tmp_path, synthetic_root):
    """Non-default overrides of every kind, in a sweep: each job's reproduce command composes
    the very config the job ran with (compared with its config.yaml artifact)."""
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    import shlex

    from omegaconf import OmegaConf

    from segx import tracking
    from segx.info import describe
    from tests.conftest import compose_config

    overrides = [
        *tiny_train_overrides(tmp_path, tmp_path / "data"),
        "augment=strong",
        "trainer.loss.focal=0.5",
        "trainer.optimizer.learning_rate=0.0005",
        "data.n_images=12",
        "tags=[dev,baseline]",
        "note=first try",
    ]
    result = run(["segx.train", "-m", "seed=1,2", *overrides], timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("segx").experiment_id
    runs = tracking.find_runs(client, exp, "member")
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2"]
    for r in runs:
        assert r.data.tags["tag.dev"] == "true" and r.data.tags["segx.tags"] == "dev, baseline"
        assert r.data.tags["mlflow.note.content"].startswith("first try")
        lines = describe(client, r.info.run_id).splitlines()
        assert any("reproduce (the same config (check: add --cfg job)" in line for line in lines)
        command = [line for line in lines if line.startswith("    python -m segx.train")][-1]
        args = shlex.split(command)[3:]
        assert f"seed={r.data.params['seed']}" in args and "seed=1,2" not in " ".join(args)  # this job's value
        rebuilt = OmegaConf.to_yaml(compose_config("train", args), resolve=True)
        recorded = tracking.download(client, r.info.run_id, "config.yaml", tmp_path / r.info.run_id).read_text()
        assert rebuilt == recorded


def test_experiment_applies_to_every_entry_point():
    from tests.conftest import compose_config

    for name in ("train", "ensemble", "predict", "check"):
        cfg = compose_config(name, ["experiment=dsb2018"])
        if name != "check":
            assert cfg.mlflow.experiment_name == "dsb2018", name  # members are looked up where they were trained
        assert cfg.data.root.endswith("dsb2018_nuclei"), name
    # From the command line too (the pre-checks and Hydra agree), shown by --cfg job.
    for module in ("segx.ensemble", "segx.predict"):
        result = run([module, "experiment=dsb2018", "--cfg", "job"])
        assert result.returncode == 0, result.stderr
        assert "experiment_name: dsb2018" in result.stdout


# Slow (about a minute idle, 155 s under load in CI): the optional hparams extra's sweeper; the
# fast suite keeps `make test` under CI's 30 minutes with the multi-class tests added.
@pytest.mark.slow
def test_debug_run_and_an_optuna_search_on_a_tiny_problem(tmp_path, synthetic_root):
    from segx import tracking

    base = [o for o in tiny_train_overrides(tmp_path, synthetic_root) if not o.startswith("trainer.verbose")]
    debug = run(["segx.train", "debug=default", *base, "data.limit_cases=3"], timeout=600)
    assert debug.returncode == 0, debug.stderr[-2000:]
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    (member,) = tracking.find_runs(client, client.get_experiment_by_name("debug").experiment_id, "member")
    assert member.data.params["data.n_train"] == "3" and member.data.params["trainer.epochs"] == "1"
    search = run(
        [
            "segx.train",
            "-m",
            "hparams_search=dice_optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            *base,
            "mlflow.experiment_name=search",
        ],
        timeout=900,
    )
    assert search.returncode == 0, search.stderr[-2000:]
    runs = tracking.find_runs(client, client.get_experiment_by_name("search").experiment_id, "member")
    assert len(runs) == 2
    (results,) = (tmp_path / "multirun").glob("*/optimization_results.yaml")
    text = results.read_text()
    best = max(r.data.metrics["curves/best_val_dice"] for r in runs)
    assert "best_value" in text and f"{best:.6f}"[:6] in text  # Optuna maximised what the runs logged
