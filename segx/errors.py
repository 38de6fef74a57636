"""User-facing errors: one line that names the file or key and says what to do next."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SegxError(Exception):
    """An error caused by input or configuration, reported as one line without a traceback."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' did you mean 'x'?' for the closest valid choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), sorted(choices), n=1, cutoff=0.5)
    return f" did you mean '{close[0]}'?" if close else ""


def look_up_option(name: str, choices: Iterable[str], what: str, where: str = "") -> str:
    """Return ``name`` if it is one of ``choices``, else raise with the closest choice named."""
    choices = list(choices)
    if name in choices:
        return name
    hint = f" (see {where})" if where else ""
    raise SegxError(
        f"unknown {what} '{name}';{suggest(name, choices) or ' choose one of ' + ', '.join(sorted(choices))}{hint}"
    )


_FULL_TEXT = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def disk_full(exc: BaseException | None) -> str | None:
    """If ``exc`` (or an exception it was raised from) is a full disk, one line naming the
    disk and what to do; else None. Full disks reach segx as OSError (ENOSPC, EDQUOT), as
    TensorFlow's ResourceExhaustedError and as SQLite's "database or disk is full"."""
    import errno
    import os
    import re
    import sys

    seen, pending = set(), [exc]
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        pending += [item.__cause__, item.__context__]
        text = str(item)
        is_os = isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT)
        if not is_os and not any(t in text for t in _FULL_TEXT):
            continue
        path = getattr(item, "filename", None) if is_os else None
        if not path:
            # A path of two parts at least: TensorFlow's messages also hold device names (/job:localhost);
            # not the tail of a URL (SQLAlchemy's messages end with https://sqlalche.me/e/...).
            found = re.search(r"(?<![\w:/.])(/[^\s;:'\"\]/]+/[^\s;:'\"\]]+)", text)
            path = found.group(1) if found else None
        if not path and "database or disk is full" in text and "mlflow" in sys.modules:  # the SQLite store
            uri = str(sys.modules["mlflow"].get_tracking_uri())
            path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else None
        if not path:
            return "a disk is full (no space left on device); free space and run again"
        mount = os.path.abspath(str(path))
        while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
            mount = os.path.dirname(mount)
        return (
            f"the disk mounted on {mount} is full (no space left writing {path}); free space there "
            f"(df -h {mount}) or point paths.output_dir elsewhere, and run again"
        )
    return None
