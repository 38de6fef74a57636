"""The small helpers every benchmark shares: the study (:mod:`segx.benchmark.study`) and the
scripts under ``experiments/`` import them from here instead of each keeping its own copy.

* :func:`subset_folder`: a folder of symlinks to a seeded, stratified subset of a dataset's cases
  (``train_images``/``train_masks`` pairs and ``metadata.csv``), for a quick run;
* :func:`spread`: the median of repeated timings with their min-max, as text;
* :func:`machine`: what the numbers were measured on (CPU, cores, memory, Python version);
* :func:`write_results` / :func:`read_results`: a results JSON written atomically and the
  ``RESULTS.md`` beside it.

Standard library and numpy only (no TensorFlow, MLflow, Hydra or pandas), so a report can be
rewritten from its JSON without loading a framework.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from segx.errors import SegxError

SUBSETS = ("train_images", "train_masks")  # a case is an image and its mask, same stem, .png


# --- subsets ---------------------------------------------------------------------------------
def subset_folder(
    root: Path, n: int | None, work: Path, *, min_per_group: int = 2, by: str = "appearance", seed: int = 0
) -> Path:
    """``root`` itself when ``n`` is 0 or None, else ``work/subset-<n>``: a folder of symlinks to
    about ``n`` cases of ``root``, stratified by the ``by`` column of ``root/metadata.csv``.

    The rule (the one every copy of this function used): the strata in sorted order, one
    ``numpy.random.default_rng(seed)`` drawn on in turn; each stratum keeps the first
    ``max(min_per_group, round(n * len(stratum) / len(metadata)))`` of a permutation of its rows
    (all of it when it is smaller). So the count is ``n`` only when the shares round to it; rows
    with an empty ``by`` value are left out, as pandas' groupby left them out. The subset's
    ``metadata.csv`` holds the picked rows in that order, as written in ``root``'s.
    """
    if not n:
        return root
    root, work = Path(root), Path(work)
    path = root / "metadata.csv"
    if not path.is_file():
        raise SegxError(f"{path} is missing; subset_folder needs it to stratify by '{by}'")
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        rows = [row for row in reader if row]
    if not header or "stem" not in header or by not in header:
        raise SegxError(f"{path} needs the columns 'stem' and '{by}'; its header is {header}")
    if n < 0 or n > len(rows):
        raise SegxError(f"a subset of {n} cases asked of {root}, which has {len(rows)}; ask for 1 to {len(rows)}")
    stem_at, by_at = header.index("stem"), header.index(by)
    groups: dict[str, list[list[str]]] = {}
    for row in rows:
        if row[by_at] != "":
            groups.setdefault(row[by_at], []).append(row)
    rng = np.random.default_rng(seed)
    picked = []
    for key in sorted(groups):
        group = groups[key]
        keep = max(min_per_group, round(n * len(group) / len(rows)))
        picked += [group[i] for i in rng.permutation(len(group))[:keep]]
    for row in picked:
        missing = [sub for sub in SUBSETS if not (root / sub / f"{row[stem_at]}.png").is_file()]
        if missing:
            raise SegxError(f"case '{row[stem_at]}' of {path} has no {' or '.join(missing)} file in {root}")
    target = work / f"subset-{n}"
    for sub in SUBSETS:
        (target / sub).mkdir(parents=True, exist_ok=True)
        for row in picked:
            link = target / sub / f"{row[stem_at]}.png"
            if not link.exists():
                link.symlink_to((root / sub / f"{row[stem_at]}.png").resolve())
    with open(target / "metadata.csv", "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([header, *picked])
    return target


# --- timings ---------------------------------------------------------------------------------
def spread(values: Iterable[float], digits: int = 2, *, style: str = "f", empty: str | None = None) -> str:
    """``"median (min-max)"`` of ``values``, each as ``format(v, f".{digits}{style}")``: ``digits``
    decimals with ``style="f"``, ``digits`` significant digits with ``style="g"``. No values: ``empty``
    where it is given, else ValueError."""
    values = [float(v) for v in values]
    if not values:
        if empty is not None:
            return empty
        raise ValueError("spread() of no values")
    spec = f".{digits}{style}"
    return f"{format(statistics.median(values), spec)} ({format(min(values), spec)}-{format(max(values), spec)})"


# --- the machine -----------------------------------------------------------------------------
def machine() -> dict:
    """``cpu`` (the model name from /proc/cpuinfo, else the platform's processor or machine),
    ``cores``, ``memory_gib`` (None where unknown) and ``python``. A caller adds the versions it
    reports: the study adds segx's :func:`~segx.tracking.provenance.package_versions`."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, OSError, ValueError):
        memory = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "python": platform.python_version()}


# --- results ---------------------------------------------------------------------------------
def write_results(
    folder: Path,
    payload: dict | list | None = None,
    report: str | Callable[[dict], str] | None = None,
    *,
    name: str = "results.json",
    report_name: str = "RESULTS.md",
    indent: int = 1,
    stamp: str | None = None,
) -> Path:
    """Write ``payload`` to ``folder/name`` as JSON (atomically: a reader never sees half a file;
    numpy numbers through ``float``), then ``report`` (text, or a function of the payload that
    returns it) to ``folder/report_name``. ``stamp``: a key set to the time first. Either may be
    None; the folder is made if need be. Returns the JSON's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if payload is not None:
        if stamp:
            payload[stamp] = time.strftime("%Y-%m-%d %H:%M:%S")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=indent, default=float))
        os.replace(tmp, path)
    if report is not None:
        text = report(payload) if callable(report) else report
        (folder / report_name).write_text(text)
    return path


def read_results(folder: Path, name: str = "results.json", *, required: bool = True) -> dict:
    """``folder/name`` read back; ``{}`` when it does not exist and ``required`` is False."""
    path = Path(folder) / name
    if not path.exists() and not required:
        return {}
    return json.loads(path.read_text())
