"""Hydra's own flags behave as Hydra documents them, and each job leaves its log."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, tiny_train_overrides


def run(args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def test_info_prints_each_line_once():
    result = run(["segx.train", "--info"])
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert text.count("Hydra 1.") == 1 and text.count("Installed Hydra Plugins") == 1


def test_a_job_writes_its_log_in_its_hydra_folder(tmp_path, synthetic_root):
    result = run(["segx.train", *tiny_train_overrides(tmp_path, synthetic_root), "trainer.epochs=1"], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (log,) = (tmp_path / "hydra").glob("*-train/train.log")
    text = log.read_text()
    assert "segx: member run" in text and "best val/dice" in text  # what the console showed
    bad = run(["segx.train", *tiny_train_overrides(tmp_path, synthetic_root), "trainer.epochs=0"])
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


def test_a_users_own_config_folder_is_searched_by_the_prechecks_too(tmp_path, synthetic_root):
    own = tmp_path / "myconf" / "backbone"
    own.mkdir(parents=True)
    (own / "myres.yaml").write_text("name: resnet18\nencoder_weights: null\nencoder_freeze: false\n")
    overrides = [*tiny_train_overrides(tmp_path / "out", synthetic_root), "backbone=myres"]
    result = run(["segx.train", "--config-dir", str(tmp_path / "myconf"), *overrides], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resnet18-unet" in result.stdout
    same = run(["segx.train", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", *overrides, "trainer.epochs=0"])
    assert "unknown backbone" not in same.stderr and "trainer.epochs=0 is out of range" in same.stderr
    typo = run(["segx.train", "--config-dir", str(tmp_path / "myconf"), *overrides[:-1], "backbone=myress"])
    assert typo.returncode == 2 and "unknown backbone 'myress'; did you mean 'myres'?" in typo.stderr


def test_each_command_help_lists_its_own_groups():
    helps = {name: run([module, "--help"]) for name, module in
             [("train", "segx.train"), ("ensemble", "segx.ensemble"), ("predict", "segx.predict"), ("bench", "segx.bench")]}
    for result in helps.values():
        assert result.returncode == 0, result.stderr
    assert "backbone: " in helps["train"].stdout and "resnet34" in helps["train"].stdout
    assert "profile:" not in helps["train"].stdout  # a bench group, which train refuses
    for name in ("ensemble", "predict"):
        groups = helps[name].stdout.split("== Groups")[1].split("== Config")[0]
        assert groups.split("\n")[1:-2] == ["mlflow: local"], groups  # not the training groups
        assert f"segx.{name}:" in helps[name].stdout
    assert "profile: full | quick" in helps["bench"].stdout
