"""Everything segx asks of MLflow, in one module: store set-up, runs that always end with
their real status, logging, and finding member runs. No TensorFlow here.

Default store: SQLite at ``outputs/mlflow.db`` with artifacts under ``outputs/mlartifacts``
(MLflow 3 refuses a bare ``./mlruns`` file store). A remote ``http(s)://`` URI works the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from segx.errors import SegxError

# Fail within seconds on an unreachable server instead of MLflow's minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_TRACKING_INSECURE_TLS", "false")
# SQLite serialises writers; a pooled connection held open by one process blocks the other.
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")

import logging  # noqa: E402

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

ROLE = "segx.role"
# "Creating initial MLflow database tables..." and friends are noise for segx users.
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def connect(tracking_uri: str, retries: int = 5) -> MlflowClient:
    """Point MLflow at ``tracking_uri`` and check it answers, within seconds.

    Retries briefly on SQLite 'database is locked' (parallel members creating the schema).
    """
    db = _sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        tracking_uri = "sqlite:///" + str(db.resolve())
    mlflow.set_tracking_uri(tracking_uri)
    # MLflow creates and migrates a new SQLite schema on first use; two processes doing it at
    # once collide ("table _alembic_tmp_... already exists"). Serialise that first contact.
    with _file_lock(db.with_name(db.name + ".lock") if db is not None else None):
        return _check(MlflowClient(tracking_uri), tracking_uri, retries)


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check(client: MlflowClient, tracking_uri: str, retries: int) -> MlflowClient:
    for attempt in range(retries):
        try:
            client.search_experiments(max_results=1)
            return client
        except Exception as exc:  # noqa: BLE001 - report any failure as one line
            text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if "locked" in text and attempt < retries - 1:
                time.sleep(0.5 + attempt)
                continue
            raise SegxError(
                f"cannot reach MLflow at mlflow.tracking_uri={tracking_uri} ({text}); start the "
                "server or use the default sqlite:///outputs/mlflow.db"
            ) from None
    raise AssertionError("unreachable")


def experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """Id of experiment ``name``, created (with local artifacts under ``artifact_root``) if new."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise SegxError(f"MLflow experiment '{name}' is deleted; restore it or choose mlflow.experiment_name")
        return found.experiment_id
    location = None
    if artifact_root and "://" not in artifact_root:
        root = Path(artifact_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = (root / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a parallel member
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class _Interrupted(BaseException):
    """SIGTERM turned into an exception so that the run is ended KILLED, not left RUNNING."""


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    def handler(signum, frame):
        raise _Interrupted(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def run_scope(client: MlflowClient, run_id: str) -> Iterator[str]:
    """End ``run_id`` FINISHED on success, KILLED on Ctrl-C/SIGTERM, FAILED on any error."""
    status = "FAILED"
    try:
        with _sigterm_as_exception():
            yield run_id
        status = "FINISHED"
    except (KeyboardInterrupt, _Interrupted):
        status = "KILLED"
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "segx.failure", f"{type(exc).__name__}: {exc}"[:5000])
        raise
    finally:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status)


def start_run(
    client: MlflowClient, experiment: str, run_name: str, tags: Mapping[str, str]
) -> str:
    run = client.create_run(experiment, run_name=run_name, tags=dict(tags))
    return run.info.run_id


def reopen_run(client: MlflowClient, run_id: str) -> None:
    client.update_run(run_id, status="RUNNING")


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


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def get_run(client: MlflowClient, run_id: str, need_finished: bool = True):
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise SegxError(f"MLflow run '{run_id}' does not exist in {mlflow.get_tracking_uri()}; check the run ID") from None
    if run.info.lifecycle_stage == "deleted":
        raise SegxError(f"MLflow run '{run_id}' is deleted; restore it or pick another run")
    if need_finished and run.info.status != "FINISHED":
        raise SegxError(
            f"MLflow run '{run_id}' is {run.info.status}, not FINISHED; resume or retrain it first"
        )
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
    return dst


def find_runs(
    client: MlflowClient,
    experiment: str,
    role: str,
    status: str | None = "FINISHED",
    tags: Mapping[str, str] | None = None,
) -> list:
    """Runs of ``role`` in ``experiment`` (newest first), filtered by exact tag values."""
    clauses = [f"tags.`{ROLE}` = '{role}'"]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    for key, value in (tags or {}).items():
        clauses.append(f"tags.`{key}` = '{value}'")
    return client.search_runs(
        [experiment], " and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=5000
    )


def run_status_names() -> list[str]:
    return [RunStatus.to_string(s) for s in RunStatus.all_status()]
