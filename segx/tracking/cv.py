"""Cross-validation in MLflow: the K fold runs of one configuration are children of one parent
run (``mlflow.parentRunId``, so the UI nests them), and the parent carries the cross-validation
summary, brought up to date each time a fold finishes. No TensorFlow.

The parent is found by the configuration's hash without the fold (``segx.cv_config_hash``) and
the fold layout's fingerprint (``segx.cv_fingerprint``); it is created under a file lock, so
folds started in parallel on one machine share one parent, and folds on machines that share only
the tracking server agree on the oldest parent (a duplicate is deleted by its creator). It is never left RUNNING: it is
FINISHED with ``segx.cv_complete=false`` and ``segx.cv_missing`` naming the folds still to train
until every fold has finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from segx.errors import SegxError
from segx.tracking.readers import MemberRun

ROLE_CV = "cv"
PARENT_TAG = "segx.cv_parent"
PARENT_RUN_ID = "mlflow.parentRunId"  # what the MLflow UI reads to nest runs


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class CrossValidation:
    """Which cross-validation a fold run belongs to: its configuration's hash without the fold
    (``segx.cv_config_hash``), the fold layout's fingerprint (``segx.cv_fingerprint``) and the
    number of folds."""

    config_hash: str
    fingerprint: str
    folds: int


def parent_run(client, experiment: str, cv: CrossValidation, name: str, tags: dict, lock_dir: Path) -> str:
    """The parent run of this configuration on this fold layout (created if none exists)."""
    from segx import tracking

    cv_hash, cv_fingerprint, folds = cv.config_hash, cv.fingerprint, cv.folds
    key = {"segx.cv_config_hash": cv_hash, "segx.cv_fingerprint": cv_fingerprint}
    with _locked(Path(lock_dir) / f"cv-{cv_hash}-{cv_fingerprint}.lock"):
        found = tracking.find_runs(client, experiment, ROLE_CV, status=None, tags=key)
        if found:
            return _first(found).info.run_id
        run_id = tracking.start_run(
            client, experiment, name, {**tags, tracking.ROLE: ROLE_CV, **key, "segx.folds": str(folds)}
        )
        tracking.set_tags(
            client,
            run_id,
            {
                "segx.cv_complete": "false",
                "segx.cv_missing": ",".join(map(str, range(folds))),
                "mlflow.note.content": _note(folds, list(range(folds))),
            },
        )
        client.set_terminated(run_id, "FINISHED")
        # The lock holds on one machine (or a shared folder); folds started at once on machines
        # that share only the tracking server can each create a parent. Every process then
        # takes the oldest, and a process that created a younger one deletes its own.
        winner = _first(tracking.find_runs(client, experiment, ROLE_CV, status=None, tags=key)).info.run_id
        if winner != run_id:
            client.delete_run(run_id)
        return winner


def _first(runs):
    """The parent every process agrees on: the oldest (then the smallest run ID)."""
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def _note(folds: int, missing: list[int]) -> str:
    text = f"Cross-validated configuration: {folds} folds, each a child run trained on the other folds and validated on its own."
    if missing:
        text += f" Missing folds: {', '.join(map(str, missing))} (train them with fold=...; see the children's segx.command)."
    else:
        text += (
            " All folds finished; cv/oof_dice is the Dice over every training case, each predicted by the fold"
            " model that did not see it."
        )
    return text


def fold_runs(client, experiment: str, parent_id: str, folds: int) -> dict[int, object]:
    """The newest FINISHED child run of each fold that has one."""
    from segx import tracking

    out: dict[int, object] = {}
    for run in tracking.find_runs(client, experiment, "member", status="FINISHED", tags={PARENT_TAG: parent_id}):
        fold = MemberRun.of(run).fold
        fold = -1 if fold is None else fold
        if 0 <= fold < folds and fold not in out:
            out[fold] = run
    return out


def update_summary(client, experiment: str, parent_id: str) -> dict:
    """Per-fold and mean validation Dice, out-of-fold Dice (every training case, from the model
    that did not see it: the case-weighted mean of the folds' per-case Dice at each image's own
    size), and which folds are missing, logged on the parent. Returns what was logged."""
    from segx import tracking

    parent = client.get_run(parent_id)
    folds = MemberRun.of(parent).folds
    runs = fold_runs(client, experiment, parent_id, folds)
    missing = [f for f in range(folds) if f not in runs]
    metrics, cases, weighted = {}, 0, 0.0
    for fold, run in sorted(runs.items()):
        dice = run.data.metrics.get("val/dice")
        n_val = int(run.data.params.get("data.n_val", 0))
        if dice is None:
            continue
        metrics[f"cv/fold{fold}/val_dice"] = dice
        cases += n_val
        weighted += dice * n_val
    if runs:
        values = [v for k, v in metrics.items() if k.startswith("cv/fold")]
        metrics["cv/mean_val_dice"] = sum(values) / len(values)
        metrics["cv/finished_folds"] = float(len(runs))
    if not missing and cases:
        metrics["cv/oof_dice"] = weighted / cases
    tracking.log_metrics(client, parent_id, metrics)
    tracking.set_tags(
        client,
        parent_id,
        {
            "segx.cv_complete": "false" if missing else "true",
            "segx.cv_missing": ",".join(map(str, missing)),
            "segx.cv_fold_runs": ",".join(f"{f}:{r.info.run_id}" for f, r in sorted(runs.items())),
            "mlflow.note.content": _note(folds, missing),
        },
    )
    return {"metrics": metrics, "missing": missing, "runs": {f: r.info.run_id for f, r in runs.items()}}


def rerun_command(command: str, missing: list[int]) -> str:
    """A fold run's command line with ``fold=`` set to the missing folds (a multirun for several)."""
    folds = ",".join(map(str, missing))
    if re.search(r"(^|\s)fold=\S+", command):
        command = re.sub(r"(^|\s)fold=\S+", rf"\g<1>fold={folds}", command)
    else:
        command = f"{command} fold={folds}"
    if len(missing) > 1 and " -m" not in command and " --multirun" not in command:
        command = command.replace("segx.train", "segx.train -m", 1)
    return command


def missing_folds_error(parent, missing: list[int], command: str) -> SegxError:
    return SegxError(
        f"cross-validated member {parent.info.run_id} ({parent.info.run_name}) is missing fold(s) "
        f"{', '.join(map(str, missing))} (not run, or not FINISHED); train them: {rerun_command(command, missing)} "
        "(or set ensemble.allow_incomplete_cv=true to use the finished folds only)"
    )
