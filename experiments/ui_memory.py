"""Memory of the MLflow UI as `make ui` starts it (one worker) against MLflow's default (four).

    python experiments/ui_memory.py            -> experiments/ui_memory/{results.json,RESULTS.md}

Each variant starts `mlflow ui` on a free 127.0.0.1 port against the same SQLite store, waits for
`/health`, opens the experiments list and a runs page once (so the workers have served
requests), sums the resident memory of the whole process tree (psutil), and stops it. Variants
alternate over rounds; medians and ranges are reported.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from segx.benchmark.helpers import write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "ui_memory"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def measure(store: str, workers: int | None) -> dict:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        store,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if workers is not None:
        command += ["--workers", str(workers)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit("mlflow ui did not answer within 120 s")
        for path in ("/", "/ajax-api/2.0/mlflow/experiments/search?max_results=10"):
            for _ in range(4):  # several requests, so that more than one worker serves
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                    r.read()
        time.sleep(2)
        return {
            "workers": workers or "default",
            "rss_mb": round(tree_rss_mb(proc.pid), 1),
            "processes": 1 + len(psutil.Process(proc.pid).children(recursive=True)),
        }
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def main() -> None:
    rounds = 3
    with tempfile.TemporaryDirectory(prefix="segx-ui-") as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        sys.path.insert(0, str(ROOT))
        from segx import tracking

        client = tracking.connect(store)
        exp = tracking.experiment_id(client, "segx", f"{tmp}/mlartifacts")
        for i in range(20):  # a store with some runs, as after a few sweeps
            run_id = tracking.start_run(client, exp, f"run{i}", {"segx.role": "member"})
            tracking.log_metrics(client, run_id, {"curves/val_dice": 0.5 + i / 100})
            client.set_terminated(run_id)
        rows = []
        for r in range(rounds):
            for workers in (1, None) if r % 2 == 0 else (None, 1):
                row = {"round": r, **measure(store, workers)}
                rows.append(row)
                print(row, flush=True)
    summary = {}
    for key in (1, "default"):
        values = [row["rss_mb"] for row in rows if row["workers"] == key]
        summary[str(key)] = {
            "median_mb": statistics.median(values),
            "min_mb": min(values),
            "max_mb": max(values),
            "processes": rows[[row["workers"] for row in rows].index(key)]["processes"],
        }
    ratio = summary["1"]["median_mb"] / summary["default"]["median_mb"]
    results = {
        "rows": rows,
        "summary": summary,
        "ratio_one_to_default": ratio,
        "machine": f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    write_results(OUT, results)
    text = (
        "# MLflow UI memory: `make ui` (one worker) against the default\n\n"
        f"`python experiments/ui_memory.py` ({results['date']}, {results['machine']}): resident memory of the whole "
        f"`mlflow ui` process tree after serving a few requests, {rounds} alternating rounds, median (min-max).\n\n"
        "| workers | processes | RSS MB |\n|---|---|---|\n"
        + "".join(
            f"| {k} | {v['processes']} | {v['median_mb']:.0f} ({v['min_mb']:.0f}-{v['max_mb']:.0f}) |\n"
            for k, v in summary.items()
        )
        + f"\nOne worker uses {ratio:.2f} of the default's memory.\n"
    )
    write_results(OUT, report=text)
    print(text)


if __name__ == "__main__":
    main()
