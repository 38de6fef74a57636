"""The one wrapper every command runs in: logging, the pre-Hydra checks, and how a command ends.

    @hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="predict")
    @cli.task
    def _hydra_main(cfg): return run_predict(cfg)

    def main() -> None:
        cli.run(_hydra_main, "predict")

How a command ends, whatever it is:

* a :class:`SegxError` (bad input, config or store): ``segx: error: <one line>`` on stderr, exit 2;
* SIGINT (Ctrl-C) or SIGTERM: one line on stderr, exit 130 or 143 (128 + the signal);
* any other exception is a bug in segx or a library: its traceback is the useful report.

Signals are turned into :class:`Interrupted` and counted by :mod:`segx.signals` (re-exported
here); this wrapper looks at the count when the command ends, so an interrupted command never
exits 0. What lower layers must do on the way out (end runs left open, print a sweep's summary)
they register there; this module imports none of them. No MLflow, TensorFlow or Hydra is
imported at module level.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from segx import signals
from segx.errors import SegxError

# The signal API, where commands and tests have always found it.
from segx.signals import (  # noqa: F401
    Interrupted,
    install,
    note_killed,
    pending_signal,
    signal_count,
    signal_since,
    signals_deferred,
    signals_raise,
)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _exit_interrupted(signum: int) -> None:
    signals.begin_exit()  # a second Ctrl-C from here on exits at once
    signals.run_failure_hooks("KILLED")  # runs not yet in their scope end KILLED, not RUNNING
    _flush()
    signals.write_stderr(signals.interrupted_line(signum))
    sys.exit(128 + signum)


def exit_on_error(exc: SegxError) -> None:
    signals.begin_exit()
    signals.run_failure_hooks("FAILED", str(exc)[:5000])
    _flush()
    print(f"segx: error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextlib.contextmanager
def reported(mark: int = 0) -> Iterator[None]:
    """End the command as the module docstring says. A signal received since ``mark`` wins
    over any error: libraries sometimes turn a signal into an error of their own."""
    try:
        yield
    except SystemExit:
        raise
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None) or signal_since(mark) or signal.SIGINT
        _exit_interrupted(int(signum))
    except SegxError as exc:
        if signal_since(mark) is not None:
            _exit_interrupted(signal_since(mark))
        exit_on_error(exc)
    except Exception as exc:
        if signal_since(mark) is not None:
            _exit_interrupted(signal_since(mark))
        from segx.errors import disk_full

        full = disk_full(exc)  # not a bug: the machine's state, said in one line
        if full:
            exit_on_error(SegxError(full))
        signals.run_failure_hooks("FAILED", f"{type(exc).__name__}: {exc}"[:5000])
        raise
    if signal_since(mark) is not None:  # a library swallowed it: the command did not finish
        _exit_interrupted(signal_since(mark))


def task(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorate a Hydra task (under ``@hydra.main``): its errors and signals end the command as
    described above, before Hydra's own handler can print a traceback. Its return value (the
    metric a sweeper optimises) passes through."""

    @functools.wraps(function)
    def wrapped(cfg: Any) -> Any:
        with _job_log(), reported():  # the log holds the error line too
            return function(cfg)

    return wrapped


class _Tee:
    """A text stream that also writes to a log file; everything else is the stream's own."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        with contextlib.suppress(Exception):
            self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self._log.flush()
        self._stream.flush()

    def close(self) -> None:
        """Not the console's to close: a logging handler created during the job holds this tee
        and closes its stream when the next sweep job reconfigures logging (absl does)."""

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _job_log() -> Iterator[None]:
    """What the job prints, also in ``<Hydra job folder>/<command>.log`` (as the Lightning-Hydra
    template keeps a log per run); nothing if Hydra's runtime is not set (a library call) or the
    command keeps no record (``hydra.output_subdir: null``: ``segx.data.check`` writes nothing)."""
    from pathlib import Path

    try:
        from hydra.core.hydra_config import HydraConfig

        runtime = HydraConfig.get()
        if runtime.output_subdir is None:
            raise LookupError("no record kept")
        path = Path(runtime.runtime.output_dir) / f"{runtime.job.name}.log"
        log = open(path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 - closed below
    except Exception:  # noqa: BLE001 - no Hydra run folder: no log file, the job runs as ever
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        log.close()


# Flags after which Hydra answers something other than running the task, or composes another
# primary config: segx's pre-checks stay out of the way.
HYDRA_ONLY_FLAGS = ("-sc", "--shell-completion", "-h", "--help", "--hydra-help", "-cn", "--config-name")


def _register_resolvers() -> None:
    """``${segx_groups:data,backbone}`` in a --help template: each group with its options."""
    from omegaconf import OmegaConf

    def groups(*names: str) -> str:
        from segx.config import group_options

        return "\n".join(f"{n}: {' | '.join(group_options(n))}" for n in names)

    if not OmegaConf.has_resolver("segx_groups"):
        OmegaConf.register_new_resolver("segx_groups", groups)


def preflight(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Checks run on the command line before Hydra starts: an unknown group option or config
    key becomes one line with a suggestion (Hydra's own messages span many lines)."""
    from segx.config import (
        CONF_DIR,
        check_config_files,
        check_group_choices,
        check_override_keys,
        check_override_values,
        search_dirs,
    )

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in HYDRA_ONLY_FLAGS or a.startswith(("--shell-completion=", "--config-name=")) for a in argv):
        return  # Hydra's own flags (shell completion, help, another primary config): Hydra's to answer
    dirs = [CONF_DIR, *search_dirs(argv)]  # the folders Hydra will search, a user's own included
    check_config_files(dirs)  # before anything composes them
    check_group_choices(argv, dirs)
    check_override_values(config_name, argv, dirs)
    check_override_keys(config_name, argv, dirs)
    _check_output_dir(config_name, argv)
    if config_name == "train" and any(a in ("-m", "--multirun") for a in argv):
        _check_sweep(config_name, argv, dirs)


def _check_sweep(config_name: str, argv: Sequence[str], dirs) -> None:
    """The launcher a sweep asks for can run here (sbatch exists, the partition exists, no more
    joblib jobs than cores, GPUs where TensorFlow sees them), before any job is submitted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from segx.config import compose_with_hydra
    from segx.training.resources import check_launcher, cpu_cores
    from segx.workflows.hydra_job import sweep_size

    given = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(given)
    except Exception:  # noqa: BLE001 - Hydra reports a malformed override itself
        return
    # One job's config stands for all (launcher settings are not swept): first value of each sweep.
    first = [
        o.input_line if not o.is_sweep_override() else f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        for o in parsed
    ]
    try:
        cfg = compose_with_hydra(config_name, first, dirs)
    except Exception:  # noqa: BLE001 - a bad override: Hydra says so in its own words
        return
    choice = cfg.hydra.runtime.choices.get("hydra/launcher", "basic")
    launcher = _plain(cfg.hydra.launcher)
    task = [o.input_line for o in parsed if not o.is_hydra_override()]
    check_launcher(launcher, str(choice), sweep_size(task), cpu_cores(), _plain(cfg.trainer))


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=False)


def _check_output_dir(config_name: str, argv: Sequence[str]) -> None:
    """Hydra creates its run folder under ``paths.output_dir`` before segx code runs; where it
    cannot, Hydra prints its own traceback. Say it in one line instead (segx writes its store,
    splits and caches there too)."""
    from pathlib import Path

    from segx.config import compose

    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "hydra"))]
    try:
        folder = Path(str(compose(config_name, overrides).paths.output_dir)).absolute()
    except Exception:  # noqa: BLE001 - a sweep or a bad override: Hydra reports those itself
        return
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" ({existing} is not)"
        raise SegxError(
            f"paths.output_dir={folder} is not a writable folder{where}; choose one, "
            "e.g. paths.output_dir=/tmp/segx-outputs"
        )


def run(entry: Callable[[], Any], config_name: str | None = None) -> Any:
    """Run one command: ``entry()`` is a ``@hydra.main`` function (then ``config_name`` names
    its config, for the pre-Hydra checks) or a plain function for commands without Hydra."""
    if config_name is None:
        # Hydra commands get their logging from Hydra (conf/hydra/job_logging/segx.yaml: the
        # console and the job's log file); configuring it here too printed --info twice.
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    install()
    with reported(), signals_raise():
        if config_name is not None:
            _register_resolvers()
            preflight(config_name)
            if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
                # One sweep folder for every job, whichever process resolves it (conf/hydra/default.yaml).
                import time

                os.environ.setdefault("SEGX_SWEEP_STAMP", time.strftime("%Y-%m-%d_%H-%M-%S"))
        try:
            result = entry()
        finally:
            signals.run_end_hooks()  # a launcher that raised (a job SLURM killed) still gets its summary
    _flush()
    # From here (the interpreter's teardown) a signal exits at once with 128 + its number.
    return result
