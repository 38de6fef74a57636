"""segx.tracking's parts on a real SQLite MLflow store: what importing it changes (nothing), what
connecting sets, the typed readers of member and ensemble runs, the one ensemble fetch, and the
hook that ends a run a command leaves before its scope begins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from segx import signals, tracking
from segx.errors import SegxError
from segx.tracking import tags
from segx.tracking.ensembles import ensemble_run, fetch_ensemble
from segx.tracking.readers import EnsembleRun, MemberRun

MLFLOW_DEFAULTS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_SQLALCHEMYSTORE_POOLCLASS")


def test_importing_tracking_changes_no_environment_and_connect_sets_mlflows_defaults(tmp_path):
    """A library user who imports segx.tracking keeps their environment; connect() (what every
    command does first) sets the defaults segx relies on, leaving a value the user set."""
    code = f"""
import json, os
before = {{k: os.environ.get(k) for k in {MLFLOW_DEFAULTS!r}}}
import segx.tracking as t
after_import = {{k: os.environ.get(k) for k in {MLFLOW_DEFAULTS!r}}}
t.connect("sqlite:///{tmp_path}/mlflow.db")
after_connect = {{k: os.environ.get(k) for k in {MLFLOW_DEFAULTS!r}}}
print(json.dumps([before, after_import, after_connect]))
"""
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_DEFAULTS}
    env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "7"  # the user's own value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after_import, after_connect = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_import == before
    assert after_connect == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "7",
        "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool",
    }


@pytest.fixture()
def store(tmp_path):
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    return client, tracking.experiment_id(client, "segx", str(tmp_path / "artifacts"))


def test_member_run_reads_what_the_member_workflow_writes(store):
    client, exp = store
    written = {
        tags.ROLE: "member",
        tags.BACKBONE: "resnet18",
        tags.ARCH: "unet",
        tags.CONFIG_HASH: "c0ffee",
        tags.DATA_FINGERPRINT: "d1",
        tags.FOLD: "2",
        tags.CV_PARENT: "p1",
        tags.ENSEMBLES: "e1,e2",
        tags.DISK_FULL: "true",
        tags.LOGGED_MODEL_ID: "m-1",
    }
    run_id = tracking.start_run(client, exp, "member", written)
    with tracking.run_scope(client, run_id):
        pass
    member = MemberRun.of(client.get_run(run_id))
    assert (member.run_id, member.status, member.role) == (run_id, "FINISHED", "member")
    assert (member.backbone, member.arch, member.config_hash, member.data_fingerprint) == (
        "resnet18",
        "unet",
        "c0ffee",
        "d1",
    )
    assert (member.fold, member.cv_parent, member.ensembles) == (2, "p1", ("e1", "e2"))
    assert member.disk_full and member.logged_model_id == "m-1"
    # A run of an older segx, or one that is not a fold: absent tags read as "not so".
    bare = MemberRun.of(client.get_run(tracking.start_run(client, exp, "bare", {tags.ROLE: "member"})))
    assert (bare.fold, bare.folds, bare.cv_parent, bare.ensembles, bare.disk_full) == (None, 0, "", (), False)
    tracking.end_unscoped("FINISHED")


def test_ensemble_fetch_refuses_a_member_run_and_reads_exports_by_format(store, tmp_path):
    client, exp = store
    member = tracking.start_run(client, exp, "member", {tags.ROLE: "member"})
    ensemble = tracking.start_run(client, exp, "ensemble", {tags.ROLE: "ensemble", tags.EXPORT + "onnx": "child-1"})
    tracking.end_unscoped("FINISHED")
    with pytest.raises(SegxError, match=f"run '{member}' is not a segx ensemble"):
        fetch_ensemble(client, member, tmp_path / "w")
    assert ensemble_run(client, ensemble).info.run_id == ensemble
    assert EnsembleRun.of(client.get_run(ensemble)).exports == {"onnx": "child-1"}
    with pytest.raises(SegxError, match=f"ensemble run '{ensemble}' has no ensemble.json record"):
        fetch_ensemble(client, ensemble, tmp_path / "w")


def test_a_run_created_before_its_scope_is_ended_by_the_commands_failure_hook(store):
    """start_run registers the hook segx.cli runs on a failing exit: the run ends FAILED with the
    reason, not RUNNING, and is no longer waiting for a scope."""
    client, exp = store
    run_id = tracking.start_run(client, exp, "left", {tags.ROLE: "member"})
    assert run_id in tracking._unscoped
    signals.run_failure_hooks("FAILED", "a check failed after the run was created")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tags.FAILURE] == "a check failed after the run was created"
    assert run_id not in tracking._unscoped


def test_a_run_that_ends_failed_or_is_resumed_leaves_no_logged_model_pending(store):
    """A run that fails while its logged model is being logged ends FAILED, and so does the model
    (as MLflow's own log_model does); one a process killed outright left PENDING is failed when
    its run is resumed, so it never stays PENDING beside the READY one the resumed run logs."""
    from mlflow.entities import LoggedModelStatus

    client, exp = store
    run_id = tracking.start_run(client, exp, "member", {tags.ROLE: "member"})
    with pytest.raises(KeyError, match="view"), tracking.run_scope(client, run_id):
        # The model is created, then its pyfunc is logged: a member without a view fails there.
        tracking.log_member_model(client, run_id, exp, "resnet18-unet", {}, {"backbone": "resnet18", "arch": "unet"})
    (model,) = client.search_logged_models([exp])
    assert (client.get_run(run_id).info.status, model.name, model.status) == (
        "FAILED",
        "resnet18-unet",
        LoggedModelStatus.FAILED,
    )

    killed = tracking.start_run(client, exp, "killed", {tags.ROLE: "member"})
    tracking._unscoped.pop(killed)  # SIGKILL: nothing ended the run or finalized its model
    left = client.create_logged_model(exp, name="left", source_run_id=killed)
    tracking.reopen_run(client, killed)  # resume
    assert client.get_logged_model(left.model_id).status == LoggedModelStatus.FAILED
    tracking.end_unscoped("FINISHED")
