"""The reproduce command ``segx.info`` prints rebuilds the run: for a member trained by a sweep,
by hand and by ``segx.ensemble ensemble.train_missing=true``, ``--cfg job`` of the printed
command is the config the run recorded; for an ensemble, the printed command searches the
same member runs again and chooses the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import store_overrides, tiny_train_overrides
from tests.helpers import assert_reproduces_config, info, printed_command
from tests.helpers import run_module as run


def member_runs(out: Path) -> dict[str, str]:
    from segx import tracking

    client = tracking.connect(f"sqlite:///{out}/mlflow.db", create=False)
    exp = client.get_experiment_by_name("segx").experiment_id
    return {r.data.tags["segx.backbone"]: r.info.run_id for r in tracking.find_runs(client, exp, "member")}


# Slow: a sweep, an ensemble training its missing member and seven commands; the reproduce commands of
# a sweep's job (test_hydra_flags), a member trained by hand (test_console_scripts) and an ensemble
# (below) stay fast.
@pytest.mark.slow
def test_reproduce_members_of_a_sweep_and_of_an_ensemble_and_the_ensemble(tmp_path, synthetic_root):
    from segx import tracking

    out = tmp_path / "out"
    tiny = [o for o in tiny_train_overrides(out, synthetic_root) if not o.startswith("backbone=")]
    swept = run(["segx.train", "-m", *tiny, "backbone=resnet18", "seed=7", "mlflow.system_metrics=false"])
    assert swept.returncode == 0, swept.stderr[-3000:]
    # The ensemble trains the member it lacks (mobilenetv2) with its own train_overrides.
    given = [o for o in tiny if not o.startswith(("paths.", "mlflow."))] + ["seed=7"]
    train_overrides = "[" + ",".join(f"'{o}'" for o in given) + "]"
    built = run(
        [
            "segx.ensemble",
            *store_overrides(out),
            "ensemble.members=[resnet18,mobilenetv2]",
            "ensemble.train_missing=true",
            f"ensemble.train_overrides={train_overrides}",
            "ensemble.bootstrap=200",
        ]
    )
    assert built.returncode == 0, built.stderr[-3000:]
    # Where it is, in a log (no terminal): one line per stage, no bar redrawn.
    log = built.stdout
    for line in (
        "segx: member 1/1 (mobilenetv2-unet)",
        "epoch 1/1: train loss",
        "elapsed, ~0:00:00 left",
        "segx: training done: saving the model",
        "validation cases at their own size",
        "segx: searching weights and threshold on validation",
    ):
        assert line in log, line
    assert "\r" not in log + built.stderr
    runs = member_runs(out)
    assert set(runs) == {"resnet18", "mobilenetv2"}

    sweep_command = assert_reproduces_config(runs["resnet18"], out)
    assert "backbone=resnet18" in sweep_command and "-m" not in sweep_command
    ensemble_trained = assert_reproduces_config(runs["mobilenetv2"], out)
    assert "backbone=mobilenetv2" in ensemble_trained
    assert not any(o.startswith("ensemble.") for o in ensemble_trained), ensemble_trained

    client = tracking.connect(f"sqlite:///{out}/mlflow.db", create=False)
    exp = client.get_experiment_by_name("segx").experiment_id
    (first,) = tracking.find_runs(client, exp, "ensemble")
    assert_info_names_them_and_its_command_chooses_the_same(client, exp, first, runs, out)


def test_the_ensembles_reproduce_command_searches_the_same_members_and_chooses_the_same(member_store_copy):
    """segx.ensemble on the session's two members (a private copy of their store): segx.info
    names every member with its weight and scores, and the segx.ensemble command it prints, run
    again, searches the same member runs and chooses the same weights, threshold and test Dice."""
    from segx import tracking

    out, runs = member_store_copy
    client = tracking.connect(f"sqlite:///{out}/mlflow.db", create=False)
    exp = client.get_experiment_by_name("segx").experiment_id
    earlier = {r.info.run_id for r in tracking.find_runs(client, exp, "ensemble")}  # the session's own
    built = run(
        ["segx.ensemble", *store_overrides(out), "ensemble.members=[resnet18,mobilenetv2]", "ensemble.bootstrap=200"]
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (first,) = [r for r in tracking.find_runs(client, exp, "ensemble") if r.info.run_id not in earlier]
    assert_info_names_them_and_its_command_chooses_the_same(client, exp, first, runs, out, earlier)


def test_info_help_is_not_an_error():
    result = run(["segx.info", "--help"])
    assert result.returncode == 0 and "run_id=<id>" in result.stdout and not result.stderr


def assert_info_names_them_and_its_command_chooses_the_same(client, exp, first, runs, out, earlier=()):
    """segx.info on the ensemble run ``first`` names every member (``runs``: backbone -> run ID)
    with its weight and scores, and the segx.ensemble command it prints, run again, searches the
    same member runs and chooses the same (``earlier``: ensemble runs that were there before)."""
    from segx import tracking

    text = info(first.info.run_id, out)
    for backbone, run_id in runs.items():  # every member by name and run, with its weight and scores
        (row,) = [ln for ln in text.splitlines() if f"{backbone}-unet" in ln and run_id in ln]
        assert "weight" in row and "val 0." in row and "test 0." in row, row
    assert "ensemble minus best member" in text and "95% CI" in text
    assert f"threshold {first.data.params['chosen.threshold']}" in text
    again = printed_command(text, "segx.ensemble")
    assert f"ensemble.run_ids=[{first.data.tags['segx.members']}]" in again
    assert not any(o.startswith(("ensemble.members=", "ensemble.train_missing=")) for o in again)
    rebuilt = run(again)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    (second,) = [
        r for r in tracking.find_runs(client, exp, "ensemble") if r.info.run_id not in {*earlier, first.info.run_id}
    ]
    chosen = {k: v for k, v in first.data.params.items() if k.startswith("chosen.")}
    assert chosen and chosen == {k: v for k, v in second.data.params.items() if k.startswith("chosen.")}
    assert second.data.tags["segx.members"] == first.data.tags["segx.members"]
    assert second.data.metrics["test/dice"] == first.data.metrics["test/dice"]
    assert second.data.tags["segx.reproduce"] == first.data.tags["segx.reproduce"]
