"""SIGINT and SIGTERM, the segx way: raised as :class:`Interrupted` (a ``KeyboardInterrupt``)
inside work that must stop cleanly, counted always, held back while a final status is written.

Every signal is counted because some library code swallows the exception (a handler that
catches everything, a finaliser, ``contextlib.suppress(BaseException)``): ``tracking.run_scope``
and ``segx.cli`` compare counts when they end, so an interrupted command never ends FINISHED or
exits 0. A low module: the tracking layer and the command wrapper both use it, neither imports
the other for it. Nothing is installed at import: :func:`install` (the command line) or
:func:`signals_raise` (a block of work) does it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # every SIGINT/SIGTERM this process got, in order
_raising = 0  # > 0 while work runs that a signal must stop by an exception (see _on_signal)
_defer = 0  # > 0 while a final status is written: signals are counted, not raised
_exiting = False  # the command is ending: one more signal ends it at once
_killed_runs: list[str] = []  # runs ended KILLED, for the one-line message


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM raised as an exception, so that runs end KILLED and the command exits
    with 128 + the signal number. A ``KeyboardInterrupt``: code that handles Ctrl-C handles it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_count() -> int:
    """How many SIGINT/SIGTERM this process has received; compare two counts to see whether
    a signal arrived in between, even one that some library swallowed."""
    return len(_received)


def signal_since(mark: int) -> int | None:
    """The first signal received after :func:`signal_count` returned ``mark``, or None."""
    return _received[mark] if len(_received) > mark else None


def note_killed(run_id: str) -> None:
    _killed_runs.append(run_id)


def _quiet(record: logging.LogRecord) -> bool:
    return record.name.startswith("segx")


def _silence_libraries() -> None:
    """After a signal, libraries log what it broke (interrupted queries, cursors that no longer
    close) with tracebacks: the command is ending and says so in one line, so only segx speaks."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if _quiet not in handler.filters:
                handler.addFilter(_quiet)


def _exit_now() -> None:
    _write_stderr(_interrupted_line(_received[0]))
    os._exit(128 + _received[0])


def _on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    if len(_received) == 1:
        _silence_libraries()
    if _exiting or not _raising:
        # Before the work starts (imports), after it ended (the interpreter's teardown) or on a
        # second signal while exiting: nothing to clean up, leave now with the first signal's code.
        _exit_now()
    if _defer:
        return  # counted; raised when the protected section ends
    raise Interrupted(signum)


def _unraisable(info: Any) -> None:
    """A signal raised inside a finaliser or a weakref callback (garbage collection runs them
    anywhere) is swallowed by Python with a traceback. Print nothing, and raise the signal
    again in the code that runs next: a timer signal shortly after, outside the finaliser."""
    if isinstance(info.exc_value, Interrupted):
        if _raising and not _exiting:
            signal.setitimer(signal.ITIMER_REAL, 0.02)
        return
    sys.__unraisablehook__(info)


def _on_alarm(signum: int, frame: Any) -> None:
    if _received and _raising and not _exiting and not _defer:
        raise Interrupted(_received[0])


def install() -> None:
    """Handle SIGINT/SIGTERM the segx way for the whole process (command line only: a library
    user keeps their own handlers, and :func:`signals_raise` sets them for a run's duration)."""
    if not _main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _on_signal)
    if hasattr(signal, "setitimer"):
        signal.signal(signal.SIGALRM, _on_alarm)
        sys.unraisablehook = _unraisable


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM raise :class:`Interrupted` (and are counted) inside this block.

    Installs the handlers for the block's duration if they are not installed already (a
    library call, e.g. from a notebook or a test); a no-op outside the main thread, where
    Python never runs signal handlers.
    """
    global _raising
    if not _main_thread():
        yield
        return
    previous = {}
    if not all(signal.getsignal(s) is _on_signal for s in SIGNALS):
        previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    _raising += 1
    try:
        yield
    finally:
        _raising -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A section no signal may cut short (a run's final status write): SIGINT/SIGTERM are
    blocked for this thread and, if another thread takes one (Python then runs the handler in
    the main thread all the same), only counted. One that arrived meanwhile is raised at the end."""
    global _defer
    mark = signal_count()
    blocked = _main_thread() and hasattr(signal, "pthread_sigmask")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS) if blocked else None
    _defer += 1
    try:
        yield
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # pending ones are handled now
        _defer -= 1
    if not _defer and signal_since(mark) is not None and sys.exc_info()[0] is None:
        raise Interrupted(signal_since(mark))


def pending_signal() -> int | None:
    """A SIGINT/SIGTERM that is blocked and waiting (inside :func:`signals_deferred`)."""
    if not hasattr(signal, "sigpending"):
        return None
    waiting = signal.sigpending()
    return next((int(s) for s in SIGNALS if s in waiting), None)


def _write_stderr(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode(errors="replace"))


def _interrupted_line(signum: int) -> str:
    name = signal.Signals(signum).name
    runs = ", ".join(dict.fromkeys(_killed_runs))
    ended = f"; MLflow run {runs} ended KILLED" if runs else ""
    return f"segx: interrupted by {name}{ended}"


def begin_exit() -> None:
    """The command is ending: from now on one more signal ends the process at once."""
    global _exiting
    _exiting = True


def interrupted_line(signum: int) -> str:
    """The one line a command prints when a signal stopped it (with the runs it ended KILLED)."""
    return _interrupted_line(signum)


def write_stderr(text: str) -> None:
    _write_stderr(text)


# What a command runs on its way out, registered by the layers that need it (runs created but
# not yet inside their run scope end; a sweep prints its summary). segx.cli calls them without
# importing those layers.
_on_failure: list[Callable[[str, str | None], list[str]]] = []
_on_end: list[Callable[[], None]] = []


def on_failure(hook: Callable[[str, str | None], list[str]]) -> None:
    """``hook(status, failure)`` runs when a command ends KILLED or FAILED; it returns the MLflow
    runs it ended (named in the interrupted line)."""
    if hook not in _on_failure:
        _on_failure.append(hook)


def on_end(hook: Callable[[], None]) -> None:
    """``hook()`` runs when a command's work ends, however it ends."""
    if hook not in _on_end:
        _on_end.append(hook)


def run_failure_hooks(status: str, failure: str | None = None) -> None:
    for hook in list(_on_failure):
        with contextlib.suppress(Exception):
            for run_id in hook(status, failure) or ():
                if status == "KILLED":
                    note_killed(run_id)


def run_end_hooks() -> None:
    for hook in list(_on_end):
        hook()
