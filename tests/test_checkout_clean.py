"""The session check that keeps the tests out of the checkout (tests/conftest.py), and the
setting that makes it hold: segx's default output folder follows SEGX_OUTPUT_DIR."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, checkout_files, compose_config


def test_the_checkout_check_sees_a_new_file_and_not_the_caches(tmp_path):
    (tmp_path / "segx").mkdir()
    (tmp_path / "segx" / "a.py").write_text("")
    before = checkout_files(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.pyc").write_text("")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "x").write_text("")
    assert checkout_files(tmp_path) == before
    (tmp_path / "outputs" / "hydra").mkdir(parents=True)
    (tmp_path / "outputs" / "hydra" / "check.log").write_text("")
    (tmp_path / "mlruns" / "3").mkdir(parents=True)
    (tmp_path / "mlruns" / "3" / "meta.yaml").write_text("")
    assert checkout_files(tmp_path) - before == {
        os.path.join("outputs", "hydra", "check.log"),
        os.path.join("mlruns", "3", "meta.yaml"),
    }


def test_the_output_folder_follows_segx_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGX_OUTPUT_DIR", str(tmp_path / "elsewhere"))
    cfg = compose_config("train", [])
    assert cfg.paths.output_dir == str(tmp_path / "elsewhere")
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'elsewhere'}/mlflow.db"
    monkeypatch.delenv("SEGX_OUTPUT_DIR")
    assert compose_config("train", []).paths.output_dir == "outputs"  # the default: under the working folder


def test_a_test_session_that_writes_into_the_checkout_fails(tmp_path):
    # A throwaway test file inside the checkout's tests/ folder that writes one file into the
    # checkout: the session check must turn an otherwise green run red and name the file.
    stray = ROOT / "tests" / f"test_zz_stray_{os.getpid()}.py"
    target = ROOT / f"stray-{os.getpid()}.txt"
    stray.write_text(f"def test_writes():\n    open({str(target)!r}, 'w').write('x')\n")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", str(stray)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        stray.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
    assert "1 passed" in done.stdout, done.stdout[-2000:]
    assert done.returncode == 1, done.stdout[-2000:]
    assert "the tests wrote 1 file(s) into the checkout" in done.stdout and target.name in done.stdout
