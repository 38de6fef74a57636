"""The MLflow store: checked before any work, then connected; experiments and their artifact
folders.

Default store: SQLite at ``outputs/mlflow.db`` with artifacts under ``outputs/mlartifacts``
(MLflow 3 refuses a bare ``./mlruns`` file store). A remote ``http(s)://`` URI works the same.

A store is checked before any work: an SQLite store must be an MLflow database (by its header
and tables, read without writing), writable for commands that write, and not locked by another
process for longer than ``SEGX_STORE_TIMEOUT`` seconds (default 20). Commands that only read
(``connect(..., create=False)``) never create, migrate or write a store.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segx.errors import SegxError


def configure_mlflow_environment() -> None:
    """MLflow's settings segx relies on, where the user has not set them; called by
    :func:`connect` (what every command does first), not at import."""
    # Fail within seconds on an unreachable server instead of MLflow's minutes of retries
    # (MLflow reads these for every request).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_TRACKING_INSECURE_TLS", "false")
    # SQLite serialises writers; a pooled connection held open by one process blocks the other.
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    # "Creating initial MLflow database tables..." and friends are noise for segx users.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
    configure_mlflow_environment()
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
        raise SegxError(
            f"mlflow.tracking_uri={uri} is an SQLite file given as a path; write it as sqlite:///{path.absolute()}"
        )
    what = (
        "a file that is not an SQLite database"
        if path.is_file()
        else "a folder (MLflow 3 no longer serves folder stores)"
        if path.is_dir()
        else "a path, not a store URI"
    )
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
        raise SegxError(
            f"mlflow.tracking_uri={shown} is a folder, not an SQLite file; use e.g. sqlite:///{db}/mlflow.db"
        )
    if not db.exists():
        if not create:
            raise SegxError(f"no MLflow store at {db}; check mlflow.tracking_uri or train first")
        parent = _existing_parent(db.parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SegxError(
                f"cannot create the MLflow store {db}: {parent} is not writable; choose a writable mlflow.tracking_uri"
            )
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
    """Table names and alembic revision; the connection never creates a file. It is read-write
    where the store may be written: a writer killed outright (SIGKILL, power loss) leaves a hot
    journal, which SQLite must roll back before the first read, and a read-only connection cannot."""
    writable = os.access(db, os.W_OK) and os.access(db.parent, os.W_OK | os.X_OK)
    mode = "rw" if writable else "ro"
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode={mode}", uri=True, timeout=_remaining(deadline))
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
        journal = db.with_name(db.name + "-journal")
        if not writable and journal.exists():
            raise SegxError(
                f"the MLflow store {db} holds a write a stopped process left unfinished ({journal.name}) and is "
                "read-only here: run any segx command once where it is writable, which rolls the write back"
            ) from None
        raise SegxError(f"cannot read the MLflow store {db} ({exc}); it may be damaged: restore a backup") from None
    except sqlite3.DatabaseError as exc:
        raise SegxError(
            f"{db} is not a readable SQLite database ({exc}); point mlflow.tracking_uri at an MLflow store"
        ) from None
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
        raise (
            _read_only(db, path.parent)
            if exc.errno in (1, 13, 30)
            else SegxError(f"cannot create {path} ({exc.strerror}); check the folder of mlflow.tracking_uri")
        ) from None
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
        raise SegxError(
            f"mlflow.experiment_name={name!r} must be a name on one line; e.g. mlflow.experiment_name=nuclei"
        )
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
