"""The shared tracking server (``segx.server``): PostgreSQL store, proxied artifacts, members in
separate processes with no shared output folder, the ensemble and predictions rebuilt through
the server alone, and a server that goes away (and comes back) while a member trains. Real
PostgreSQL (the pgserver wheel's), a real ``mlflow server``, real subprocesses."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest

from segx import tracking
from segx.errors import SegxError
from segx.tracking import server
from segx.tracking.server import ServerSettings
from tests.conftest import ROOT, tiny_train_overrides


@pytest.fixture
def server_folder():
    """The server's folder, outside pytest's temp root: PostgreSQL runs as nobody when the tests
    run as root, and pytest keeps its root private (0700) by resetting it."""
    parent = Path(tempfile.mkdtemp(prefix="segx-server-"))
    yield parent / "server"
    shutil.rmtree(parent, ignore_errors=True)


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", **extra)


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
    )


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _member_args(out: Path, data_root: Path, uri: str, backbone: str, epochs: int = 1) -> list[str]:
    """The tests' tiny member, logging to ``uri``, with its own ``paths.output_dir``."""
    tiny = [
        o for o in tiny_train_overrides(out, data_root, backbone, epochs) if not o.startswith("mlflow.tracking_uri=")
    ]
    return ["segx.train", *tiny, f"mlflow.tracking_uri={uri}", "trainer.threads=1"]


def _server_processes(folder: Path) -> list[psutil.Process]:
    """PostgreSQL and MLflow processes of the server in ``folder``, with all their children."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(folder) in part for part in proc.info["cmdline"] or []):
            found.append(proc)
            found += proc.children(recursive=True)
    return found


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    live = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except psutil.NoSuchProcess:
            pass
    return live


def test_server_errors_are_one_line_before_anything_starts(tmp_path):
    """A port in use, a data dir of another PostgreSQL version, missing binaries."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("segx.server", f"paths.output_dir={tmp_path / 'a'}", f"port={port}", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"segx: error: port {port} on 127.0.0.1 is in use (Address already in use); stop what listens there "
        "or choose another port=..."
    ]
    old = tmp_path / "b" / "server" / "postgres"
    old.mkdir(parents=True)
    (old / "PG_VERSION").write_text("15\n")
    result = _run("segx.server", f"paths.output_dir={tmp_path / 'b'}", f"port={server.free_port()}", timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"segx: error: the PostgreSQL data in {old} was created by PostgreSQL 15, these binaries are 16;"
    )
    result = _run("segx.server", f"paths.output_dir={tmp_path / 'c'}", "postgres_bin=/nowhere/bin", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "segx: error: PostgreSQL's initdb is not in /nowhere/bin; point postgres_bin at a folder with initdb "
        "and postgres (Debian: /usr/lib/postgresql/<N>/bin)"
    ]
    assert not _alive(_server_processes(tmp_path))


def test_server_command_serves_and_stops_everything_on_sigterm(server_folder):
    """python -m segx.server: PostgreSQL and MLflow up, the URI printed; SIGTERM stops MLflow,
    then PostgreSQL, and leaves nothing running."""
    import signal
    import urllib.request

    port = server.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "segx.server", f"folder={server_folder}", f"port={port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        lines = []
        while not any("mlflow.tracking_uri=" in line for line in lines):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
            lines.append(line)
        assert f"  clients:   mlflow.tracking_uri=http://127.0.0.1:{port}\n" in lines
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            assert answer.status == 200
        processes = _server_processes(server_folder)
        assert {"postgres", "python"} <= {p.name().split()[0] for p in processes}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed while the server ran: stop it the same way
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert f"segx: stopped MLflow, then PostgreSQL; runs and artifacts stay in {server_folder}" in out
    assert err.strip().splitlines()[-1] == "segx: interrupted by SIGTERM"
    assert not _alive(processes)
    assert "database system is shut down" in (server_folder / "postgres.log").read_text()  # a clean shutdown


def _start_server(folder: Path, port: int) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "segx.server", f"folder={folder}", f"port={port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    lines = []
    while not any("mlflow.tracking_uri=" in line for line in lines):
        line = proc.stdout.readline()
        if not line:
            proc.wait(30)
            raise AssertionError(proc.stderr.read()[-3000:])
        lines.append(line)
    return proc, lines


def test_a_server_killed_outright_is_cleaned_up_by_the_next_start(server_folder):
    """kill -9 of segx.server cannot stop its PostgreSQL and MLflow: the next start on the folder
    stops them (one line), starts afresh, and leaves nothing running when it stops; a second
    server on a folder whose owner still runs is refused in one line."""
    import signal

    port = server.free_port()
    first, _ = _start_server(server_folder, port)
    try:
        left = _server_processes(server_folder)
        refused = _run("segx.server", f"folder={server_folder}", f"port={server.free_port()}", timeout=120)
        assert (
            refused.returncode == 2
            and f"another segx.server (pid {first.pid}) runs on {server_folder}" in refused.stderr
        )
        first.kill()  # SIGKILL: no cleanup of its own
        first.wait(30)
        assert _alive(left), "the children were expected to outlive a SIGKILLed parent"
        second, lines = _start_server(server_folder, port)  # the same port: the leftovers held it
        try:
            assert any("left on" in line and "by a segx.server that was killed" in line for line in lines), lines
            assert not _alive(left)
        finally:
            second.send_signal(signal.SIGTERM)
            second.communicate(timeout=120)
        assert not _alive(_server_processes(server_folder))
    finally:
        if first.poll() is None:
            first.kill()
        for proc in _alive(_server_processes(server_folder)):
            proc.kill()


def test_epoch_log_keeps_metrics_in_order_and_fails_fast_when_the_server_is_away(tmp_path, monkeypatch):
    """Nothing listens: each epoch's send fails at once even with MLflow's retries turned up,
    and the metrics wait (in memory and in the spool file) in order with their own steps."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{server.free_port()}")
    spool = tmp_path / "ckpt" / "unsent-metrics.json"
    log = tracking.EpochLog(client, "0" * 32, spool)
    started = time.monotonic()
    assert log.log({"val/dice": 0.1, "train/loss": 1.0}, 1) is False
    assert log.log({"val/dice": 0.2, "train/loss": 0.5}, 2) is False
    assert time.monotonic() - started < 5  # seven retries with backoff 2 would take minutes
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"  # the user's setting is back
    assert [(k, v, s) for k, v, _, s in log.pending] == [
        ("val/dice", 0.1, 1),
        ("train/loss", 1.0, 1),
        ("val/dice", 0.2, 2),
        ("train/loss", 0.5, 2),
    ]
    assert tracking.EpochLog(client, "0" * 32, spool).pending == log.pending  # a resumed run sends them
    with pytest.raises(SegxError, match=r"has not taken run 0+'s last 4 metrics for 1 s .*; resume it"):
        log.flush(1.0, "resume it")


@pytest.mark.slow
def test_members_in_separate_processes_log_to_the_server_and_the_ensemble_rebuilds_from_it(
    tmp_path, synthetic_root, server_folder
):
    import mlflow

    folder = server_folder
    with server.tracking_server(folder, ServerSettings(port=server.free_port(), timeout=300)) as uri:
        processes = _server_processes(folder)
        assert {"postgres", "python"} <= {p.name().split()[0] for p in processes}
        # Two members at once, each with its own output folder: no filesystem in common.
        jobs = {
            b: _spawn(*_member_args(tmp_path / f"client-{b}", synthetic_root, uri, b))
            for b in ("resnet18", "mobilenetv2")
        }
        for backbone, job in jobs.items():
            out = job.communicate(timeout=1200)[0]
            assert job.returncode == 0, f"{backbone}:\n{out[-4000:]}"
        result = _run(
            "segx.ensemble",
            f"paths.output_dir={tmp_path / 'client-ensemble'}",
            f"mlflow.tracking_uri={uri}",
            "ensemble.members=[resnet18,mobilenetv2]",
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        client = tracking.connect(uri, create=False)
        experiment = client.get_experiment_by_name("segx")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's, not a client folder
        members = tracking.find_runs(client, experiment.experiment_id, "member", status=None)
        (ensemble,) = tracking.find_runs(client, experiment.experiment_id, "ensemble", status=None)
        assert sorted(r.data.tags["segx.backbone"] for r in members) == ["mobilenetv2", "resnet18"]
        for run in [*members, ensemble]:
            assert run.info.status == "FINISHED"
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        # The artifacts live in the server's folder; the clients kept none (no weights anywhere).
        for run in members:
            stored = folder / "artifacts" / experiment.experiment_id / run.info.run_id / "artifacts"
            assert (stored / "model" / "weights.h5").is_file() and (stored / "predictions" / "val.npz").is_file()
        assert not [p for p in tmp_path.glob("client-*/**/*.h5")]

        inputs = tmp_path / "inputs"
        inputs.mkdir()
        image = cv2.imread(str(synthetic_root / "train_images" / "case_0000.png"))
        cv2.imwrite(str(inputs / "scan.png"), cv2.resize(image, (96, 80)))
        result = _run(
            "segx.predict",
            f"paths.output_dir={tmp_path / 'client-predict'}",
            f"mlflow.tracking_uri={uri}",
            f"ensemble_run_id={ensemble.info.run_id}",
            f"input_dir={inputs}",
            f"output_dir={tmp_path / 'masks'}",
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        mask = cv2.imread(str(tmp_path / "masks" / "masks" / "scan.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (80, 96) and set(np.unique(mask)) <= {0, 255}
        # The pyfunc model, loaded through the server alone, gives the same mask.
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model(ensemble.data.tags["segx.pyfunc_uri"])
        (masks,) = model.predict([cv2.cvtColor(cv2.resize(image, (96, 80)), cv2.COLOR_BGR2RGB)])
        assert np.array_equal(np.asarray(masks).astype(bool), mask > 0)
    assert processes and not _alive(processes)  # MLflow and PostgreSQL stopped, nothing left over


def _wait_for_first_epoch(client, job: subprocess.Popen, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, job.communicate()[0][-4000:]
        experiment = client.get_experiment_by_name("segx")
        runs = tracking.find_runs(client, experiment.experiment_id, "member", status=None) if experiment else []
        if runs and client.get_metric_history(runs[0].info.run_id, "curves/val_dice"):
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError("the member logged no epoch in time")


@pytest.mark.slow
def test_member_keeps_training_while_the_server_restarts_and_loses_no_epoch(tmp_path, server_folder):
    folder, port, pg_port = server_folder, server.free_port(), server.free_port()
    epochs = 8
    with server.tracking_server(folder, ServerSettings(port=port, postgres_port=pg_port, timeout=300)) as uri:
        # Epochs of 16 training images, so that the outage falls during training, not after it.
        args = [
            o
            for o in _member_args(tmp_path / "client", tmp_path / "data", uri, "resnet18", epochs)
            if not o.startswith("data.n_images=")
        ]
        job = _spawn(*args, "data.n_images=32", "trainer.early_stopping.patience=0", "mlflow.offline_wait=600")
        run_id = _wait_for_first_epoch(tracking.connect(uri), job)
        processes = _server_processes(folder)
    assert not _alive(processes)  # MLflow and PostgreSQL are both down now
    assert job.poll() is None  # ... and the member trains on
    with server.tracking_server(folder, ServerSettings(port=port, postgres_port=pg_port, timeout=300)) as uri:
        out = job.communicate(timeout=1200)[0]
        assert job.returncode == 0, out[-4000:]
        assert f"did not take run {run_id}'s metrics" in out, "the outage fell after training: use longer epochs"
        client = tracking.connect(uri, create=False)
        assert client.get_run(run_id).info.status == "FINISHED"
        history = sorted(client.get_metric_history(run_id, "curves/val_dice"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, epochs + 1))  # every epoch, at its own step
        assert [m.step for m in client.get_metric_history(run_id, "curves/train_loss")] == list(range(1, epochs + 1))
    assert not (tmp_path / "client" / "checkpoints" / run_id).exists()  # finished: checkpoint removed


@pytest.mark.slow
def test_server_away_after_training_fails_in_one_line_keeping_the_checkpoint_and_resume_finishes(
    tmp_path, server_folder
):
    folder, port, pg_port = server_folder, server.free_port(), server.free_port()
    epochs = 4
    with server.tracking_server(folder, ServerSettings(port=port, postgres_port=pg_port, timeout=300)) as uri:
        args = [
            o
            for o in _member_args(tmp_path / "client", tmp_path / "data", uri, "resnet18", epochs)
            if not o.startswith("data.n_images=")
        ]
        job = _spawn(*args, "data.n_images=32", "trainer.early_stopping.patience=0", "mlflow.offline_wait=1")
        run_id = _wait_for_first_epoch(tracking.connect(uri), job)
    out = job.communicate(timeout=1200)[0]  # the server stays away
    assert job.returncode == 2, out[-4000:]
    error = out.strip().splitlines()[-1]
    checkpoint = tmp_path / "client" / "checkpoints" / run_id
    assert error.startswith(f"segx: error: MLflow at {uri} has not taken run {run_id}'s last ")
    assert (
        f"; the checkpoint is kept in {checkpoint}; once the server answers, continue with: python -m segx.train "
        in error
    )
    assert (checkpoint / "state.json").is_file() and (checkpoint / "unsent-metrics.json").is_file()
    command = shlex.split(error.split("continue with: ", 1)[1])
    assert command[:3] == ["python", "-m", "segx.train"] and command[-1] == f"resume={run_id}"
    with server.tracking_server(folder, ServerSettings(port=port, postgres_port=pg_port, timeout=300)) as uri:
        result = _run(*command[2:])  # exactly the command printed
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        client = tracking.connect(uri, create=False)
        assert client.get_run(run_id).info.status == "FINISHED"
        history = sorted(client.get_metric_history(run_id, "curves/val_dice"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, epochs + 1))  # the kept epochs were sent on resume
    assert not checkpoint.exists()
