"""Helpers shared by several test files (no test file imports another): hand-made members and
ragged image folders, private copies of a session store, run statuses read straight from a
store, and the reproduce check of ``segx.info``'s printed command."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk
import yaml

from segx.data.ragged import Ragged
from segx.ensembling.members import Member
from segx.ensembling.probs import Cached
from tests.conftest import ROOT, store_overrides

# -- hand-made members (no network) -------------------------------------------------------------


def cached(stems=("a", "b", "c"), size=8, seed=0) -> Cached:
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(stems), size, size), bool)
    masks[:, : size // 2] = True
    probs = rng.integers(0, 256, (len(stems), size, size), dtype=np.uint8)
    return Cached(list(stems), Ragged.of(probs), Ragged.of(masks), Ragged.of(np.zeros((0, size, size, 3), np.uint8)))


def member(run_id: str, seed: int = 0, **changes) -> Member:
    base = Member(
        run_id=run_id,
        backbone="resnet18",
        arch="unet",
        fingerprint="f" * 16,
        view={"mode": "resize", "size": 8},
        val=cached(seed=seed),
        test=cached(("t1", "t2"), seed=seed + 1),
    )
    return dataclasses.replace(base, **changes)


# -- images of odd sizes -----------------------------------------------------------------------


# Odd sizes on purpose: none is a multiple of the 32 px patch, two are smaller than it.
SIZES = [(48, 80), (70, 41), (96, 64), (29, 50), (64, 64), (55, 99), (40, 40), (81, 57), (33, 120), (60, 30)]


def make_folder(root: Path, sizes=SIZES, seed: int = 0) -> Path:
    """Image/mask pairs of different sizes: bright discs on a noisy background."""
    rng = np.random.default_rng(seed)
    for name in ("train_images", "train_masks"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(2):
            r = int(rng.integers(3, max(4, min(h, w) // 4)))
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            cv2.circle(mask, (cx, cy), r, 255, -1)
        image[mask > 0] = 200
        cv2.imwrite(str(root / "train_images" / f"case{i:02d}.png"), image)
        cv2.imwrite(str(root / "train_masks" / f"case{i:02d}.png"), mask)
    return root


# -- stores ------------------------------------------------------------------------------------


def copy_store(src: Path, dst: Path) -> Path:
    """A private copy of a store: the database and every artifact copied, except the large
    ones (network weights, which tests only read), hard-linked; the experiment's, runs' and
    logged models' artifact locations moved to the copy."""

    def copy(source: str, target: str) -> None:
        if os.path.getsize(source) >= 1 << 20:
            os.link(source, target)
        else:
            shutil.copy2(source, target)

    dst.mkdir(parents=True)
    shutil.copy2(src / "mlflow.db", dst / "mlflow.db")
    shutil.copytree(src / "mlartifacts", dst / "mlartifacts", copy_function=copy)
    with contextlib.closing(sqlite3.connect(dst / "mlflow.db")) as con, con:
        con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (str(src), str(dst)))
        con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (str(src), str(dst)))
        con.execute(  # the logged models' files too: a test writing to the copy never reaches the original
            "UPDATE logged_models SET artifact_location = replace(artifact_location, ?, ?)", (str(src), str(dst))
        )
    return dst


def statuses(store: Path, role: str) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"{(store / 'mlflow.db').as_uri()}?mode=ro", uri=True)) as con:
        rows = con.execute(
            "SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'segx.role' AND t.value = ? ORDER BY r.start_time",
            (role,),
        ).fetchall()
    return [r[0] for r in rows]


def ensemble_args(store: Path) -> list[str]:
    return ["segx.ensemble", *store_overrides(store), "ensemble.members=[resnet18,mobilenetv2]"]


_EMPTY_STORE: list[Path] = []


def native_overrides(out: Path, root: Path, *extra: str) -> list[str]:
    """A tiny member of ``root``'s odd-sized images (make_folder), one epoch, into ``out``'s store."""
    return [
        *store_overrides(out),
        "data=folder",
        f"data.root={root}",
        "data.name=native",
        "data.val_fraction=0.3",
        "data.test_fraction=0.2",
        "trainer.epochs=1",
        "trainer.batch_size=4",
        "trainer.verbose=0",
        *extra,
    ]


def seed_store(out: Path) -> Path:
    """``out/mlflow.db``: an empty MLflow store (its schema migrated), copied from one segx made
    once in this process. Creating a store runs MLflow's ~50 schema migrations (seconds); a test
    whose subject is not store creation starts from this copy. Returns ``out``."""
    if not _EMPTY_STORE:
        import atexit
        import tempfile

        from segx import tracking

        folder = Path(tempfile.mkdtemp(prefix="segx-tests-empty-store-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        tracking.connect(f"sqlite:///{folder}/mlflow.db")
        _EMPTY_STORE.append(folder / "mlflow.db")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE[0], out / "mlflow.db")
    return out


# -- segx.info reproduce commands ---------------------------------------------------------------


def run_module(args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def info(run_id: str, out: Path, cwd=ROOT) -> str:
    result = run_module(["segx.info", f"run_id={run_id}", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def printed_command(text: str, module: str) -> list[str]:
    (line,) = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(f"python -m {module} ")]
    return shlex.split(line)[2:]  # the module and its arguments, without "python -m": run with this interpreter


def assert_reproduces_config(run_id: str, out: Path, cwd=ROOT) -> list[str]:
    """The printed ``segx.train`` command composes exactly the recorded config.yaml."""
    from segx import tracking

    text = info(run_id, out, cwd)
    command = printed_command(text, "segx.train")
    shown = run_module([*command, "--cfg", "job", "--resolve"], cwd=cwd)
    assert shown.returncode == 0, shown.stderr[-2000:]
    client = tracking.connect(f"sqlite:///{out}/mlflow.db", create=False)
    recorded = yaml.safe_load(tracking.download(client, run_id, "config.yaml").read_text())
    # Values from the environment are recorded as written (${oc.env:SEGX_OUTPUT_DIR,outputs}, the
    # default output folder included): the printed command rebuilds them in the same environment.
    from omegaconf import OmegaConf

    recorded = OmegaConf.to_container(OmegaConf.create(recorded), resolve=True)
    assert yaml.safe_load(shown.stdout) == recorded
    return command


def ensemble_run(client, experiment: str, record: dict | None, name: str) -> str:
    """An ensemble run in the store holding ``record`` as ensemble.json (None: no record)."""
    from segx import tracking

    run_id = tracking.start_run(client, experiment, name, {tracking.ROLE: "ensemble"})
    with tracking.run_scope(client, run_id):
        if record is not None:
            folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"segx-test-record-{run_id}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "ensemble.json").write_text(json.dumps(record))
            tracking.log_artifact(client, run_id, folder / "ensemble.json")
    return run_id


# -- DICOM ----------------------------------------------------------------------------------------


def ct_series(
    folder: Path,
    hu: np.ndarray,
    spacing,
    origin,
    direction,
    uid: str = "1.2.826.0.1.3680043.2.1125.1",
    shuffle: int | None = None,
) -> Path:
    """A CT series of ``hu`` (z, y, x) on that grid (ITK order), one file per slice (SimpleITK's "DICOM series from array" example): stored
    values hu + 1024 (RescaleIntercept -1024, slope 1). ``shuffle`` permutes the file names and
    InstanceNumbers, so neither follows the slice positions."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(hu)
    volume.SetSpacing(spacing)
    volume.SetOrigin(origin)
    volume.SetDirection(direction)
    order = list(range(hu.shape[0]))
    if shuffle is not None:
        random.Random(shuffle).shuffle(order)
    d = direction
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[0]):
        plane = volume[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": uid,
            "0008|0018": f"{uid}.{order[k] + 1}",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.10g}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(order[k] + 1),
            "0028|1053": "1",
            "0028|1052": "-1024",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"im{order[k]:04d}.dcm"))
        writer.Execute(plane)
    return folder


# -- a command in this process ------------------------------------------------------------------

# The commands ``python -m <module>`` runs; segx.data.check runs segx.check as the program.
_PROGRAMS = {"segx.data.check": "segx.check"}


def run_in_process(capfd, args, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` (``args``: the module, then its arguments) in this process:
    the module's ``main()`` (segx.cli.run: the pre-Hydra checks, Hydra's parsing and job, and how
    the command ends) with ``sys.argv`` as the interpreter sets it, in ``cwd``, ``env`` added to
    the environment. Returns what :func:`run_module` returns: the exit status and what the command
    wrote on stdout and stderr (``capfd``: Python's streams and file descriptors 1 and 2), the
    warnings a fresh interpreter would print (its default filters) added to stderr.

    For refusals and read-only commands: it spares a test the 5-10 s a fresh process spends
    importing TensorFlow and MLflow. What a command changes in the process it runs in (signal handlers, segx.signals' count
    and exit state, Hydra's singletons, the logging set-up, the environment, the working folder)
    is as a fresh process has it while the command runs, and as it was again afterwards. Tests of
    the console scripts, signals, servers and several processes start real processes instead."""
    import importlib
    import logging
    import signal
    import traceback
    import warnings

    from hydra.core.global_hydra import GlobalHydra

    from segx import signals

    module, *argv = args
    command = importlib.import_module(_PROGRAMS.get(module, module))
    sweep = sys.modules.get("segx.workflows.sweep")
    state = [(signals, "_received", []), (signals, "_killed_runs", []), (signals, "_exiting", False)]
    state += [(sweep, "_unfinished", [])] if sweep is not None else []
    saved_state = [(owner, name, getattr(owner, name)) for owner, name, _ in state]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    hooks = sys.unraisablehook
    root = logging.getLogger()
    loggers = [root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    saved_loggers = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    saved_argv, saved_env, saved_cwd = sys.argv, dict(os.environ), os.getcwd()
    capfd.readouterr()  # what the test printed before
    captured = (sys.stdout, sys.stderr)  # capfd's, closed after the test
    code: int | str | None = 0
    for owner, name, fresh in state:
        setattr(owner, name, [] if isinstance(fresh, list) else fresh)
    root.handlers, root.level = [], logging.WARNING  # as a fresh interpreter's: basicConfig and Hydra set theirs
    # Hydra's logging set-up (dictConfig) closes every handler the process has made: the command's
    # own, not pytest's or absl's (absl's would close the stream it holds, a capture of pytest's).
    earlier_handlers = logging._handlerList[:]
    logging._handlerList[:] = []
    GlobalHydra.instance().clear()
    try:
        sys.argv = [command.__file__, *map(str, argv)]
        os.chdir(cwd)
        os.environ.update(env or {})
        with warnings.catch_warnings(record=True) as caught:  # the filters segx and its libraries set stay
            try:
                code = command.main()
            except SystemExit as exc:
                code = exc.code
            except Exception:  # noqa: BLE001 - the interpreter prints the traceback and exits 1
                sys.stderr.write(traceback.format_exc())
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        os.environ.update({k: v for k, v in saved_env.items() if os.environ.get(k) != v})
        GlobalHydra.instance().clear()
        logging._handlerList[:] = earlier_handlers + logging._handlerList
        for lg, level, lg_handlers, propagate, disabled in saved_loggers:
            lg.setLevel(level)
            lg.handlers[:] = lg_handlers
            lg.propagate, lg.disabled = propagate, disabled
        for lg in [root, *logging.root.manager.loggerDict.values()]:
            for h in list(getattr(lg, "handlers", ())):  # a library's own, made while root had none (TensorFlow's)
                if getattr(h, "stream", None) in captured:
                    lg.removeHandler(h)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        sys.unraisablehook = hooks
        for owner, name, value in saved_state:
            setattr(owner, name, value)
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
        sys.stderr.write(f"{code}\n")
        code = 1
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # by default
    for w in caught:
        if not issubclass(w.category, hidden):
            sys.stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code or 0, out, err)
