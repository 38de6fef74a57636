"""The supervisor of a shared MLflow tracking server, as a team runs one (the command is
:mod:`segx.server`): PostgreSQL holds the runs, and the server proxies the artifacts
(``--serve-artifacts``), so clients need no shared filesystem.

    python -m segx.server                 # or: make server; Ctrl-C stops MLflow, then PostgreSQL
    python -m segx.train mlflow.tracking_uri=http://127.0.0.1:5001 ...

PostgreSQL comes from the ``pgserver`` wheel (its ``initdb`` and ``postgres``; nothing is installed
system-wide), or from ``postgres_bin`` (e.g. Debian's ``/usr/lib/postgresql/16/bin``). Its data
lives in ``<folder>/postgres`` and it listens on 127.0.0.1 only; MLflow's artifacts go to
``<folder>/artifacts``. PostgreSQL refuses to run as root: as root it runs as ``nobody``.

Library use (the tests): ``with tracking_server(folder, ServerSettings(port=5001)) as uri: ...``
starts both, yields the tracking URI and stops both, whatever happens in the block. MLflow runs
as a subprocess (``python -m mlflow server``): this module does not import mlflow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from segx.errors import SegxError
from segx.signals import signals_deferred

DATABASE = "mlflow"
_PG_USER = "postgres"  # the database role MLflow connects as (trust auth on 127.0.0.1: see _initdb)


def find_postgres_bin(configured: str | os.PathLike | None = None) -> Path:
    """The folder holding ``initdb`` and ``postgres``: ``configured``, or the pgserver wheel's."""
    if configured:
        folder = Path(configured).expanduser()
        fix = "point postgres_bin at a folder with initdb and postgres (Debian: /usr/lib/postgresql/<N>/bin)"
    else:
        # The wheel's binaries, found without importing pgserver (its import sets up locks and
        # folders under $XDG_RUNTIME_DIR that segx does not use).
        spec = importlib.util.find_spec("pgserver")
        locations = list(spec.submodule_search_locations or []) if spec else []
        folder = Path(locations[0]) / "pginstall" / "bin" if locations else Path("<pgserver not installed>")
        fix = "install segx's dependencies (make install, or pip install pgserver), or set postgres_bin"
    for name in ("initdb", "postgres"):
        if not os.access(folder / name, os.X_OK):
            raise SegxError(f"PostgreSQL's {name} is not in {folder}; {fix}")
    return folder


def _major_version(bin_dir: Path) -> str:
    """'16' from 'postgres (PostgreSQL) 16.2' (a data dir is tied to one major version)."""
    out = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, timeout=30)
    try:
        return out.stdout.split()[-1].split(".")[0]
    except IndexError:
        raise SegxError(
            f"{bin_dir / 'postgres'} --version printed nothing ({out.stderr.strip()[:200]}); "
            "check the PostgreSQL binaries (postgres_bin)"
        ) from None


@dataclass(frozen=True)
class _User:
    name: str
    uid: int
    gid: int

    def popen_args(self) -> dict:
        """subprocess arguments that run a command as this user (only when it is not us)."""
        if self.uid == os.geteuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _postgres_user() -> _User:
    """Who runs PostgreSQL: the current user, or ``nobody`` for root (postgres refuses root)."""
    try:
        entry = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise SegxError(
            "PostgreSQL refuses to run as root and this system has no user 'nobody' to run it "
            "as; run segx.server as an ordinary user"
        ) from None
    return _User(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _let_enter(path: Path, user: _User) -> list[str]:
    """Make ``path`` reachable for ``user`` by adding o+x (enter, not list) to the folders above
    it that lack it (a root-only temp folder); returns the folders changed."""
    if user.uid == os.geteuid():
        return []
    changed = []
    for folder in reversed(path.resolve().parents):
        mode = folder.stat().st_mode
        if folder.stat().st_uid != user.uid and not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            changed.append(str(folder))
    return changed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port(host: str, port: int, key: str) -> None:
    """One line if something already listens on ``port`` (before a process fails on it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is free
        try:
            sock.bind(("127.0.0.1" if host in ("0.0.0.0", "") else host, port))
        except socket.gaierror as exc:  # not "in use": the name does not resolve to an address here
            raise SegxError(
                f"host={host!r} is not an address of this machine ({exc.strerror}); use host=127.0.0.1 "
                "or this machine's name"
            ) from None
        except OSError as exc:
            raise SegxError(
                f"port {port} on {host} is in use ({exc.strerror}); stop what listens there or choose another {key}=..."
            ) from None


def _last_line(log: Path, start: int = 0) -> str:
    """The last line worth quoting in a one-line error, of what the log got from byte ``start``
    on (the logs are appended to, one start after another)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(start)
            lines = [ln.strip() for ln in handle.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    useful = [ln for ln in lines if any(w in ln for w in ("FATAL", "ERROR", "Error", "error"))]
    return (useful or lines or ["no output"])[-1][:300]


def _check_data_dir(data: Path, major: str, user: _User) -> None:
    """A data dir this PostgreSQL can start: same major version, owned by its user, not in use."""
    version_file = data / "PG_VERSION"
    if not version_file.exists():
        if data.exists() and any(data.iterdir()):
            raise SegxError(
                f"{data} is not empty and holds no PostgreSQL data (no PG_VERSION); remove it or choose another folder"
            )
        return
    found = version_file.read_text().strip()
    if found != major:
        raise SegxError(
            f"the PostgreSQL data in {data} was created by PostgreSQL {found}, these binaries are "
            f"{major}; use PostgreSQL {found}'s binaries (postgres_bin), or another folder "
            f"(or upgrade it with pg_upgrade)"
        )
    owner = data.stat().st_uid
    if owner != user.uid:
        name = next((p.pw_name for p in pwd.getpwall() if p.pw_uid == owner), str(owner))
        raise SegxError(
            f"{data} belongs to user {name}, but PostgreSQL runs as {user.name} here; "
            f"run as {name}, or chown -R {user.name} {data}"
        )
    pid_file = data / "postmaster.pid"
    if pid_file.exists():
        try:
            pid = int(pid_file.read_text().split()[0])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            return  # stale: postgres itself removes a lock file whose process is gone
        if "postgres" in cmd:
            raise SegxError(
                f"the PostgreSQL data in {data} is in use by a running server (pid {pid}); "
                f"stop it (kill -INT {pid}) or choose another folder"
            )


def _initdb(bin_dir: Path, data: Path, user: _User) -> None:
    """A new cluster. Trust authentication on 127.0.0.1 only: whoever can reach that address can
    reach the MLflow server in front of it, which has no authentication of its own either."""
    data.mkdir(parents=True, exist_ok=True)
    if user.uid != os.geteuid():
        os.chown(data, user.uid, user.gid)
    data.chmod(0o700)
    result = subprocess.run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            _PG_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ],
        capture_output=True,
        text=True,
        cwd=str(data),
        timeout=300,
        **user.popen_args(),
    )
    if result.returncode != 0:
        text = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise SegxError(
            f"initdb failed for {data} ({text[-1][:300] if text else result.returncode}); "
            "remove the folder and try again, or check postgres_bin"
        )


def _connect(port: int, database: str = "postgres", timeout: float = 2.0):
    import psycopg2

    return psycopg2.connect(
        host="127.0.0.1", port=port, user=_PG_USER, dbname=database, connect_timeout=max(1, int(timeout))
    )


def _wait_postgres(proc: subprocess.Popen, port: int, log: Path, start: int, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise SegxError(
                f"PostgreSQL stopped at start (exit {proc.returncode}): {_last_line(log, start)}; see {log}"
            )
        try:
            _connect(port).close()
            return
        except Exception:  # noqa: BLE001 - not accepting connections yet
            if time.monotonic() > deadline:
                raise SegxError(
                    f"PostgreSQL did not accept connections on 127.0.0.1:{port} in time; see {log}, or raise timeout"
                ) from None
            time.sleep(0.2)


def _create_database(port: int) -> None:
    con = _connect(port)
    try:
        con.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with con.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        con.close()


def start_postgres(folder: Path, port: int, bin_dir: Path, timeout: float) -> subprocess.Popen:
    """PostgreSQL on 127.0.0.1:``port`` with its data in ``folder/postgres`` (created if new),
    and the database MLflow uses; returns the postmaster process (its own session)."""
    user = _postgres_user()
    data = folder / "postgres"
    _check_data_dir(data, _major_version(bin_dir), user)
    _check_port("127.0.0.1", port, "postgres_port")
    data.mkdir(parents=True, exist_ok=True)
    for path in (data, bin_dir):
        changed = _let_enter(path, user)
        if changed:
            print(
                f"segx: PostgreSQL runs as '{user.name}' (it refuses root): added o+x (enter, not list) "
                f"to {', '.join(changed)}",
                flush=True,
            )
    if not (data / "PG_VERSION").exists():
        _initdb(bin_dir, data, user)
    log = folder / "postgres.log"
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": "",
        "logging_collector": "off",
    }
    args = [str(bin_dir / "postgres"), "-D", str(data)]
    for key, value in settings.items():
        args += ["-c", f"{key}={value}"]
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        # Its own session: a Ctrl-C in the terminal reaches segx only, which stops MLflow first.
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(data),
            start_new_session=True,
            **user.popen_args(),
        )
    try:
        _wait_postgres(proc, port, log, start, time.monotonic() + timeout)
        _create_database(port)
    except BaseException:
        stop_postgres(proc)
        raise
    return proc


def start_mlflow(
    folder: Path,
    host: str,
    port: int,
    postgres_port: int,
    timeout: float,
    workers: int = 1,
    extra_args: list[str] | tuple[str, ...] = (),
) -> subprocess.Popen:
    """``mlflow server`` on ``host:port`` with the PostgreSQL store and proxied artifacts in
    ``folder/artifacts``; returns once its /health answers (its own session, for stopping)."""
    _check_port(host, port, "port")
    artifacts = (folder / "artifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    store = f"postgresql+psycopg2://{_PG_USER}@127.0.0.1:{postgres_port}/{DATABASE}"  # psycopg2: SQLAlchemy 2.1 defaults to psycopg 3
    # --app-name segx: MLflow's app, opening experiments on their runs table (segx/tracking/ui_app.py).
    args = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        "segx",
        "--backend-store-uri",
        store,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *extra_args,
    ]
    # MLflow's job runner (GenAI scorers, trace roll-ups; segx uses neither) would add seven
    # worker processes to every server.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = folder / "mlflow.log"
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    probe = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/health"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise SegxError(
                    f"the MLflow server stopped at start (exit {proc.returncode}): {_last_line(log, start)}; see {log}"
                )
            try:
                with urllib.request.urlopen(probe, timeout=2) as answer:
                    if answer.status == 200:
                        return proc
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SegxError(
                    f"the MLflow server did not answer {probe} within {timeout:.0f} s; see {log}, or raise timeout"
                )
            time.sleep(0.3)
    except BaseException:
        stop_group(proc)
        raise


def _group_members(pgid: int) -> list:
    """Live (not zombie) processes of a process group: a server's workers outlive their parent."""
    import psutil

    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def _wait_gone(proc: subprocess.Popen, grace: float) -> bool:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reaps our own child
        if not _group_members(proc.pid):
            return True
        time.sleep(0.1)
    return False


def stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 15.0) -> None:
    """Stop a process started with ``start_new_session`` and everything in its group: ``first``,
    then SIGKILL after ``grace`` seconds."""
    for signum, wait in ((first, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
        if _wait_gone(proc, wait):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1)


def stop_postgres(proc: subprocess.Popen) -> None:
    """PostgreSQL's "fast" shutdown (SIGINT: ends sessions, writes a checkpoint), then harder."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    if not _wait_gone(proc, 60.0):
        stop_group(proc, signal.SIGQUIT, 5.0)  # "immediate": recovers from WAL at the next start
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1)


def tracking_uri(host: str, port: int) -> str:
    return f"http://{socket.gethostname() if host in ('0.0.0.0', '') else host}:{port}"


# `mlflow server` options segx.server gives itself, and the key that sets each one (None: fixed).
OWN_OPTIONS = {
    "--backend-store-uri": None,
    "--default-artifact-root": None,
    "--artifacts-destination": None,
    "--serve-artifacts": None,
    "--no-serve-artifacts": None,
    "--artifacts-only": None,
    "--app-name": None,
    "--host": "host",
    "-h": "host",
    "--port": "port",
    "-p": "port",
    "--workers": "workers",
    "-w": "workers",
}
OWNER_FILE = "segx-server.json"  # in the server's folder: the segx.server process that runs it


def _leftovers(folder: Path) -> list:
    """PostgreSQL and MLflow processes (with their children) of an earlier server on ``folder``:
    those whose command line names its data or artifacts folder."""
    import psutil

    marks = (str(folder / "postgres"), str((folder / "artifacts").resolve()))
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and any(m in part for part in proc.info["cmdline"] or [] for m in marks):
            for p in [proc, *proc.children(recursive=True)]:
                found[p.pid] = p
    return list(found.values())


def _claim(folder: Path) -> None:
    """Make this process the folder's server. An earlier segx.server that was killed (kill -9,
    an out-of-memory kill) could not stop its PostgreSQL and MLflow: stop them now, after
    checking that their owner is gone; a live owner means the folder is in use."""
    import psutil

    owner_file = folder / OWNER_FILE
    try:
        owner = int(json.loads(owner_file.read_text()).get("pid", 0))
    except (OSError, ValueError, AttributeError):
        owner = 0
    if owner and owner != os.getpid() and psutil.pid_exists(owner):
        try:
            alive = "segx" in " ".join(psutil.Process(owner).cmdline())
        except psutil.Error:
            alive = False
        if alive:
            raise SegxError(
                f"another segx.server (pid {owner}) runs on {folder}; stop it first (Ctrl-C there, or "
                f"kill {owner}), or choose another folder=..."
            )
    left = _leftovers(folder)
    if left:
        print(
            f"segx: stopping {len(left)} PostgreSQL/MLflow process(es) left on {folder} by a segx.server that was "
            f"killed{f' (pid {owner})' if owner else ''}",
            flush=True,
        )
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(left, timeout=30)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        with contextlib.suppress(OSError):  # PostgreSQL's lock of a postmaster killed outright
            pid_file = folder / "postgres" / "postmaster.pid"
            if pid_file.exists() and not psutil.pid_exists(int(pid_file.read_text().split()[0])):
                pid_file.unlink()
    owner_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


@dataclass
class _Running:
    uri: str
    postgres: subprocess.Popen
    mlflow: subprocess.Popen


@dataclass(frozen=True)
class ServerSettings:
    """How to run the server: MLflow on ``host:port``, PostgreSQL on ``postgres_port`` (None: a
    free port) from the binaries in ``postgres_bin`` (None: the pgserver wheel's), each start
    waiting at most ``timeout`` seconds; ``workers`` MLflow worker processes and ``extra_args``
    for ``mlflow server``."""

    host: str = "127.0.0.1"
    port: int = 5001
    timeout: float = 120.0
    postgres_port: int | None = None
    postgres_bin: str | os.PathLike | None = None
    workers: int = 1
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Library callers may pass numbers as strings and the arguments as a list: kept as the
        # servers use them (and hashable, as a frozen dataclass is).
        object.__setattr__(self, "port", int(self.port))
        object.__setattr__(self, "timeout", float(self.timeout))
        object.__setattr__(self, "workers", int(self.workers))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))


@contextlib.contextmanager
def _running(folder: Path, settings: ServerSettings) -> Iterator[_Running]:
    folder.mkdir(parents=True, exist_ok=True)
    binaries = find_postgres_bin(settings.postgres_bin)
    _claim(folder)  # before the ports are checked: a killed server's leftovers hold them
    pg = mlflow = None
    try:
        pg_port = int(settings.postgres_port) if settings.postgres_port else free_port()
        _check_port(settings.host, settings.port, "port")  # before PostgreSQL starts for nothing
        pg = start_postgres(folder, pg_port, binaries, settings.timeout)
        mlflow = start_mlflow(
            folder, settings.host, settings.port, pg_port, settings.timeout, settings.workers, settings.extra_args
        )
        yield _Running(tracking_uri(settings.host, settings.port), pg, mlflow)
    finally:
        with signals_deferred():  # a second Ctrl-C must not leave PostgreSQL running
            if mlflow is not None:
                stop_group(mlflow)
            if pg is not None:
                stop_postgres(pg)
            with contextlib.suppress(OSError):
                (folder / OWNER_FILE).unlink()


@contextlib.contextmanager
def tracking_server(folder: str | os.PathLike, settings: ServerSettings | None = None) -> Iterator[str]:
    """Start PostgreSQL (data in ``folder/postgres``) and ``mlflow server`` on ``host:port``
    (artifacts in ``folder/artifacts``), yield the tracking URI, and stop MLflow, then PostgreSQL,
    when the block ends, however it ends (``settings``: :class:`ServerSettings`, None: its
    defaults). The same folder (and ports) starts the same server again."""
    with _running(Path(folder).absolute(), settings or ServerSettings()) as server:
        yield server.uri


def serve(folder: str | os.PathLike, settings: ServerSettings) -> None:
    """Run the server until Ctrl-C/SIGTERM, or until MLflow or PostgreSQL stops by itself."""
    folder = Path(folder).absolute()
    started = False
    try:
        with _running(folder, settings) as server:
            started = True
            _watch(server, folder)
    finally:
        if started:
            print(f"segx: stopped MLflow, then PostgreSQL; runs and artifacts stay in {folder}", flush=True)


def _watch(server: _Running, folder: Path) -> None:
    """Print how to use the server, then wait, stopping if MLflow or PostgreSQL dies."""
    print(
        f"segx: MLflow tracking server: PostgreSQL store, artifacts proxied from {folder / 'artifacts'}\n"
        f"  clients:   mlflow.tracking_uri={server.uri}\n"
        f"  MLflow UI: {server.uri}\n"
        f"  logs:      {folder / 'mlflow.log'}, {folder / 'postgres.log'}\n"
        "  Ctrl-C stops MLflow, then PostgreSQL",
        flush=True,
    )
    while True:
        time.sleep(1.0)
        for name, proc, log in (
            ("MLflow", server.mlflow, "mlflow.log"),
            ("PostgreSQL", server.postgres, "postgres.log"),
        ):
            if proc.poll() is not None:
                raise SegxError(
                    f"{name} stopped by itself (exit {proc.returncode}): {_last_line(folder / log)}; see {folder / log}"
                )
