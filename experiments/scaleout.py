"""Scale-out on one machine: a 4-member sweep run serially, with joblib, and on SLURM; and what one
epoch's metric logging costs against SQLite and against the PostgreSQL-backed tracking server.

    python experiments/scaleout.py              -> experiments/scaleout/{results.json,RESULTS.md}
    python experiments/scaleout.py --quick      (smaller members, one round: a smoke run)

The sweep is ``backbone=resnet18,mobilenetv2 fold=0,1`` (2 backbones x 2 folds, as a study is
laid out) on generated data, the same settings in every mode:

* serial: the basic launcher, one job at a time, TensorFlow on 2 threads (1 job x 2 threads);
* joblib: ``hydra/launcher=joblib hydra.launcher.n_jobs=2`` (2 jobs x 1 thread each);
* slurm: ``hydra/launcher=slurm`` on the one-node SLURM of scripts/slurm-local.sh, 2 tasks x
  1 CPU (skipped, and said so, where SLURM does not answer).

Modes alternate over rounds (the order reversed each round), each sweep in a fresh output folder;
the wall time is the whole command, submission and start-up included. The logging latency is one
``log_batch`` of one epoch's metrics (what a member sends per epoch), alternating blocks of calls
against a fresh SQLite store and against ``segx.server`` (PostgreSQL + proxied artifacts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segx.benchmark import helpers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "scaleout"
sys.path.insert(0, str(ROOT))

MODES = {
    "serial": ["trainer.threads=2"],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "slurm": [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=4",
        "hydra.launcher.timeout_min=60",
    ],
}


def slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


def run_sweep(mode: str, work: Path, data: Path, settings: list[str]) -> dict:
    out = work / mode
    shutil.rmtree(out, ignore_errors=True)
    args = [
        sys.executable,
        "-m",
        "segx.train",
        "-m",
        "backbone=resnet18,mobilenetv2",
        "fold=0,1",
        *MODES[mode],
        f"paths.output_dir={out}",
        f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
        f"data.root={data}",
        "data.folds=2",
        "trainer.verbose=0",
        "mlflow.system_metrics=false",
        *settings,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("SEGX_SWEEP_STAMP", None)
    start = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=7200)
    wall = time.monotonic() - start
    if done.returncode != 0 or "4 finished, 0 failed" not in done.stdout:
        raise SystemExit(f"{mode} sweep failed (rc {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    from segx import tracking

    client = tracking.connect(f"sqlite:///{out}/mlflow.db", create=False)
    exp = client.get_experiment_by_name("segx").experiment_id
    runs = tracking.find_runs(client, exp, "member")
    member_s = [(r.info.end_time - r.info.start_time) / 1000 for r in runs]
    files = [f for f in (out / "mlartifacts").rglob("*") if f.is_file()]
    artifacts = sum(f.stat().st_size for f in files)
    model = sum(f.stat().st_size for f in files if "model" in f.relative_to(out / "mlartifacts").parts)
    return {
        "mode": mode,
        "wall_s": round(wall, 1),
        "members": len(runs),
        "member_run_s": [round(s, 1) for s in member_s],
        "threads": sorted({r.data.tags["segx.threads"] for r in runs}),
        "artifact_mb": round(artifacts / 2**20, 2),
        "model_mb": round(model / 2**20, 2),
    }


def epoch_metrics(step: int) -> dict[str, float]:
    # What MemberCallback logs per epoch.
    keys = (
        "curves/val_dice",
        "curves/val_iou",
        "curves/val_loss",
        "curves/lr",
        "curves/train_loss",
        "curves/train_dice",
        "curves/train_iou",
    )
    return {k: 0.5 + step / 1000 for k in keys}


def logging_latency(work: Path, calls: int, rounds: int) -> dict:
    from segx import tracking
    from segx.tracking.server import ServerSettings, free_port, tracking_server

    with tracking_server(work / "server", ServerSettings(port=free_port())) as uri:
        stores = {"sqlite": f"sqlite:///{work}/latency.db", "server": uri}
        runs = {}
        for name, store in stores.items():
            client = tracking.connect(store)
            exp = tracking.experiment_id(client, "latency", str(work / "latency-art") if name == "sqlite" else None)
            runs[name] = (client, tracking.start_run(client, exp, f"latency-{name}", {tracking.ROLE: "bench"}))
        times: dict[str, list[float]] = {name: [] for name in stores}
        step = 0
        for r in range(rounds):
            for name in stores if r % 2 == 0 else reversed(list(stores)):
                client, run_id = runs[name]
                for _ in range(calls):
                    step += 1
                    start = time.perf_counter()
                    tracking.log_metrics(client, run_id, epoch_metrics(step), step)
                    times[name].append((time.perf_counter() - start) * 1000)
        for client, run_id in runs.values():
            client.set_terminated(run_id)
    summary = {}
    for name, values in times.items():
        values = sorted(values)
        summary[name] = {
            "median_ms": round(statistics.median(values), 2),
            "p90_ms": round(values[int(0.9 * len(values))], 2),
            "min_ms": round(values[0], 2),
            "max_ms": round(values[-1], 2),
            "calls": len(values),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    if args.report_only:
        saved = helpers.read_results(OUT)
        modes = [m for m in MODES if any(r["mode"] == m for r in saved["rows"])]
        write_results(
            saved["rows"],
            saved["logging_latency"],
            modes,
            saved["settings"],
            saved["rounds"],
            saved["quick"],
            saved["date"],
        )  # the date of the measurement, not of the rewrite
        return
    settings = (
        ["data.n_images=16", "data.source_size=64", "data.image_size=64", "trainer.epochs=1", "trainer.batch_size=4"]
        if args.quick
        else [
            "data.n_images=32",
            "data.source_size=128",
            "data.image_size=128",
            "trainer.epochs=3",
            "trainer.batch_size=8",
        ]
    )
    rounds = 1 if args.quick else 2
    modes = ["serial", "joblib"] + (["slurm"] if slurm_answers() else [])
    OUT.mkdir(parents=True, exist_ok=True)
    from segx.data.synthetic import generate

    rows = []
    with tempfile.TemporaryDirectory(prefix="segx-scaleout-") as tmp:
        work = Path(tmp)
        size = int(settings[1].split("=")[1])
        data = generate(work / "data", n_images=int(settings[0].split("=")[1]), size=size, seed=0)
        for r in range(rounds):
            for mode in modes if r % 2 == 0 else list(reversed(modes)):
                row = {"round": r, **run_sweep(mode, work, data, settings)}
                rows.append(row)
                print(row, flush=True)
                helpers.write_results(OUT, {"rows": rows})  # each stage as it ends
        latency = logging_latency(work, calls=20 if args.quick else 50, rounds=2 if args.quick else 4)
        print(latency, flush=True)
    write_results(rows, latency, modes, settings, rounds, args.quick)


def write_results(rows, latency, modes, settings, rounds, quick, date: str | None = None) -> None:
    summary = {}
    for mode in modes:
        walls = [r["wall_s"] for r in rows if r["mode"] == mode]
        member = [s for r in rows if r["mode"] == mode for s in r["member_run_s"]]
        summary[mode] = {
            "median_wall_s": statistics.median(walls),
            "min_wall_s": min(walls),
            "max_wall_s": max(walls),
            "median_member_s": statistics.median(member),
            "threads": rows[[r["mode"] for r in rows].index(mode)]["threads"],
        }
    serial = summary["serial"]["median_wall_s"]
    artifact_mb = statistics.median(r["artifact_mb"] / r["members"] for r in rows)
    other_mb = statistics.median((r["artifact_mb"] - r["model_mb"]) / r["members"] for r in rows)
    results = {
        "date": date or time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "settings": settings,
        "rounds": rounds,
        "quick": quick,
        "rows": rows,
        "summary": summary,
        "logging_latency": latency,
        "artifact_mb_per_member": artifact_mb,
        "non_model_mb_per_member": other_mb,
    }
    from segx.models import build_model

    params = build_model("unet", "resnet34", 64).count_params()
    results.update(resnet34_unet_params=params, resnet34_unet_weights_mb=round(params * 4 / 2**20, 1))
    helpers.write_results(OUT, results)
    lines = [
        "# Scale-out on one machine: serial, joblib and SLURM sweeps; metric logging against SQLite and the server",
        "",
        f"`python experiments/scaleout.py{' --quick' if quick else ''}` ({results['date']}, {results['machine']}; other work "
        "shared the machine, and alternating the modes over rounds is what keeps the comparison fair).",
        f"Sweep: `backbone=resnet18,mobilenetv2 fold=0,1` (4 members), {' '.join(settings)}, generated data; "
        f"{rounds} round(s), the order reversed each round; wall time of the whole command, median (min-max).",
        "",
        "| mode | jobs x TF threads | sweep wall s | vs serial | one member's run s (median) |",
        "|---|---|---|---|---|",
    ]
    shape = {"serial": "1 x 2", "joblib": "2 x 1", "slurm": "2 tasks x 1 CPU"}
    for mode, s in summary.items():
        lines.append(
            f"| {mode} | {shape[mode]} (threads tag {','.join(s['threads'])}) | {s['median_wall_s']:.0f} "
            f"({s['min_wall_s']:.0f}-{s['max_wall_s']:.0f}) | x{serial / s['median_wall_s']:.2f} | {s['median_member_s']:.0f} |"
        )
    lines += [
        "",
        "Per round (the load from other work differed between rounds; within a round the modes ran back to back):",
        "",
        "| round | "
        + " | ".join(f"{m} wall s" for m in summary)
        + " | "
        + " | ".join(f"serial/{m}" for m in summary if m != "serial")
        + " |",
        "|---|" + "---|" * (2 * len(summary) - 1),
    ]
    for r in sorted({row["round"] for row in rows}):
        wall = {row["mode"]: row["wall_s"] for row in rows if row["round"] == r}
        lines.append(
            f"| {r} | "
            + " | ".join(f"{wall[m]:.0f}" for m in summary)
            + " | "
            + " | ".join(f"x{wall['serial'] / wall[m]:.2f}" for m in summary if m != "serial")
            + " |"
        )
    if "slurm" not in summary:
        lines += ["", "SLURM did not answer on this machine, so its row is missing (`make slurm-local` starts one)."]
    sq, sv = latency["sqlite"], latency["server"]
    lines += [
        "",
        "## Logging one epoch's metrics (7 values, one `log_batch`)",
        "",
        "| store | median ms | p90 ms | min-max ms | calls |",
        "|---|---|---|---|---|",
        f"| SQLite file (`sqlite:///...`) | {sq['median_ms']} | {sq['p90_ms']} | {sq['min_ms']}-{sq['max_ms']} | {sq['calls']} |",
        f"| `segx.server` (HTTP, PostgreSQL, 1 worker) | {sv['median_ms']} | {sv['p90_ms']} | "
        f"{sv['min_ms']}-{sv['max_ms']} | {sv['calls']} |",
        "",
        "## What a 16-GPU cluster would need (worked from the figures above)",
        "",
    ]
    per_call = sv["p90_ms"] / 1000
    for epoch_s in (10, 60):
        load = 16 * per_call / epoch_s
        lines.append(
            f"- 16 members training at once, an epoch every {epoch_s} s on a GPU (an assumption: a 256 px "
            f"U-Net epoch over a few hundred images): 16 / {epoch_s} = {16 / epoch_s:.2f} metric requests/s, each "
            f"holding the server {per_call * 1000:.0f} ms (p90 here), so one worker is busy {100 * load:.1f}% of the time."
        )
    big_mb = results["resnet34_unet_weights_mb"]
    member_mb = 2 * big_mb + other_mb  # weights.h5 and model.keras, plus caches and figures
    burst_gb = 16 * member_mb / 1024
    lines += [
        f"- Artifacts: a member here leaves {artifact_mb:.1f} MB, of which {other_mb:.1f} MB are not the model (per-case "
        f"probabilities at {settings[2].split('=')[1]} px, figures); the model is stored twice (weights.h5 for segx, "
        "model.keras for Keras users). A resnet34 U-Net holds "
        f"{results['resnet34_unet_params'] / 1e6:.1f} M parameters, {big_mb:.0f} MB as float32, so a member is about "
        f"2 x {big_mb:.0f} + {other_mb:.0f} = {member_mb:.0f} MB (more with larger validation and test images: one byte "
        f"per pixel per TTA mode). 16 members finishing together send {burst_gb:.2f} GB through the server's proxy, "
        f"{burst_gb * 8 / 10:.1f} s on a 10 Gb/s link, spread over the minutes in which they finish.",
        "- Jobs: 16 array tasks (`hydra.launcher.array_parallelism=16`, one GPU each), or 8 tasks of 2 GPUs with "
        "`trainer.strategy=mirrored`; the sweep folder and `paths.output_dir` (splits, locks, checkpoints) must be on "
        "the shared filesystem, the tracking server needs no shared filesystem.",
        "- The server is not the bottleneck at this scale: one worker suffices for metrics; `mlflow server --workers 4` "
        '(make server ARGS="workers=4") covers UI users and artifact uploads at the same time.',
    ]
    text = "\n".join(lines) + "\n"
    helpers.write_results(OUT, report=text)
    print(text)


if __name__ == "__main__":
    main()
