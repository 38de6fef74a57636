"""Output folders segx owns: the prediction folder (:mod:`segx.inference.folder`) and the export
folder (:mod:`segx.inference.export_plan`). Each holds a manifest of what segx wrote there, so
``overwrite=true`` replaces segx's own files and never one it did not write; the work is written
into a partial folder first (:mod:`segx.data.staging`) and put in place all or nothing.

The two differ in how they are put in place, and so in what must be checked before:

- a prediction merges its files into ``output_dir`` (its partial folder lies inside), replacing
  and removing only the files its manifest lists: other files there are left alone
  (:func:`commit_files`);
- an export replaces the whole folder (its partial folder lies beside), which must therefore hold
  nothing but the earlier export (:func:`first_foreign`, :func:`replace_folder`).

What each folder's manifest holds and the messages that refuse a folder are its own module's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from segx.data import staging


@dataclass(frozen=True)
class Layout:
    """The names segx writes in one kind of output folder: its manifest, the prefix of its
    partial folders, and which relative paths segx may write (``allowed``: the path's parts,
    already free of empty, ``.`` and ``..`` parts)."""

    manifest: str
    partial_prefix: str
    allowed: Callable[[list[str]], bool]
    folders: tuple[str, ...] = ()  # the top-level folders a merge makes and removes when empty

    def owns(self, rel: object) -> bool:
        """Whether a manifest entry names a path segx may have written: a relative POSIX path that
        ``allowed`` accepts. A hand-edited or foreign manifest cannot make segx delete anything else."""
        if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
            return False
        parts = rel.split("/")
        if any(part in ("", ".", "..") for part in parts):
            return False
        return self.allowed(parts)

    def is_partial(self, name: str) -> bool:
        """A run in progress or a killed one's leftovers: segx's, removed when stale."""
        return staging.is_staging(name, self.partial_prefix)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Atomic: a temporary name in the same folder, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Merging files into a folder (a prediction)


def commit_files(
    stage: Path,
    output_dir: Path,
    new: list[str],
    old: list[str],
    layout: Layout,
    write_manifest: Callable[[Path, Iterable[str], bool], None],
) -> None:
    """Move the staged files ``new`` into ``output_dir`` and remove the earlier run's others
    (``old``), all or nothing: every step is undone if a later one fails, the earlier files and
    manifest are put back and ``output_dir`` is as it was. Replaced and removed files wait in
    ``<stage>/.old/``, which goes with the staging folder once the new manifest is written.
    ``write_manifest(output_dir, files, complete)`` writes the folder's manifest."""
    manifest = output_dir / layout.manifest
    before = manifest.read_bytes() if manifest.is_file() and not manifest.is_symlink() else None
    backup = stage / ".old"
    undo: list[Callable[[], object]] = []  # the steps taken so far, each as its reversal
    try:
        write_manifest(output_dir, [*old, *new], False)
        for rel in new:
            target = output_dir / rel
            for folder in reversed(Path(rel).parents[:-1]):  # masks/, probabilities/<stem>/, ...
                made = output_dir / folder
                if not os.path.lexists(made):
                    made.mkdir()
                    undo.append(made.rmdir)
            kept = set_aside(target, backup / rel) if os.path.lexists(target) else None
            undo.append(lambda target=target, kept=kept: os.replace(kept, target) if kept else target.unlink(True))
            os.replace(stage / rel, target)
        for rel in sorted(set(old) - set(new)):
            target = output_dir / rel
            if target.is_symlink() or target.is_file():
                aside = backup / rel
                aside.parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, aside)
                undo.append(lambda target=target, aside=aside: os.replace(aside, target))
        write_manifest(output_dir, new, True)
    except BaseException:
        for step in reversed(undo):
            with contextlib.suppress(OSError):
                step()
        with contextlib.suppress(OSError):
            if before is None:
                manifest.unlink(missing_ok=True)
            else:
                write_atomic(manifest, before)
        raise
    # Done: the folders the earlier run's removed files leave empty go too, and empty top-level
    # folders this run does not use (older versions left them after a crash).
    empty = {folder for rel in set(old) - set(new) for folder in Path(rel).parents[:-1]}
    empty |= {Path(name) for name in layout.folders if name not in {rel.split("/")[0] for rel in new}}
    for folder in sorted(empty, key=lambda f: -len(f.parts)):  # innermost first
        path = output_dir / folder
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty


def set_aside(target: Path, aside: Path) -> Path:
    """Keep the file at ``target`` as ``aside`` before it is replaced: a hard link where the file
    system allows it (``target`` stays in place, so the rename over it stays atomic), else moved."""
    aside.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(target, aside, follow_symlinks=False)
    except OSError:
        os.replace(target, aside)
    return aside


# ---------------------------------------------------------------------------------------------
# Replacing a whole folder (an export)


class Owned(NamedTuple):
    """What an earlier run's manifest says segx wrote: files -> bytes (None: any size), folders,
    and folders whose whole tree is segx's."""

    files: dict[str, int | None]
    folders: set[str]
    trees: set[str]


def contents(folder: Path, manifest: str, rel: str = "") -> list[dict]:
    """Every file and folder under ``folder`` but its manifest, sorted: ``{"path", "bytes"}`` for
    a file, ``{"path", "folder": true}`` for a folder (a SavedModel's ``assets/`` may be empty)."""
    out: list[dict] = []
    for entry in sorted(os.scandir(folder / rel if rel else folder), key=lambda e: e.name):
        path = f"{rel}/{entry.name}" if rel else entry.name
        if entry.is_dir(follow_symlinks=False):
            out += [{"path": path, "folder": True}, *contents(folder, manifest, path)]
        elif path != manifest:
            out.append({"path": path, "bytes": entry.stat(follow_symlinks=False).st_size})
    return out


def first_foreign(output_dir: Path, owned: Owned, manifest: str, rel: str = "") -> tuple[str, str] | None:
    """The first path under ``output_dir`` (sorted, depth first) that the earlier run did not
    write, and why; None when every file and folder there is its own."""
    files, folders, trees = owned
    for entry in sorted(os.scandir(output_dir / rel if rel else output_dir), key=lambda e: e.name):
        path = f"{rel}/{entry.name}" if rel else entry.name
        inside = "/" in path and path.split("/")[0] in trees  # an older manifest's saved_model/...
        if entry.is_symlink():
            return path, "is a link, which segx never writes,"
        if entry.is_dir():
            if path not in folders and path not in trees and not inside:
                return f"{path}/", f"was not written by segx ({manifest} does not list it)"  # a folder
            found = first_foreign(output_dir, owned, manifest, path)
            if found is not None:
                return found
        elif not entry.is_file():
            return path, "is not a file segx wrote"
        elif path == manifest or inside:
            continue
        elif path not in files:
            return path, f"was not written by segx ({manifest} does not list it)"
        elif files[path] is not None and entry.stat().st_size != files[path]:
            return path, (
                f"is not the file segx wrote there ({entry.stat().st_size} bytes; {manifest} records {files[path]})"
            )
    return None


def replace_folder(stage: Path, output_dir: Path, partial_prefix: str) -> None:
    """Rename the finished folder ``stage`` over ``output_dir`` (an earlier one is moved aside
    first and removed after: a reader sees the old folder or the new one, never a mixture)."""
    old = staging.set_aside(output_dir, partial_prefix) if output_dir.exists() else None
    try:
        os.replace(stage, output_dir)
    except BaseException:
        if old is not None:  # the earlier folder goes back where it was
            os.replace(old / output_dir.name, output_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
