"""Time the README's first command (`make ensemble` on the embedded synthetic data) from an empty store.

    python experiments/demo.py

Runs exactly what `make ensemble` runs (``python -m segx.ensemble ensemble.train_missing=true``),
but into a fresh temporary output folder so an existing ``outputs/`` is neither reused nor
touched. Writes experiments/demo/RESULTS.md (wall time, the machine, and the test table the
ensemble run logged) and experiments/demo/test_summary.csv, the table itself.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segx.benchmark.helpers import read_results, write_results

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "demo"


def markdown(table) -> str:
    head = "| method | " + " | ".join(table.columns) + " |\n" + "|---" * (len(table.columns) + 1) + "|\n"
    return head + "".join(
        f"| {name} | " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |\n"
        for name, row in zip(table.index, table.itertuples(index=False), strict=True)
    )


def main() -> None:
    if sys.argv[1:] == ["--report-only"]:
        write_report()
        return
    with tempfile.TemporaryDirectory(prefix="segx-demo-") as tmp:
        store = Path(tmp)
        command = [
            sys.executable,
            "-m",
            "segx.ensemble",
            "ensemble.train_missing=true",
            f"paths.output_dir={store}",
            f"mlflow.tracking_uri=sqlite:///{store}/mlflow.db",
            f"mlflow.artifact_root={store}/mlartifacts",
        ]
        env = dict(os.environ, KERAS_HOME=str(store / ".keras"), MPLCONFIGDIR=str(store / ".mpl"))
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            sys.exit(f"demo failed ({done.returncode}):\n{done.stderr[-3000:]}")
        run_id = done.stdout.split("segx: ensemble run ")[-1].split()[0]
        summary = next(store.glob(f"mlartifacts/*/{run_id}/artifacts/tables/test_summary.csv"), None)
        if summary is None:  # artifact layout differs (e.g. a run ID folder one level deeper)
            summary = next(store.rglob(f"{run_id}/**/tables/test_summary.csv"))
        OUT.mkdir(parents=True, exist_ok=True)
        shutil.copy(summary, OUT / "test_summary.csv")
        disk = {p.name: round(_size(p) / 2**20, 1) for p in sorted(store.iterdir()) if not p.name.startswith(".")}
    facts = {
        "disk_mb": disk,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "command": "make ensemble (python -m segx.ensemble ensemble.train_missing=true)",
    }
    write_results(OUT, facts, name="run.json")
    write_report()


def _size(path: Path) -> int:
    """Bytes on disk under ``path`` (a file or a folder)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_report() -> None:
    """RESULTS.md from run.json and test_summary.csv (``--report-only`` rewrites it)."""
    import pandas as pd

    facts = read_results(OUT, "run.json")
    table = pd.read_csv(OUT / "test_summary.csv", index_col=0)
    minutes, secs = divmod(round(facts["seconds"]), 60)
    best_member = table[table.index.str.startswith("member:")]["dice_mean"].max()
    text = (
        "# `make ensemble` on the embedded synthetic data, from an empty store\n\n"
        f"`python experiments/demo.py` ({facts.get('date', '')}, {facts['machine']}): "
        f"{minutes} min {secs} s wall time ({facts['seconds']} s), install excluded, "
        "training the three default members and searching the ensemble.\n\n"
        f"Best member test Dice {best_member:.4f}; ensemble {table.loc['ensemble', 'dice_mean']:.4f}; "
        f"equal weights {table.loc['equal-weights', 'dice_mean']:.4f}.\n\n"
        + (
            f"Load average (1 min) right after: {facts['load_average_1min_after']} on {facts['machine']}"
            " (other jobs were running: the time is inflated accordingly).\n\n"
            if facts.get("load_average_1min_after", 0) > 1.5
            else ""
        )
        + (
            f"Disk left by the run (MB): {', '.join(f'{k} {v}' for k, v in facts['disk_mb'].items())}; "
            f"total {sum(facts['disk_mb'].values()):.1f}.\n\n"
            if facts.get("disk_mb")
            else ""
        )
        + markdown(table)
        + "\n"
    )
    write_results(OUT, report=text)
    print(text)


if __name__ == "__main__":
    main()
