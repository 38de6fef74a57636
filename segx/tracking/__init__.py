"""Everything segx asks of MLflow, in one module: store set-up, runs that always end with
their real status, logging, and finding member runs. No TensorFlow here.

Default store: SQLite at ``outputs/mlflow.db`` with artifacts under ``outputs/mlartifacts``
(MLflow 3 refuses a bare ``./mlruns`` file store). A remote ``http(s)://`` URI works the same.

A store is checked before any work: an SQLite store must be an MLflow database (by its header
and tables, read without writing), writable for commands that write, and not locked by another
process for longer than ``SEGX_STORE_TIMEOUT`` seconds (default 20). Commands that only read
(``connect(..., create=False)``) never create, migrate or write a store.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from segx.errors import SegxError, disk_full

# Fail within seconds on an unreachable server instead of MLflow's minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_TRACKING_INSECURE_TLS", "false")
# SQLite serialises writers; a pooled connection held open by one process blocks the other.
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")

import logging  # noqa: E402

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag, ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

ROLE = "segx.role"
# "Creating initial MLflow database tables..." and friends are noise for segx users.
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)


SQLITE_HEADER = b"SQLite format 3\x00"
# How long a store locked by another process is waited for, at start, before saying so.
STORE_TIMEOUT_S = float(os.environ.get("SEGX_STORE_TIMEOUT", "20"))
_SERVER_SCHEMES = ("http", "https", "databricks")
_DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores MLflow serves itself
_USE = "use sqlite:///PATH/mlflow.db (a local store) or http(s)://HOST:PORT (an MLflow server)"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def connect(tracking_uri: str, create: bool = True, timeout: float | None = None) -> MlflowClient:
    """Point MLflow at ``tracking_uri`` after checking the store, and check it answers.

    ``create=True`` (commands that write): a missing SQLite store is created; an existing one
    must be writable. ``create=False`` (commands that only read): nothing is created, migrated or
    written; a missing file or one that is not an MLflow database is refused. A store locked by
    another process is waited for up to ``timeout`` seconds (``SEGX_STORE_TIMEOUT``) in all.
    Every failure is a :class:`SegxError` naming the store and the fix.
    """
    deadline = time.monotonic() + (STORE_TIMEOUT_S if timeout is None else timeout)
    shown = tracking_uri
    db = _sqlite_path(tracking_uri)
    if db is None:
        _check_scheme(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        return _open(tracking_uri, shown, deadline, None)
    db = Path(os.path.abspath(db.expanduser()))
    _check_sqlite_file(db, shown, create)
    tracking_uri = "sqlite:///" + str(db)
    if create:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    # MLflow creates and migrates a new SQLite schema on first use; two processes doing it at
    # once collide ("table _alembic_tmp_... already exists"), and a schema half created by
    # another process is no store yet. Serialise that first contact, the schema check included.
    with _file_lock(db.with_name(db.name + ".lock") if create else None, deadline, db):
        _check_sqlite_schema(db, create, deadline)
        return _open(tracking_uri, shown, deadline, db)


def _check_scheme(uri: str) -> None:
    """Refuse, in one line, a URI that names no store segx can use (before MLflow guesses)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in _SERVER_SCHEMES or uri == "databricks" or scheme.split("+")[0] in _DATABASE_SCHEMES:
        return
    allow_files = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
    if scheme == "file" and allow_files:
        return
    if scheme and scheme != "file":
        raise SegxError(f"mlflow.tracking_uri={uri}: segx cannot use a '{scheme}://' store; {_USE}")
    path = Path(uri[len("file://") :] if scheme == "file" else uri).expanduser()
    if path.is_file() and _header(path) == SQLITE_HEADER:
        raise SegxError(f"mlflow.tracking_uri={uri} is an SQLite file given as a path; write it as sqlite:///{path.absolute()}")
    what = ("a file that is not an SQLite database" if path.is_file() else
            "a folder (MLflow 3 no longer serves folder stores)" if path.is_dir() else
            "a path, not a store URI")  # fmt: skip
    raise SegxError(f"mlflow.tracking_uri={uri} is {what}; {_USE}")


def _header(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise SegxError(f"cannot read the MLflow store {path} ({exc.strerror}); check its permissions") from None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _locked(db: Path) -> SegxError:
    return SegxError(
        f"the MLflow store {db} is locked by another process; wait for it to finish or stop it "
        "(an open sqlite3 shell, a stuck segx run), or raise SEGX_STORE_TIMEOUT"
    )


def _read_only(db: Path, what: Path) -> SegxError:
    where = "" if what == db else f" (its folder {what} cannot be written)"
    return SegxError(
        f"the MLflow store {db} is read-only{where}; make it writable, or point "
        "mlflow.tracking_uri (and paths.output_dir) at a writable copy"
    )


def _remaining(deadline: float) -> float:
    return max(0.05, deadline - time.monotonic())


def _check_sqlite_file(db: Path, shown: str, create: bool) -> None:
    """Refuse a path that cannot hold an MLflow SQLite store (a folder, a missing file for a
    reading command, a file that is not SQLite), without writing anything."""
    if db.is_dir():
        raise SegxError(f"mlflow.tracking_uri={shown} is a folder, not an SQLite file; use e.g. sqlite:///{db}/mlflow.db")
    if not db.exists():
        if not create:
            raise SegxError(f"no MLflow store at {db}; check mlflow.tracking_uri or train first")
        parent = _existing_parent(db.parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SegxError(f"cannot create the MLflow store {db}: {parent} is not writable; choose a writable mlflow.tracking_uri")
        return
    header = _header(db)
    if header and header != SQLITE_HEADER:
        raise SegxError(
            f"{db} is not an SQLite database (mlflow.tracking_uri={shown}); point mlflow.tracking_uri "
            "at an MLflow store, e.g. sqlite:///outputs/mlflow.db"
        )


def _check_sqlite_schema(db: Path, create: bool, deadline: float) -> None:
    """An existing SQLite file must be an MLflow store of this MLflow's schema (read through a
    read-only connection), and writable when ``create``; a new one is left to MLflow."""
    if not db.exists():
        return
    tables, revision = _read_schema(db, deadline)
    if not tables:
        if not create:
            raise SegxError(f"no MLflow store at {db} (an empty database); check mlflow.tracking_uri or train first")
    elif not {"experiments", "runs", "alembic_version"} <= tables:
        raise SegxError(
            f"{db} is an SQLite database of another application, not an MLflow store; point "
            "mlflow.tracking_uri at an MLflow store, e.g. sqlite:///outputs/mlflow.db"
        )
    else:
        expected = _schema_head()
        if expected and revision != expected:
            raise SegxError(
                f"the MLflow store {db} has schema {revision}, this MLflow needs {expected}; use the "
                f"MLflow version that wrote it, or back it up and run: mlflow db upgrade sqlite:///{db}"
            )
    if create:
        _check_writable(db, deadline)


def _read_schema(db: Path, deadline: float) -> tuple[set[str], str | None]:
    """Table names and alembic revision, through a read-only connection (nothing is created)."""
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=_remaining(deadline))
    except sqlite3.Error as exc:
        raise SegxError(f"cannot open the MLflow store {db} ({exc}); check the path and its permissions") from None
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        revision = None
        if "alembic_version" in tables:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        return tables, revision
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise _locked(db) from None
        raise SegxError(f"cannot read the MLflow store {db} ({exc}); it may be damaged: restore a backup") from None
    except sqlite3.DatabaseError as exc:
        raise SegxError(f"{db} is not a readable SQLite database ({exc}); point mlflow.tracking_uri at an MLflow store") from None
    finally:
        con.close()


def _schema_head() -> str | None:
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - a private helper: without it MLflow checks the schema itself
        return None


def _check_writable(db: Path, deadline: float) -> None:
    """The store and its folder (SQLite writes its journal there) take a write, now: a cheap
    write transaction is begun and rolled back. Waits for another writer until ``deadline``."""
    for path, mode in ((db, os.W_OK), (db.parent, os.W_OK | os.X_OK)):
        if not os.access(path, mode):  # also true for root on an immutable file or a ro mount
            raise _read_only(db, path)
    con = sqlite3.connect(str(db), timeout=_remaining(deadline), isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise _locked(db) from None
        if "readonly" in str(exc) or "read-only" in str(exc):
            raise _read_only(db, db) from None
        raise SegxError(f"cannot write the MLflow store {db} ({exc}); check it and its folder") from None
    finally:
        con.close()


@contextlib.contextmanager
def _file_lock(path: Path | None, deadline: float, db: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import fcntl

    try:
        handle = open(path, "a")  # noqa: SIM115 - held for the whole block
    except OSError as exc:
        raise _read_only(db, path.parent) if exc.errno in (1, 13, 30) else SegxError(
            f"cannot create {path} ({exc.strerror}); check the folder of mlflow.tracking_uri") from None
    with handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _locked(db) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open(tracking_uri: str, shown: str, deadline: float, db: Path | None) -> MlflowClient:
    """A client that has answered one query; 'database is locked' is retried until ``deadline``
    (the client itself is created inside the loop: MLflow inspects the schema when it is)."""
    while True:
        try:
            client = MlflowClient(tracking_uri)
            client.search_experiments(max_results=1)
            return client
        except Exception as exc:  # noqa: BLE001 - report any failure as one line
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if "locked" in text:
                if time.monotonic() < deadline:
                    time.sleep(0.25)
                    continue
                raise _locked(db or Path(shown)) from None
            raise SegxError(
                f"cannot reach MLflow at mlflow.tracking_uri={shown} ({text}); start the "
                "server or use the default sqlite:///outputs/mlflow.db"
            ) from None


# What the experiment is for, in MLflow's own words. MLflow 3.17's UI does not read it to choose
# the page an experiment opens on (the browser's stored workflow decides: segx/tracking/ui_app.py,
# which `make ui` and segx.server run); other clients and later UIs may.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _mark_kind(client: MlflowClient, experiment) -> None:
    if "mlflow.experimentKind" not in (experiment.tags or {}):
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)


def experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """Id of experiment ``name``, created (with local artifacts under ``artifact_root``) if new,
    and marked as a model-training experiment for the MLflow UI."""
    if not name.strip() or any(c in name for c in "\n\r\t\0"):
        raise SegxError(f"mlflow.experiment_name={name!r} must be a name on one line; e.g. mlflow.experiment_name=nuclei")
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise SegxError(f"MLflow experiment '{name}' is deleted; restore it or choose mlflow.experiment_name")
        _check_artifacts_writable(found.artifact_location, name)
        _mark_kind(client, found)
        return found.experiment_id
    location = None
    # A tracking server keeps a new experiment's artifacts itself (proxied: mlflow-artifacts:/):
    # a folder of this machine would be written here and unreadable to other clients.
    on_server = client.tracking_uri.split("://", 1)[0].lower() in _SERVER_SCHEMES
    if artifact_root and "://" not in artifact_root and not on_server:
        root = Path(artifact_root).resolve()
        _check_artifacts_writable(str(root), name)
        root.mkdir(parents=True, exist_ok=True)
        location = (root / artifact_folder_name(name)).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # created meanwhile by a parallel member
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def check_model_name(name: str, key: str) -> None:
    """A registered model name MLflow will take (no '/' or ':', not blank, not a path), checked
    before any work: one line naming ``key``."""
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise SegxError(f"{key}={name!r}: {exc.message}; choose a plain name such as segx-nuclei") from None


def artifact_folder_name(name: str) -> str:
    """The folder under ``mlflow.artifact_root`` that holds experiment ``name``'s artifacts: the
    name itself where it is a plain folder name, else a safe spelling of it plus a short hash of the
    whole name (``../../x``, ``/home/ana`` or ``a/b`` stay inside the root, and never share a folder
    with another name). An experiment's name is a name, not a path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    if safe == name:
        return name
    return f"{safe[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _check_artifacts_writable(location: str | None, experiment: str) -> None:
    """Commands that log need the experiment's local artifact folder writable: say so now,
    not after the work (a remote artifact store is checked by its server)."""
    if not location:
        return
    if location.startswith("file:"):
        from mlflow.utils.file_utils import local_file_uri_to_path

        path = Path(local_file_uri_to_path(location))
    elif "://" in location or ":/" in location:
        return
    else:
        path = Path(location)
    existing = _existing_parent(path.absolute())
    if not os.access(existing, os.W_OK | os.X_OK) or (existing.is_file()):
        where = "" if existing == path.absolute() else f" ({existing})"
        raise SegxError(
            f"the artifact folder {path} of MLflow experiment '{experiment}' is not writable{where}; "
            "make it writable, or use a new mlflow.experiment_name with a writable mlflow.artifact_root"
        )


# The final status of a run is written within this many seconds, on fresh clients if need be.
_END_RUN_TIMEOUT_S = 30.0


@contextlib.contextmanager
def run_scope(client: MlflowClient, run_id: str, on_disk_full: Callable[[], None] | None = None) -> Iterator[str]:
    """End ``run_id`` FINISHED on success, KILLED on Ctrl-C/SIGTERM, FAILED on any error.

    A full disk must not leave the run RUNNING: a local store keeps a small reserve file beside
    its database while the run is open, removed (with ``on_disk_full``: the caller's partial
    files) before the final status is written when the error was a full disk; the run is then
    tagged ``segx.disk_full`` (and can be resumed once there is space).

    A signal inside the block raises (``segx.cli.Interrupted``); one that a library swallowed
    is still seen here (the signal count moved), so the run ends KILLED and the signal is
    raised again. The final status is written with signals held back, and retried on a fresh
    client if the interrupted write left the old connection holding the database lock.
    """
    from segx import cli

    mark = cli.signal_count()
    _unscoped.pop(run_id, None)  # from here this scope ends it
    status, failure = "FAILED", None
    reserve = _Reserve(_sqlite_path(client.tracking_uri))
    with cli.signals_raise():
        try:
            yield run_id
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            # Ctrl-C, SIGTERM/SIGINT as cli.Interrupted, or sys.exit from a signal handler (submitit
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
            with cli.signals_deferred():
                if cli.signal_since(mark) is not None or cli.pending_signal() is not None:
                    status, failure = "KILLED", None
                if status == "KILLED":
                    _release_interrupted_connections(sys.exc_info()[1])
                if failure and failure.startswith("disk full: "):
                    with contextlib.suppress(Exception):
                        client.set_tag(run_id, "segx.disk_full", "true")
                if _end_run(client, run_id, status, failure) and status == "KILLED":
                    cli.note_killed(run_id)
    if status == "KILLED":  # the block ended normally: a library swallowed the signal
        raise cli.Interrupted(cli.signal_since(mark) or 2)


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


def _release_interrupted_connections(exc: BaseException | None) -> None:
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
    uri = getattr(client, "tracking_uri", None) or mlflow.get_tracking_uri()  # this run's store, not the process's default
    error: Exception | None = None
    while True:
        try:
            if failure:
                client.set_tag(run_id, "segx.failure", failure)
                failure = None
            client.set_terminated(run_id, status)
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
    print(f"segx: warning: could not mark MLflow run {run_id} {status} in {uri} ({text}); it "
          "still shows RUNNING: delete it in the MLflow UI or resume it", file=sys.stderr, flush=True)  # fmt: skip
    return False


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
    from segx import cli

    with cli.signals_deferred():  # created and registered together: a signal is raised after both
        run = client.create_run(experiment, run_name=run_name, tags={**context, **dict(tags), **extra})
        _unscoped[run.info.run_id] = client
    return run.info.run_id


def reopen_run(client: MlflowClient, run_id: str) -> None:
    from segx import cli

    with cli.signals_deferred():
        client.update_run(run_id, status="RUNNING")
        _unscoped[run_id] = client


# Runs made RUNNING (start_run, reopen_run) whose run_scope has not begun yet. Between the two a
# command may still be stopped (a signal, a failed check): segx.cli ends these on its way out,
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


class EpochLog:
    """Per-epoch metrics that outlive a tracking server going away for a while.

    Each epoch's metrics are sent together with any that failed before, in order, each with its
    own step and timestamp (a metric sent twice is the same row, so a lost answer duplicates
    nothing). What the store did not take stays in memory and in ``spool`` (a JSON file beside
    the checkpoint, so a resumed run sends it too) and training goes on. A send is one request
    without MLflow's retries, so an outage costs an epoch at most a few seconds.
    """

    def __init__(self, client: MlflowClient, run_id: str, spool: Path | None = None):
        self.client, self.run_id, self.spool = client, run_id, spool
        self.pending: list[list] = []  # [key, value, timestamp_ms, step], oldest first
        if spool is not None and spool.exists():
            with contextlib.suppress(OSError, ValueError):
                self.pending = [list(m) for m in json.loads(spool.read_text())]
        self.failing: str | None = None  # why the last send failed

    def log(self, metrics: Mapping[str, float], step: int) -> bool:
        now = int(time.time() * 1000)
        self.pending += [[k, float(v), now, int(step)] for k, v in metrics.items()]
        return self.send()

    def send(self) -> bool:
        """Send what is pending; False if the store did not take it (it is kept)."""
        while self.pending:
            chunk = self.pending[:1000]  # MLflow's limit per log_batch
            try:
                with _one_quick_request():
                    self.client.log_batch(self.run_id, metrics=[Metric(*m) for m in chunk])
            except Exception as exc:
                if not _store_unavailable(exc):
                    raise
                if self.failing is None:
                    print(f"segx: warning: MLflow at {self.client.tracking_uri} did not take run {self.run_id}'s "
                          f"metrics ({_first_line(exc)}); training goes on and sends them with the next "
                          "epoch's", file=sys.stderr, flush=True)  # fmt: skip
                self.failing = _first_line(exc)
                self._save()
                return False
            del self.pending[: len(chunk)]
        if self.failing is not None:
            print(f"segx: MLflow at {self.client.tracking_uri} answers again; every kept metric is sent",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.failing = None
        self._save()
        return True

    def flush(self, wait_s: float, then: str) -> None:
        """Send what is pending, trying for up to ``wait_s`` seconds; then a SegxError ending
        with ``then`` (what the user does next)."""
        deadline = time.monotonic() + wait_s
        while not self.send():
            if time.monotonic() >= deadline:
                raise SegxError(
                    f"MLflow at {self.client.tracking_uri} has not taken run {self.run_id}'s last "
                    f"{len(self.pending)} metrics for {wait_s:.0f} s ({self.failing}); {then}"
                )
            time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))

    def _save(self) -> None:
        if self.spool is None:
            return
        if not self.pending:
            self.spool.unlink(missing_ok=True)
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool.with_name(f"{self.spool.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.pending))
        os.replace(tmp, self.spool)  # atomic: a kill leaves the old list or the new one


def _first_line(exc: BaseException) -> str:
    """Why a request failed, briefly (MLflow's own text for a refused connection runs to 400
    characters)."""
    text = str(exc).strip()
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "no answer in time"),
                          ("Name or service not known", "unknown host")):  # fmt: skip
        if needle in text:
            return short
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _store_unavailable(exc: Exception) -> bool:
    """A store that is away, overloaded or locked (worth trying again), not one that refuses the
    request (an unknown run, a bad value: trying again would not help)."""
    import requests

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(exc, (OSError, requests.RequestException))


@contextlib.contextmanager
def _one_quick_request() -> Iterator[None]:
    """One attempt, answered within 10 s at most, whatever the user set for MLflow's retries (it
    reads these variables for every request): the caller keeps what failed and tries later."""
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        timeout = min(10, max(1, int(saved["MLFLOW_HTTP_REQUEST_TIMEOUT"] or 10)))
    except ValueError:
        timeout = 10
    os.environ.update(dict(zip(keys, ("0", "0", str(timeout)), strict=True)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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




def ui_urls(tracking_uri: str, base: str) -> str:
    """Lines naming the MLflow UI address of each experiment's runs table (what ``make ui`` prints)."""
    lines = [f"MLflow UI: {base}  (Ctrl-C stops it)"]
    db = _sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        return lines[0] + "\n  no runs yet: train a member first (make ensemble)"
    client = MlflowClient(tracking_uri)
    for exp in client.search_experiments():
        if exp.name == "Default" and not client.search_runs([exp.experiment_id], max_results=1):
            continue
        lines.append(f"  {exp.name}: {base}/#/experiments/{exp.experiment_id}?workflowType=machine_learning")
    return "\n".join(lines)


def log_dataset(client: MlflowClient, run_id: str, name: str, digest: str, source: str, profile: Mapping[str, Any],
                context: str = "training") -> None:
    """The split a run used, as an MLflow dataset input (the UI's "Datasets used"), with the
    data fingerprint as its digest: runs on the same files and split show the same dataset."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                      profile=json.dumps(dict(profile)))  # fmt: skip
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


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


def _image_signature():
    """uint8 images (N, H, W, 3) of any size in; uint8 masks {0, 1} (N, H, W) out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))  # fmt: skip


def log_member_model(client: MlflowClient, run_id: str, experiment: str, name: str, params: Mapping[str, Any],
                     member: Mapping[str, Any]) -> str:  # fmt: skip
    """The member as an MLflow 3 logged model (the UI's Models tab, linked to its run as an
    output) with a signature, that ``mlflow.pyfunc.load_model("models:/<id>")`` loads and that
    predicts masks at each image's own size (segx/tracking/pyfunc_model.py). Its weights are not
    copied: the model reads the run's ``model`` artifact (tag ``segx.model_artifact``).
    ``member``: backbone, arch and view, as an ensemble record names a member."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from segx.tracking.pyfunc_model import log_member_pyfunc

    model = client.create_logged_model(
        experiment, name=name, source_run_id=run_id, model_type="segx-member",
        params={k: str(v) for k, v in params.items()}, tags={"segx.model_artifact": f"runs:/{run_id}/model"},
    )  # fmt: skip
    log_member_pyfunc(client, model.model_id, run_id, dict(member), _image_signature(), int(member["view"]["size"]))
    if client.get_logged_model(model.model_id).status != LoggedModelStatus.READY:
        client.finalize_logged_model(model.model_id, "READY")
    if not any(o.model_id == model.model_id for o in (client.get_run(run_id).outputs.model_outputs or [])):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    client.set_tag(run_id, "segx.logged_model_id", model.model_id)
    return model.model_id


def link_models(client: MlflowClient, run_id: str, model_ids: Sequence[str]) -> None:
    """Name logged models as the run's inputs (the ensemble's members, in the UI)."""
    from mlflow.entities import LoggedModelInput

    ids = [m for m in model_ids if m]
    if ids:
        client.log_inputs(run_id, models=[LoggedModelInput(m) for m in ids])



def log_export_model(client: MlflowClient, run_id: str, experiment: str, name: str, inputs: Mapping[str, Mapping],
                     outputs: Mapping[str, Mapping], params: Mapping[str, Any], artifact: str) -> str:  # fmt: skip
    """An exported ensemble graph (``segx.export``) as an MLflow 3 logged model of ``run_id``,
    with its tensor signature (``inputs``/``outputs``: name -> {dtype, shape}, -1 any size); like
    a member's, it points at the run's ``artifact`` folder instead of copying the model."""
    import numpy as np
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def schema(specs: Mapping[str, Mapping]) -> Schema:
        return Schema([TensorSpec(np.dtype(s["dtype"]), tuple(s["shape"]), key) for key, s in specs.items()])

    model = client.create_logged_model(
        experiment, name=name, source_run_id=run_id, model_type="segx-export",
        params={k: str(v) for k, v in params.items()}, tags={"segx.model_artifact": f"runs:/{run_id}/{artifact}"},
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="segx-model-") as tmp:
        Model(model_id=model.model_id, run_id=run_id, signature=ModelSignature(schema(inputs), schema(outputs))).save(
            str(Path(tmp) / "MLmodel"))  # fmt: skip
        (Path(tmp) / "README.txt").write_text(f"segx export: the model files are the artifact runs:/{run_id}/{artifact}\n")
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return model.model_id
