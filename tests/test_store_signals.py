"""Store faults and signals end a command in one line, before any work, and never leave a run
RUNNING: a locked, read-only or non-SQLite store; read-only commands that must not create a
store; SIGINT/SIGTERM at random points of an ensemble (its MLflow logging included), in the
first epoch of training and during prediction. Real stores, real subprocesses, real signals."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from segx import tracking
from segx.errors import SegxError
from tests.conftest import ROOT, store_overrides, tiny_train_overrides
from tests.helpers import copy_store, ensemble_args, run_in_process, seed_store, statuses

# A store locked by another process is waited for this long before the one-line error.
LOCK_WAIT_S = 2


def start(args: list[str], **env: str) -> subprocess.Popen:
    environment = dict(os.environ, PYTHONUNBUFFERED="1", SEGX_STORE_TIMEOUT=str(LOCK_WAIT_S), **env)
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def run(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    proc = start(args, **env)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_here(capfd, args: list[str]) -> subprocess.CompletedProcess:
    """What ``run`` runs, in this process (tests/helpers.py run_in_process): for refusals."""
    return run_in_process(capfd, args, env={"SEGX_STORE_TIMEOUT": str(LOCK_WAIT_S)})


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(result, *names: str) -> str:
    lines = error_lines(result)
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("segx: error: "), result.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


@contextlib.contextmanager
def exclusive_lock(db: Path):
    """Another connection holds the database's exclusive lock (no one else can read or write)."""
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        con.execute("ROLLBACK")
        con.close()


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` cannot be written, even by root: the immutable attribute (root ignores modes)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i here: no way to make a file read-only for root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# --- store errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ensemble", "info"])
def test_locked_store_gives_one_line_naming_it_within_the_wait(tmp_path, member_store, command):
    store = copy_store(member_store[0], tmp_path / "store")
    before = statuses(store, "ensemble")  # the shared fixture store may hold ensembles already
    args = (
        ensemble_args(store)
        if command == "ensemble"
        else ["segx.info", f"run_id={member_store[1]['resnet18']}", f"mlflow.tracking_uri=sqlite:///{store}/mlflow.db"]
    )
    with exclusive_lock(store / "mlflow.db"):
        started = time.monotonic()
        result = run(args)
        elapsed = time.monotonic() - started
    line = assert_one_line_error(result, str(store / "mlflow.db"), "locked")
    assert "SEGX_STORE_TIMEOUT" in line
    assert elapsed < LOCK_WAIT_S + 30  # waited about LOCK_WAIT_S, not MLflow's retries
    assert "ensembling" not in result.stdout
    assert statuses(store, "ensemble") == before  # no ensemble run was created


def test_a_lock_released_within_the_wait_is_waited_for(tmp_path, member_store):
    store = copy_store(member_store[0], tmp_path / "store")
    con = sqlite3.connect(store / "mlflow.db", isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.5, lambda: (con.execute("ROLLBACK"), con.close()))
    release.start()
    try:
        client = tracking.connect(f"sqlite:///{store}/mlflow.db", timeout=30)
        assert client.get_experiment_by_name("segx") is not None
    finally:
        release.join()


@pytest.mark.parametrize("which", ["database", "store-folder", "output-folder", "artifacts"])
def test_read_only_store_fails_before_the_search_in_one_line(tmp_path, member_store, which, capfd):
    store = copy_store(member_store[0], tmp_path / "store")
    before = statuses(store, "ensemble")  # the shared fixture store may hold ensembles already
    target = {
        "database": store / "mlflow.db",
        "store-folder": store,
        "output-folder": store,
        "artifacts": store / "mlartifacts" / "segx",
    }[which]
    args = ensemble_args(store)
    if which == "store-folder":  # Hydra and segx write elsewhere: only the store is read-only
        args.append(f"paths.output_dir={tmp_path / 'out'}")
    with read_only(target):
        result = run_here(capfd, args)
    line = assert_one_line_error(result, str(target))
    assert any(words in line for words in ("read-only", "not writable", "not a writable folder")), line
    assert "Validation" not in result.stdout  # refused before the search, not after it
    assert statuses(store, "ensemble") == before  # no ensemble run was created


@pytest.mark.parametrize("form", ["path", "sqlite"])
def test_a_store_that_is_not_sqlite_is_refused_and_left_alone(tmp_path, member_store, form, capfd):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    uri = str(notes) if form == "path" else f"sqlite:///{notes}"
    result = run_here(capfd, ["segx.ensemble", f"paths.output_dir={tmp_path / 'out'}", f"mlflow.tracking_uri={uri}"])
    assert_one_line_error(result, str(notes), "not an SQLite database")
    assert notes.read_text() == "not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "out") == ["notes.txt"]


@pytest.fixture
def other_application_db(tmp_path) -> Path:
    """An SQLite file that belongs to something else (no MLflow tables)."""
    db = tmp_path / "elsewhere" / "notes.db"
    db.parent.mkdir()
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        con.execute("INSERT INTO notes (text) VALUES ('keep me')")
    return db


@pytest.mark.parametrize("command", ["predict", "info"])
@pytest.mark.parametrize("store", ["missing", "other-application"])
def test_read_only_commands_never_create_or_change_a_store(
    tmp_path, synthetic_root, other_application_db, command, store, capfd
):
    db = other_application_db if store == "other-application" else tmp_path / "typo" / "sub" / "mlflow.db"
    watched = tmp_path / "elsewhere"
    before = snapshot(watched)
    uri = f"mlflow.tracking_uri=sqlite:///{db}"
    args = (
        [
            "segx.predict",
            "ensemble_run_id=0123456789abcdef",
            f"input_dir={synthetic_root / 'train_images'}",
            f"output_dir={tmp_path / 'masks'}",
            f"paths.output_dir={tmp_path / 'work'}",
            uri,
        ]
        if command == "predict"
        else ["segx.info", "run_id=0123456789abcdef", uri]
    )
    result = run_here(capfd, args)
    line = assert_one_line_error(result, str(db))
    assert ("no MLflow store" in line) if store == "missing" else ("another application" in line)
    assert not (tmp_path / "typo").exists()  # no folder, no database for a mistyped path
    assert snapshot(watched) == before  # byte for byte, and no journal or lock file beside it
    with contextlib.closing(sqlite3.connect(other_application_db)) as con:
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["notes"]


def test_connect_read_only_refuses_an_empty_database_without_touching_it(tmp_path):
    db = tmp_path / "empty.db"
    db.write_bytes(b"")
    with pytest.raises(SegxError, match="no MLflow store at .*empty.db"):
        tracking.connect(f"sqlite:///{db}", create=False)
    assert db.read_bytes() == b"" and sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]


_KILLED_WRITER = """
import os, signal, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA cache_size=1")  # pages spill into the database before the commit
con.execute("BEGIN IMMEDIATE")
con.execute("CREATE TABLE unfinished (x TEXT)")
for _ in range(200):
    con.execute("INSERT INTO unfinished VALUES (?)", ("x" * 4000,))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_outright_leaves_a_store_the_next_command_opens(tmp_path):
    # A training killed by SIGKILL (the OOM killer, a node's power) leaves a hot journal: the
    # next read must roll it back, which a read-only connection cannot ("attempt to write a
    # readonly database", seen once resuming a killed training).
    db = tmp_path / "mlflow.db"
    tracking.connect(f"sqlite:///{db}").search_experiments()
    writer = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(db)], timeout=60)
    assert writer.returncode == -signal.SIGKILL
    assert (tmp_path / "mlflow.db-journal").stat().st_size > 0  # the unfinished write
    for create in (False, True):  # read-only commands (predict, info) and writing ones
        client = tracking.connect(f"sqlite:///{db}", create=create)
        assert [e.name for e in client.search_experiments()] == ["Default"]
    with contextlib.closing(sqlite3.connect(db)) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "runs" in tables and "unfinished" not in tables  # rolled back, nothing half-written


# --- signals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_a_library_swallows_still_ends_the_run_killed(tmp_path, sig):
    from segx.cli import Interrupted

    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = tracking.experiment_id(client, "segx", str(tmp_path / "mlartifacts"))
    run_id = tracking.start_run(client, experiment, "swallowed", {})
    # Whatever the caller had (a shell starting pytest in the background gives SIG_IGN).
    callers = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as raised, tracking.run_scope(client, run_id):
        try:  # library code that catches everything, as some of MLflow's and SQLAlchemy's does
            os.kill(os.getpid(), sig)
            time.sleep(5)
        except BaseException:  # noqa: BLE001
            pass
        tracking.log_metrics(client, run_id, {"after": 1.0})
    assert raised.value.signum == sig
    assert client.get_run(run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is callers  # the caller's handlers are back


@contextlib.contextmanager
def _busy_cores(n: int = 2):
    """``n`` processes spinning on the CPU beside the test (a loaded machine, as CI can be),
    stopped at the end however it ends."""
    spinners = [
        subprocess.Popen(
            [sys.executable, "-c", "import time\nend = time.time() + 1800\nwhile time.time() < end: pass"],
            start_new_session=True,
        )
        for _ in range(n)
    ]
    try:
        yield
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait(30)


def _signal_the_ensemble(tmp_path: Path, member_store, rounds: int = 1) -> None:
    """Send SIGINT/SIGTERM at every stage the ensemble reports (each line it prints: members
    loaded, the search, post-processing, the run created, its tables and figures, the pyfunc
    model, the report), ``rounds`` times each, with two busy processes beside it. Every try
    must end with no run RUNNING, and, where the command had not finished, 128 + the signal and
    one line. Deterministic: a signal lands at each boundary, not at random moments."""
    store = copy_store(member_store[0], tmp_path / "store")
    artifacts = store / "mlartifacts" / "segx"

    def drop_new_artifacts(keep: set[Path]) -> None:  # each ensemble logs ~100 MB of models
        for path in [*artifacts.iterdir(), *(artifacts / "models").glob("*")]:
            if path not in keep and path.name != "models":
                shutil.rmtree(path)

    keep = {*artifacts.iterdir(), *(artifacts / "models").glob("*")}
    baseline = start(ensemble_args(store))
    out, err = baseline.communicate(timeout=300)
    assert baseline.returncode == 0, err[-3000:]
    stages = [line for line in out.splitlines() if line.startswith("segx: ")]
    assert len(stages) >= 6 and any(line.startswith("segx: ensemble run ") for line in stages), stages
    drop_new_artifacts(keep)

    interrupted, tries = 0, 0
    with _busy_cores(2):
        for k in [k for k in range(len(stages)) for _ in range(rounds)]:
            sig = (signal.SIGINT, signal.SIGTERM)[tries % 2]
            tries += 1
            proc = start(ensemble_args(store))
            seen = 0
            while seen <= k:  # up to and including the k-th stage line, then the signal at once
                line = proc.stdout.readline()
                if not line:
                    break
                seen += line.startswith("segx: ")
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=300)
            found = statuses(store, "ensemble")
            what = f"stage {k} ({stages[k][:60]!r}): {sig.name} -> exit {proc.returncode}, runs {found}\n{err[-3000:]}"
            assert "RUNNING" not in found, what
            lines = [line for line in err.splitlines() if line.strip()]
            if proc.returncode == 128 + sig:
                interrupted += 1
                assert len(lines) == 1 and lines[0].startswith(f"segx: interrupted by {sig.name}"), what
            else:
                # The signal came after the work: the run is FINISHED and the process had exited (0)
                # or was in the interpreter's teardown, where the signal's default action ends it.
                assert proc.returncode in (0, -sig) and found[-1:] == ["FINISHED"], what
                assert not lines, what
            drop_new_artifacts(keep)
    assert interrupted >= tries // 2, f"only {interrupted} of {tries} signals landed before the end"


# Slow: 7+ ensemble launches; its core (a signal before the scope, in MLflow logging, in prediction) is covered fast below.
@pytest.mark.slow
def test_signals_during_the_ensemble_never_leave_a_run_running(tmp_path, member_store):
    _signal_the_ensemble(tmp_path, member_store)


@pytest.mark.slow
def test_signals_during_the_ensemble_never_leave_a_run_running_3_rounds(tmp_path, member_store):
    _signal_the_ensemble(tmp_path, member_store, rounds=3)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_in_the_first_epoch_ends_the_run_killed_in_one_line(tmp_path, synthetic_root, sig):
    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    proc = start(["segx.train", *tiny_train_overrides(tmp_path, synthetic_root, epochs=4)])
    deadline = time.monotonic() + 300
    checkpoints = tmp_path / "checkpoints"
    while proc.poll() is None and time.monotonic() < deadline and not any(checkpoints.glob("*")):
        time.sleep(0.05)  # the run's checkpoint folder appears as fitting starts
    time.sleep(0.3)
    assert not any(checkpoints.glob("*/state.json")), "the first epoch ended before the signal"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 128 + sig, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"segx: interrupted by {sig.name}"), err[-3000:]
    run_id = next(checkpoints.iterdir()).name
    assert run_id in lines[0] and "KILLED" in lines[0]
    assert statuses(tmp_path, "member") == ["KILLED"]


def test_sigterm_during_prediction_exits_143_in_one_line(tmp_path, member_store, ensemble_record, synthetic_root):
    out, _ = member_store
    proc = start(
        [
            "segx.predict",
            *store_overrides(out),
            f"ensemble_run_id={ensemble_record.run_id}",
            f"input_dir={synthetic_root / 'train_images'}",
            f"output_dir={tmp_path / 'masks'}",
            f"paths.output_dir={tmp_path / 'work'}",
        ]
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (tmp_path / "work" / "cache").exists():
        time.sleep(0.05)  # members are being downloaded: the models load next
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143, err[-3000:]
    assert lines == ["segx: interrupted by SIGTERM"], err[-3000:]


@pytest.mark.parametrize("how", ["signal", "error"])
def test_a_run_created_but_not_yet_in_its_scope_never_stays_running(tmp_path, how):
    """The window that once left an ensemble RUNNING under load: after the run exists, before
    its run_scope. A signal (or a failed check) there ends the command; segx.cli ends the run
    KILLED (or FAILED) on its way out."""
    from segx import cli, signals

    seed_store(tmp_path)  # an empty store: creating one is not what this test is about
    client = tracking.connect(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracking.experiment_id(client, "segx", str(tmp_path / "artifacts"))
    created = []
    try:
        with pytest.raises(SystemExit) as exited:
            with cli.reported(cli.signal_count()), cli.signals_raise():
                created.append(tracking.start_run(client, exp, "window", {tracking.ROLE: "ensemble"}))
                if how == "signal":
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)  # the handler raises here
                raise SegxError("a check that failed after the run was created")
    finally:  # the command "ended": this process (pytest) goes on, so its exit state is reset
        signals._exiting = False
        signals._killed_runs.clear()
    (run_id,) = created
    expected = {"signal": ("KILLED", 130), "error": ("FAILED", 2)}[how]
    assert (client.get_run(run_id).info.status, exited.value.code) == expected
    assert not tracking._unscoped


def _model_ids(store: Path) -> list[tuple[str]]:
    with contextlib.closing(sqlite3.connect(f"{(store / 'mlflow.db').as_uri()}?mode=ro", uri=True)) as con:
        return con.execute("SELECT model_id FROM logged_models").fetchall()


def _ensemble_runs(store: Path) -> list:
    client = tracking.connect(f"sqlite:///{store}/mlflow.db", create=False)
    return tracking.find_runs(client, client.get_experiment_by_name("segx").experiment_id, "ensemble", status=None)


def test_sigterm_while_the_ensembles_pyfunc_model_is_pending_fails_it_and_exits_at_once(tmp_path, member_store):
    """SIGTERM while the ensemble's pyfunc logged model is PENDING (its files being written): the
    run ends KILLED, the model FAILED (never PENDING for good), no member names the KILLED
    ensemble, and the process exits within seconds. The process is stopped (SIGSTOP) as soon as
    the model exists, so the signal lands while it is PENDING; a try that came too late is repeated."""
    from mlflow.entities import LoggedModelStatus

    for attempt in range(5):
        store = copy_store(member_store[0], tmp_path / f"store{attempt}")

        def ensemble_models(store: Path = store, earlier: frozenset = frozenset()) -> list[int]:
            """Statuses of the ensemble models this try's command made (the copied store may hold
            ensembles that earlier tests built)."""
            with contextlib.closing(sqlite3.connect(f"{(store / 'mlflow.db').as_uri()}?mode=ro", uri=True)) as con:
                rows = con.execute(
                    "SELECT l.model_id, l.status FROM logged_models l JOIN tags t ON t.run_uuid = l.source_run_id "
                    "WHERE t.key = 'segx.role' AND t.value = 'ensemble'"
                ).fetchall()
            return [status for model_id, status in rows if model_id not in earlier]

        earlier_models = frozenset(m for (m,) in _model_ids(store))
        earlier_runs = {r.info.run_id for r in _ensemble_runs(store)}
        ensemble_models = functools.partial(ensemble_models, earlier=earlier_models)
        proc = start(ensemble_args(store))
        deadline = time.monotonic() + 300
        found: list[int] = []
        while proc.poll() is None and time.monotonic() < deadline and not found:
            with contextlib.suppress(sqlite3.OperationalError):  # locked by the writer for a moment
                found = ensemble_models()
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGSTOP)
        pending = ensemble_models() == [LoggedModelStatus.PENDING.to_int()]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
        took = time.monotonic() - sent
        if pending:
            break
    assert pending, "the model was READY before the signal in every try"
    assert proc.returncode == 143, err[-3000:]
    client = tracking.connect(f"sqlite:///{store}/mlflow.db", create=False)
    experiment = client.get_experiment_by_name("segx").experiment_id
    (run,) = [r for r in _ensemble_runs(store) if r.info.run_id not in earlier_runs]
    assert run.info.status == "KILLED"
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [str(m.status) for m in models] == ["FAILED"]
    for member in tracking.find_runs(client, experiment, "member"):  # only FINISHED ensembles are named
        assert run.info.run_id not in member.data.tags.get("segx.ensembles", ""), member.data.tags
    assert took < 10, f"{took:.1f} s from SIGTERM to exit"
