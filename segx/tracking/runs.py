"""A run's life: created, scoped so that it always ends with its real status (FINISHED, KILLED,
FAILED; a full disk included), and what is logged to it and read back from it."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segx import signals
from segx.errors import SegxError, disk_full
from segx.tracking.store import _sqlite_path
from segx.tracking.tags import ROLE, VOLUMES

# The final status of a run is written within this many seconds, on fresh clients if need be.
_END_RUN_TIMEOUT_S = 30.0


@contextlib.contextmanager
def run_scope(client: MlflowClient, run_id: str, on_disk_full: Callable[[], None] | None = None) -> Iterator[str]:
    """End ``run_id`` FINISHED on success, KILLED on Ctrl-C/SIGTERM, FAILED on any error.

    A full disk must not leave the run RUNNING: a local store keeps a small reserve file beside
    its database while the run is open, removed (with ``on_disk_full``: the caller's partial
    files) before the final status is written when the error was a full disk; the run is then
    tagged ``segx.disk_full`` (and can be resumed once there is space).

    A signal inside the block raises (``segx.signals.Interrupted``); one that a library swallowed
    is still seen here (the signal count moved), so the run ends KILLED and the signal is
    raised again. The final status is written with signals held back, and retried on a fresh
    client if the interrupted write left the old connection holding the database lock.
    """

    mark = signals.signal_count()
    _unscoped.pop(run_id, None)  # from here this scope ends it
    status, failure = "FAILED", None
    reserve = _Reserve(_sqlite_path(client.tracking_uri))
    with signals.signals_raise():
        try:
            yield run_id
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            # Ctrl-C, SIGTERM/SIGINT as signals.Interrupted, or sys.exit from a signal handler (submitit
            # exits that way once it has requeued a preempted or timed-out SLURM job): the run did
            # not fail, it was stopped, and its checkpoint is kept for resume.
            status = "KILLED"
            raise
        except BaseException as exc:
            failure = f"{type(exc).__name__}: {exc}"[:5000]
            if disk_full(exc):
                reserve.release()  # room for the final status
                if on_disk_full is not None:
                    with contextlib.suppress(Exception):
                        on_disk_full()
                failure = f"disk full: {disk_full(exc)}"
            raise
        finally:
            reserve.release()
            with signals.signals_deferred():
                if signals.signal_since(mark) is not None or signals.pending_signal() is not None:
                    status, failure = "KILLED", None
                if status == "KILLED":
                    release_interrupted_connections(sys.exc_info()[1])
                if failure and failure.startswith("disk full: "):
                    with contextlib.suppress(Exception):
                        client.set_tag(run_id, "segx.disk_full", "true")
                if _end_run(client, run_id, status, failure) and status == "KILLED":
                    signals.note_killed(run_id)
    if status == "KILLED":  # the block ended normally: a library swallowed the signal
        raise signals.Interrupted(signals.signal_since(mark) or 2)


class _Reserve:
    """A few MB held beside a local SQLite store while a run is open, so that a full disk still
    leaves room to write the run's final status (SQLite needs pages and a journal for it)."""

    SIZE = 2 * 1024 * 1024

    def __init__(self, db: Path | None):
        self.path = None
        if db is None:
            return
        path = db.parent / f".segx-reserve-{os.getpid()}-{id(self)}"
        for old in db.parent.glob(".segx-reserve-*"):  # of processes killed outright
            with contextlib.suppress(OSError, ValueError):
                pid = int(old.name.split("-")[2])
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    old.unlink()
        try:
            with open(path, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, self.SIZE)
            self.path = path
        except (OSError, AttributeError):  # already full, or no fallocate: no reserve
            with contextlib.suppress(OSError):
                path.unlink()

    def release(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None


def release_interrupted_connections(exc: BaseException | None) -> None:
    """A signal inside an SQLite statement can leave its connection open with the statement
    unfinished (SQLAlchemy does not clean up after a KeyboardInterrupt); that connection keeps
    a lock which makes every later write in this process wait and fail. Drop the references the
    interrupted frames hold and close any SQLite connection to the store that is still open:
    between MLflow calls (NullPool) none should be. Nothing to do for a tracking server (and no
    time to lose: SLURM kills a job a few seconds after its SIGTERM)."""
    if _sqlite_path(mlflow.get_tracking_uri()) is None:
        return
    pending, seen = [exc], set()
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        traceback.clear_frames(item.__traceback__)
        pending += [item.__context__, item.__cause__]
    gc.collect()
    db = _sqlite_path(mlflow.get_tracking_uri())
    if db is None:
        return
    for obj in gc.get_objects():
        if isinstance(obj, sqlite3.Connection):
            with contextlib.suppress(Exception):
                if any(row[2] == str(db) for row in obj.execute("PRAGMA database_list")):
                    obj.close()


def _end_run(client: MlflowClient, run_id: str, status: str, failure: str | None) -> bool:
    """Write the run's final status within ``_END_RUN_TIMEOUT_S``; never leave it RUNNING
    silently. True once written."""
    deadline = time.monotonic() + _END_RUN_TIMEOUT_S
    uri = (
        getattr(client, "tracking_uri", None) or mlflow.get_tracking_uri()
    )  # this run's store, not the process's default
    error: Exception | None = None
    while True:
        try:
            if failure:
                client.set_tag(run_id, "segx.failure", failure)
                failure = None
            client.set_terminated(run_id, status)
            if status != "FINISHED":
                fail_pending_models(client, run_id)
            return True
        except Exception as exc:  # noqa: BLE001 - retried, then reported in one line
            error = exc
        if time.monotonic() >= deadline:
            break
        gc.collect()  # closes a connection an interrupted write left open (it holds the lock)
        time.sleep(0.2)
        with contextlib.suppress(Exception):
            client = MlflowClient(uri)
    text = str(error).strip().splitlines()[0][:200] if error and str(error).strip() else type(error).__name__
    print(
        f"segx: warning: could not mark MLflow run {run_id} {status} in {uri} ({text}); it "
        "still shows RUNNING: delete it in the MLflow UI or resume it",
        file=sys.stderr,
        flush=True,
    )
    return False


def fail_pending_models(client: MlflowClient, run_id: str) -> list[str]:
    """Mark FAILED the logged models of ``run_id`` still PENDING (interrupted while being logged),
    as MLflow's own ``log_model`` does when it fails: none stays PENDING for good, nor beside the
    READY one a resumed run logs. Their partial files in a local artifact folder are removed (a
    full disk gets its space back). Best effort (the run's status comes first); returns their IDs."""
    import shutil
    from urllib.parse import urlparse

    from mlflow.entities import LoggedModelStatus

    failed = []
    with contextlib.suppress(Exception):
        experiment = client.get_run(run_id).info.experiment_id
        for model in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
            if model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
                failed.append(model.model_id)
                where = urlparse(str(model.artifact_location))
                if where.scheme in ("", "file") and where.path:
                    shutil.rmtree(where.path, ignore_errors=True)
    return failed


def start_run(
    client: MlflowClient, experiment: str, run_name: str, tags: Mapping[str, str], description: str | None = None
) -> str:
    """A new run with what MLflow's fluent API would fill in (user, source, git commit: the UI's
    "Created by" and "Source"), segx's ``tags`` and a ``description`` (the UI's run description)."""
    from mlflow.tracking.context.registry import resolve_tags

    context = resolve_tags({})
    if "mlflow.source.name" in context and context["mlflow.source.name"] in ("-c", "-m", ""):
        context["mlflow.source.name"] = " ".join(["python", *sys.argv])[:500]
    extra = {"mlflow.note.content": description} if description else {}

    signals.on_failure(end_unscoped)  # a command stopped before the run's scope ends it
    with signals.signals_deferred():  # created and registered together: a signal is raised after both
        run = client.create_run(experiment, run_name=run_name, tags={**context, **dict(tags), **extra})
        _unscoped[run.info.run_id] = client
    return run.info.run_id


def reopen_run(client: MlflowClient, run_id: str) -> None:

    signals.on_failure(end_unscoped)
    fail_pending_models(client, run_id)  # left PENDING by a process killed outright (SIGKILL)
    with signals.signals_deferred():
        client.update_run(run_id, status="RUNNING")
        _unscoped[run_id] = client


# Runs made RUNNING (start_run, reopen_run) whose run_scope has not begun yet. Between the two a
# command may still be stopped (a signal, a failed check): segx.cli ends these on its way out
# (through the hook registered below),
# so no path leaves a run RUNNING (a signal under load once did, between creation and scope).
_unscoped: dict[str, MlflowClient] = {}


def end_unscoped(status: str, failure: str | None = None) -> list[str]:
    """End every run still waiting for its scope with ``status``; returns their IDs."""
    ended = []
    while _unscoped:
        run_id, client = _unscoped.popitem()
        if _end_run(client, run_id, status, failure):
            ended.append(run_id)
    return ended


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists become JSON strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    existing = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    if items:
        client.log_batch(run_id, metrics=items)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(client: MlflowClient, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def get_run(client: MlflowClient, run_id: str, need_finished: bool = True):
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise SegxError(
            f"MLflow run '{run_id}' does not exist in {mlflow.get_tracking_uri()}; check the run ID"
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise SegxError(f"MLflow run '{run_id}' is deleted; restore it or pick another run")
    if need_finished and run.info.status != "FINISHED":
        raise SegxError(f"MLflow run '{run_id}' is {run.info.status}, not FINISHED; resume or retrain it first")
    return run


def download(client: MlflowClient, run_id: str, artifact: str, dst: str | os.PathLike | None = None) -> Path:
    """Local path of one artifact (file or folder) of ``run_id``."""
    dst = Path(dst or tempfile.mkdtemp(prefix="segx-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run_id, artifact, str(dst)))
    except Exception as exc:  # noqa: BLE001
        raise SegxError(
            f"run '{run_id}' has no artifact '{artifact}' ({type(exc).__name__}); it is not a "
            "complete segx member: retrain it"
        ) from None


def download_member_model(client: MlflowClient, run_id: str, dst: str | os.PathLike, artifact: str = "model") -> Path:
    """The files segx needs to rebuild a member (spec.json, weights.h5), not the .keras copy."""
    dst = Path(dst)
    for name in ("spec.json", "weights.h5"):
        download(client, run_id, f"{artifact}/{name}", dst)  # lands as dst/<name>
    if VOLUMES in client.get_run(run_id).data.tags:  # trained on volumes: how to slice a scan
        download(client, run_id, f"{artifact}/volumes.json", dst)
    return dst


def find_runs(
    client: MlflowClient,
    experiment: str,
    role: str,
    status: str | None = "FINISHED",
    tags: Mapping[str, str] | None = None,
    deleted: bool = False,
) -> list:
    """Runs of ``role`` in ``experiment`` (newest first), filtered by exact tag values.

    ``deleted=True`` includes deleted runs too (to report what was passed over).
    """
    clauses = [f"tags.`{ROLE}` = '{role}'"]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    for key, value in (tags or {}).items():
        clauses.append(f"tags.`{key}` = '{value}'")
    return client.search_runs(
        [experiment],
        " and ".join(clauses),
        run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )


def log_dataset(
    client: MlflowClient,
    run_id: str,
    name: str,
    digest: str,
    source: str,
    profile: Mapping[str, Any],
    context: str = "training",
) -> None:
    """The split a run used, as an MLflow dataset input (the UI's "Datasets used"), with the
    data fingerprint as its digest: runs on the same files and split show the same dataset."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=name,
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": source}),
        profile=json.dumps(dict(profile)),
    )
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
    # MLflow's store looks the dataset up and inserts it if absent, not atomically: two members
    # starting at once on the same split (a sweep on a shared server) can both insert it, and one
    # gets the database's unique-key error. Its second try finds the row the other one wrote.
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as e:
            duplicate = "dataset_pk" in str(e) or "UNIQUE constraint failed: datasets" in str(e)
            if not duplicate or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, enabled: bool, interval: float = 10.0) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network; GPU where its library is present)
    sampled every ``interval`` seconds into ``run_id`` while the block runs."""
    monitor = None
    if enabled:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracking_uri)
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - psutil missing or a platform without counters
            logging.getLogger("segx.tracking").warning("segx: system metrics off (%s)", exc)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
                if getattr(monitor, "_logging_step", 1) == 0:
                    # MLflow publishes after each full interval: a run shorter than one would
                    # have none. One sample now, while the run is still open.
                    monitor.collect_metrics()
                    monitor.publish_metrics(monitor.aggregate_metrics())
                    monitor.mlflow_logger.flush()
