"""Hydra's own flags behave as Hydra documents them, and each job leaves its log."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, tiny_train_overrides


def run(args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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
