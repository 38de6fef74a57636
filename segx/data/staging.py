"""Writing a folder of results whole or not at all: a staging folder beside (or inside) the
destination, named for the process that writes it, removed when the work ends; on failure the
folders created to hold it go too. Prediction folders and exports both write through it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _pattern(prefix: str) -> re.Pattern:
    # "<prefix><pid>-..." (a staging folder) or "<prefix>old-<pid>-..." (an earlier result moved aside)
    return re.compile(re.escape(prefix) + r"(?:old-)?(\d+)-")


def is_staging(name: str, prefix: str) -> bool:
    """Whether ``name`` is a staging folder's name (a run in progress, or a killed one's)."""
    return _pattern(prefix).match(name) is not None


def remove_stale(parent: Path, prefix: str) -> None:
    """Staging folders under ``parent`` whose process no longer runs (killed before it could
    clean up); a running one, or another user's, is left alone."""
    pattern = _pattern(prefix)
    for entry in os.scandir(parent) if parent.is_dir() else ():
        match = pattern.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except (PermissionError, OverflowError, OSError):
            continue


def set_aside(path: Path, prefix: str) -> Path:
    """Move ``path`` into a new ``<prefix>old-<pid>-`` folder beside it (removed by the caller,
    or by :func:`remove_stale` once this process is gone); returns that folder."""
    aside = Path(tempfile.mkdtemp(prefix=f"{prefix}old-{os.getpid()}-", dir=path.parent))
    os.replace(path, aside / path.name)
    return aside


@contextlib.contextmanager
def staged_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new, empty ``<parent>/<prefix><pid>-XXXX`` folder to write into; what the block moves out
    of it is the result, the rest is removed when the block ends. ``parent`` and its missing
    ancestors are created first (stale staging folders in it removed) and, if the block fails,
    removed again where still empty: a failure leaves the disk as it was."""
    created = [p for p in (parent, *parent.parents) if not os.path.lexists(p)]

    def remove_created() -> None:
        for folder in created:  # innermost first: only folders made here, if still empty
            try:
                folder.rmdir()
            except OSError:
                break

    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent, prefix)
        stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    except BaseException:
        remove_created()
        raise
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        remove_created()
        raise
    shutil.rmtree(stage, ignore_errors=True)
