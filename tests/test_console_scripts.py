"""The console scripts as a user starts them: installed in the venv's bin/, from another folder,
through bash completion, and from a non-editable install of a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def _script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: reinstall segx (make install) so that pip writes its console scripts")
    return str(path)


def _run(args, cwd, timeout=120, env=None):
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_console_script_answers_help_from_another_folder(name, tmp_path):
    result = _run([_script(name), "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "segx" in result.stdout.lower()
    assert not any(tmp_path.iterdir()), "--help wrote into the folder it was started from"


def test_the_installed_train_script_trains_a_member_from_another_folder(tmp_path, synthetic_root, monkeypatch):
    # The defaults a user gets: outputs/ under the folder the command starts in (the session's
    # SEGX_OUTPUT_DIR, which keeps other tests out of the checkout, is not set here).
    monkeypatch.delenv("SEGX_OUTPUT_DIR")
    overrides = [
        f"data.root={synthetic_root}",
        "data.n_images=16",
        "data.source_size=64",
        "data.image_size=64",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "trainer.epochs=1",
        "trainer.batch_size=4",
        "trainer.verbose=0",
        "backbone=resnet18",
        "mlflow.system_metrics=false",
    ]
    result = _run([_script("segx-train"), *overrides], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "segx: member run" in result.stdout
    # In a log (not a terminal) each epoch is one line, segx's: Keras's own summary line is off.
    assert "resnet18-unet-s42 epoch 1/1: train loss" in result.stdout
    assert "/epoch" not in result.stdout and "/step" not in result.stdout, result.stdout[-2000:]
    from segx import tracking

    client = tracking.connect(f"sqlite:///{tmp_path}/outputs/mlflow.db", create=False)
    exp = client.get_experiment_by_name("segx").experiment_id
    (run,) = tracking.find_runs(client, exp, "member")
    assert run.info.status == "FINISHED" and run.data.tags["segx.backbone"] == "resnet18"
    # Trained by hand: segx.info's reproduce command, started where the user trained, is this config.
    from tests.helpers import assert_reproduces_config

    command = assert_reproduces_config(run.info.run_id, tmp_path / "outputs", cwd=tmp_path)
    assert command[1:] == overrides


def test_bash_completion_through_the_installed_script(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    # What a user does: put the venv on PATH, install Hydra's completion, press TAB after
    # `segx-train backbone=res`. bash runs the completion function, which calls the script.
    line = "segx-train backbone=res"
    script = f"""
set -e
eval "$(segx-train -sc install=bash)"
COMP_LINE='{line}'; COMP_POINT={len(line)}; COMP_WORDS=({line}); COMP_CWORD=1
hydra_bash_completion
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = _run(["bash", "-c", script], cwd=tmp_path, env={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr[-2000:]
    offered = result.stdout.split()
    assert "backbone=resnet34" in offered and "backbone=resnet18" in offered, result.stdout
    assert all(o.startswith("backbone=res") for o in offered), offered


def test_a_non_editable_install_finds_its_configs(tmp_path):
    """``pip install .`` (not -e): the wheel holds every package and every config, and the
    commands compose their configs from it, from a folder far from the repository."""
    wheels = tmp_path / "wheels"
    # Built from a copy of the project's files: setuptools builds in the source folder (build/,
    # *.egg-info), which would be the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "segx", source / "segx", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", source / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("segx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() + "/__init__.py" for p in (ROOT / "segx").rglob("__init__.py")}
    assert packages <= names, f"packages missing from the wheel (pyproject's packages list): {packages - names}"
    configs = {"segx/conf/" + p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs <= names, f"configs missing from the wheel: {configs - names}"

    target = tmp_path / "site"
    install = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        cwd=tmp_path,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target)}  # before the editable install on sys.path: this copy is imported
    where = _run(
        [sys.executable, "-c", "import segx.config as c; print(c.__file__); print(c.CONF_DIR)"], cwd=elsewhere, env=env
    )
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(target)) for line in where.stdout.split()), where.stdout
    cfg = _run([str(target / "bin" / "segx-train"), "backbone=resnet50", "--cfg", "job"], cwd=elsewhere, env=env)
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    assert "name: resnet50" in cfg.stdout
    typo = _run([str(target / "bin" / "segx-train"), "backbone=resnet43"], cwd=elsewhere, env=env)
    assert typo.returncode == 2 and "did you mean 'resnet34'?" in typo.stderr
