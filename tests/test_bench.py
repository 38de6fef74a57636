"""The benchmark script runs end to end on a handful of real images, so it cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segx.errors import SegxError
from tests.conftest import ROOT, compose_config

DATASET = ROOT.parent / "shared" / "datasets" / "dsb2018_nuclei"


# Slow (trains a member and times every stage): `make test-slow` runs it, as the Makefile says.
@pytest.mark.slow
@pytest.mark.skipif(not DATASET.is_dir(), reason="the shared DSB2018 dataset is not beside the project")
def test_bench_quick_runs_every_stage(tmp_path):
    from segx.bench import run_study

    results = tmp_path / "results"
    cfg = compose_config(
        "bench",
        [
            "profile=quick",
            f"dataset={DATASET}",
            f"paths.output_dir={tmp_path}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"profile.results_dir={results}",
            "profile.members=[mobilenetv2]",
            "profile.max_cases=14",
            "profile.epochs=1",
            "profile.throughput_steps=2",
            "profile.inference_images=6",
            "profile.inference_timing_images=4",
        ],
    )
    report = run_study(cfg)
    text = report.read_text()
    for heading in (
        "## 1. Accuracy",
        "## 2. Training throughput",
        "## 3. Compute efficiency",
        "## 4. Ensemble inference",
        "## 5. Ensemble search",
    ):
        assert heading in text
    inference = json.loads((results / "inference.json").read_text())
    assert inference["folder_images"] == 6
    assert (results / "test_per_case.csv").exists()


def test_bench_refuses_a_missing_dataset(tmp_path):
    from segx.bench import run_study

    cfg = compose_config(
        "bench",
        [
            "profile=quick",
            f"dataset={tmp_path}/nope",
            f"paths.output_dir={tmp_path}",
            f"profile.results_dir={tmp_path}/r",
        ],
    )
    with pytest.raises(SegxError, match="benchmark dataset .*nope does not exist"):
        run_study(cfg)
    assert not Path(tmp_path / "r" / "RESULTS.md").exists()
