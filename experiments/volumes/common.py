"""What the volume benchmark's scripts share (issue 29): where they work, how a segx command is
run in its own process and measured, and the one results file they all write into.

Every script writes its own section of ``experiments/volumes/results.json`` (the other sections are
kept) and rewrites ``RESULTS.md`` from the whole file (``report.py``), so every figure there comes
from what a script measured. Work files (data, MLflow stores, predictions) go under ``--work``
(default ``/tmp/segx-volbench``), never into the repository.

Standard library and numpy only here: the driver stays small, so a child's peak RSS (which Linux
starts at the parent's RSS when it forks) is far below what the child itself reaches.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from segx.benchmark.helpers import machine, read_results, write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORK = Path("/tmp/segx-volbench")
MIB = 2**20


def _status_kib(key: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def store(out: Path) -> list[str]:
    """The overrides that keep a command's MLflow store, caches, splits and Hydra logs under ``out``."""
    return [f"paths.output_dir={out}", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db"]


def run_segx(module: str, overrides: list[str], log: Path, *, check: bool = True) -> dict:
    """``python -m segx.<module> <overrides>`` in its own process, from the repository root.

    Returns its wall seconds, its peak RSS (``ru_maxrss`` from ``os.wait4``: the kernel's
    high-water mark of the child, anonymous and file-backed pages), the driver's own RSS when it
    forked (a floor of that figure), the load average at the start and the end, and every line it
    printed with the second it was read at (``lines``)."""
    cmd = [sys.executable, "-m", f"segx.{module}", *overrides]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    log.parent.mkdir(parents=True, exist_ok=True)
    lines: list[tuple[float, str]] = []
    load_start = load_average()
    driver = _status_kib("VmRSS") / 1024
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)

        def read() -> None:
            for line in proc.stdout:
                lines.append((time.perf_counter() - start, line.rstrip("\n")))
                handle.write(line)
                handle.flush()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        reader.join()
    code = os.waitstatus_to_exitcode(status)
    result = {
        "command": " ".join(["python", "-m", f"segx.{module}", *overrides]),
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: kB
        "driver_rss_mib": driver,
        "load_start": load_start,
        "load_end": load_average(),
        "exit_code": code,
        "log": str(log),
        "lines": lines,
    }
    if check and code != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise SystemExit(f"{result['command']} failed with exit code {code} (log {log}):\n{tail}")
    return result


def first_time(lines: list[tuple[float, str]], pattern: str) -> float | None:
    regex = re.compile(pattern)
    return next((t for t, line in lines if regex.search(line)), None)


def ensemble_run_id(lines: list[tuple[float, str]]) -> str:
    for _, line in lines:
        match = re.search(r"segx: ensemble run ([0-9a-f]{32})", line)
        if match:
            return match.group(1)
    raise SystemExit("segx.ensemble printed no 'ensemble run <id>' line")


def artifact(out: Path, run_id: str, rel: str) -> Path:
    """A logged artifact of ``run_id`` in the local store under ``out`` (mlflow.artifact_root)."""
    hits = sorted((out / "mlartifacts").glob(f"*/{run_id}/artifacts/{rel}"))
    if not hits:
        raise SystemExit(f"run {run_id} has no artifact {rel} under {out / 'mlartifacts'}")
    return hits[0]


def write_split(path: Path, train: list[str], val: list[str], test: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": train, "val": val, "test": test}, indent=1))
    return path


def cases(n: int) -> list[str]:
    """The case ids segx.data.synthetic_volumes writes."""
    return [f"case_{i:03d}" for i in range(n)]


def link_images(root: Path, ids: list[str], folder: Path) -> Path:
    """``folder`` holding symbolic links to the scans (``imagesTr/<case>_0000.nii.gz``) of ``ids``."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in ids:
        target = folder / f"{case}_0000.nii.gz"
        if not target.exists():
            target.symlink_to(root / "imagesTr" / f"{case}_0000.nii.gz")
    return folder


def save(section: str, payload: dict) -> Path:
    """Write ``payload`` as ``section`` of results.json (the others kept) and rewrite RESULTS.md."""
    from report import render  # experiments/volumes/report.py, beside this file

    results = read_results(HERE, required=False)
    results.setdefault("machine", {}).update(machine())
    results[section] = payload
    return write_results(HERE, results, render)
