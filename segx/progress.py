"""Where long work is: a tqdm bar on a terminal, one line per stage in a log (CI, SLURM, a
file), so a non-interactive log is not flooded with bar redraws. No heavy imports.

    for image in progress(images, "caching validation probabilities", total=len(images)):
        ...
    stage("saving the model")
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def interactive() -> bool:
    """A person is watching: stderr is a terminal (not a pipe, a file, CI or a SLURM log)."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def stage(message: str) -> None:
    """One line naming what starts now (on a terminal and in a log alike)."""
    print(f"segx: {message}", flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "images") -> Iterator[T]:
    """``items`` as they are, with a bar on a terminal; in a log one line when it starts."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not interactive():
        stage(f"{desc}" + (f" ({total} {unit})" if total is not None else ""))
        yield from items
        return
    from tqdm.auto import tqdm

    with tqdm(items, desc=f"segx: {desc}", total=total, unit=unit, leave=False, file=sys.stderr) as bar:
        yield from bar


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class EpochClock:
    """Elapsed and remaining time of a training, from the epochs done so far (early stopping
    may end it sooner than the estimate)."""

    def __init__(self, epochs: int, first_epoch: int = 1):
        self.epochs, self.first, self.start = int(epochs), int(first_epoch), time.monotonic()

    def line(self, epoch: int) -> str:
        elapsed = time.monotonic() - self.start
        done = epoch - self.first + 1
        left = elapsed / max(done, 1) * max(self.epochs - epoch, 0)
        return f"{clock(elapsed)} elapsed, ~{clock(left)} left"
