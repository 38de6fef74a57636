"""An ensemble fetched from its MLflow run: its record and its members' model files. The one
place that does this, for prediction, export and serving alike."""

from __future__ import annotations

import json
from pathlib import Path

from segx.ensembling.record import EnsembleRecord
from segx.errors import SegxError
from segx.tracking import runs
from segx.tracking.readers import EnsembleRun
from segx.tracking.tags import ROLE


def ensemble_run(client, run_id: str):
    """The FINISHED ensemble run ``run_id`` (one line if it is none)."""
    run = runs.get_run(client, run_id)
    if not EnsembleRun.of(run).is_ensemble:
        raise SegxError(f"run '{run_id}' is not a segx ensemble (tag {ROLE}); give an ensemble run ID")
    return run


def fetch_ensemble(client, run_id: str, workdir: Path) -> tuple[EnsembleRecord, list]:
    """(record, model paths) of an ensemble run, every member with a non-zero weight downloaded
    (a cross-validated member: a list of fold model folders); None for weight-0 members.
    Each missing piece is one line naming the run and what to do."""
    ensemble_run(client, run_id)
    try:
        path = runs.download(client, run_id, "ensemble.json", workdir)
    except SegxError:
        raise SegxError(
            f"ensemble run '{run_id}' has no ensemble.json record (it ended before logging it); "
            "rebuild the ensemble with python -m segx.ensemble"
        ) from None
    try:
        written = json.loads(Path(path).read_text())
    except ValueError:
        raise SegxError(f"run '{run_id}': ensemble.json is not valid JSON; rebuild the ensemble") from None
    record = EnsembleRecord.from_json(written, f"run {run_id} ensemble.json")
    paths: list = []
    for i, (member, count) in enumerate(zip(record.members, record.weights.counts, strict=True)):
        if count == 0:
            paths.append(None)
            continue
        artifact = member.model_artifact
        member_runs = member.runs
        folders = []
        for k, member_run in enumerate(member_runs):
            try:
                runs.get_run(client, member_run)
            except SegxError as exc:
                raise SegxError(
                    f"ensemble '{run_id}' needs member run {member_run} (members[{i}]), but: {exc}; "
                    "restore that run or rebuild the ensemble without it"
                ) from None
            dst = workdir / f"m{i}" / (f"fold{k}" if member.folds else "")
            try:
                folders.append(runs.download_member_model(client, member_run, dst, artifact))
            except SegxError:
                raise SegxError(
                    f"ensemble '{run_id}': member run {member_run} has no model files "
                    f"({artifact}/spec.json, {artifact}/weights.h5); retrain it or rebuild the "
                    "ensemble without it"
                ) from None
        paths.append(folders if member.folds else folders[0])
    return record, paths
