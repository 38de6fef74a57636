"""The training loop's own cost per epoch (validation, best-weights and checkpoint writes, metric
logging) as a share of the epoch, at segx's default settings.

    python experiments/training_overhead.py     -> experiments/training_overhead/{results.json,RESULTS.md}

Trains the default member (`python -m segx.train` with no overrides but the epochs and the output
folder: resnet34 U-Net, synthetic data, batch 8) and reads the `time/*` metrics every member run
logs per epoch (segx/training/fit.py): the seconds of the epoch's steps, of each part the loop
adds after them, and `time/overhead`, their share of the epoch. Epoch 1 includes building the
training and prediction graphs and is reported apart. Each setting is trained in its own
process, alternating over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segx.benchmark.helpers import write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "training_overhead"
sys.path.insert(0, str(ROOT))
PARTS = ("validation", "best_weights", "checkpoint", "logging")
SETTINGS = {
    "defaults (64 px, 60 training images)": [],
    "checkpoint every epoch (64 px)": ["trainer.checkpoint_every_s=0"],  # segx before checkpoint_every_s
    "validation every 2 epochs (64 px)": ["trainer.val_every=2"],
    "128 px": ["data.image_size=128"],
}


def train(work: Path, name: str, extra: list[str], epochs: int, data: Path) -> dict:
    out = work / name.split(" ")[0].replace("(", "")
    args = [
        sys.executable,
        "-m",
        "segx.train",
        f"trainer.epochs={epochs}",
        "trainer.early_stopping.patience=0",
        f"paths.output_dir={out}",
        f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
        f"data.root={data}",
        "trainer.verbose=0",
        *extra,
    ]
    done = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    )
    if done.returncode != 0:
        raise SystemExit(f"{name}: training failed\n{done.stderr[-3000:]}")
    from segx import tracking

    client = tracking.connect(f"sqlite:///{out}/mlflow.db", create=False)
    exp = client.get_experiment_by_name("segx").experiment_id
    (run,) = tracking.find_runs(client, exp, "member")[:1]
    series = {}
    for key in ("time/steps_s", "time/overhead", "time/final_checkpoint_s", *(f"time/{p}_s" for p in PARTS)):
        series[key] = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return series


def checkpoint_cost() -> dict:
    """One checkpoint of the default member as fit_member writes it (weights, Adam's state, best
    weights): its size, and the seconds of a synchronous write (median of 3), alone here."""
    import segx.backend  # noqa: F401
    from segx.backend import keras, tf
    from segx.models import build_model
    from segx.training.fit import BestWeights

    model = build_model("unet", "resnet34", 64)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, best=BestWeights(model))
    seconds = []
    with tempfile.TemporaryDirectory(prefix="segx-ckpt-") as tmp:
        for _ in range(4):
            t0 = time.perf_counter()
            checkpoint.write(f"{tmp}/last")
            seconds.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return {"bytes": size, "sync_write_s": statistics.median(seconds[1:]), "params": model.count_params()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    from segx.data.synthetic import generate

    rows = []
    with tempfile.TemporaryDirectory(prefix="segx-overhead-") as tmp:
        work = Path(tmp)
        data = generate(work / "data", n_images=100, size=128, seed=0)  # conf/data/synthetic.yaml's defaults
        for r in range(args.rounds):
            names = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
            for name in names:
                series = train(work, name, SETTINGS[name], args.epochs, data)
                rows.append({"round": r, "setting": name, **series})
                print(name, {k: [round(v, 3) for v in vals] for k, vals in series.items()}, flush=True)
                write_results(OUT, {"rows": rows})
    write(rows, args, checkpoint_cost())


def write(rows: list[dict], args, checkpoint: dict | None = None) -> None:
    summary = {}
    for name in SETTINGS:
        later = [row for row in rows if row["setting"] == name]
        if not later:
            continue

        # From the epoch after the first validated one (epoch 1 builds the training graph, the
        # first validation the prediction graph), pooled over rounds.
        def start(row):
            return next(i for i, v in enumerate(row["time/validation_s"]) if v > 0) + 1

        pooled = {
            k: [v for row in later for v in row[k][start(row) :]]
            for k in later[0]
            if k.startswith("time/") and k != "time/final_checkpoint_s"
        }
        first = [row["time/overhead"][0] for row in later]
        # The whole training from epoch 2 on, the last epoch's checkpoint included (written
        # after every epoch's metrics, so it is logged apart): the share that is not steps.
        whole = []
        for row in later:
            steps = sum(row["time/steps_s"][start(row) :])
            added = sum(sum(row[f"time/{p}_s"][start(row) :]) for p in PARTS) + sum(
                row.get("time/final_checkpoint_s") or [0.0]
            )
            whole.append(added / (steps + added))
        summary[name] = {k: statistics.median(v) for k, v in pooled.items()} | {
            "overhead_min": min(pooled["time/overhead"]),
            "overhead_max": max(pooled["time/overhead"]),
            "first_epoch_overhead": statistics.median(first),
            "whole_overhead": statistics.median(whole),
            "whole_min": min(whole),
            "whole_max": max(whole),
            "final_checkpoint_s": statistics.median(
                [v for row in later for v in row.get("time/final_checkpoint_s") or []] or [0.0]
            ),
        }
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores",
        "epochs": args.epochs,
        "rounds": args.rounds,
        "rows": rows,
        "summary": summary,
        "checkpoint": checkpoint,
    }
    write_results(OUT, results)
    lines = [
        "# The training loop's own overhead per epoch",
        "",
        f"`python experiments/training_overhead.py --epochs {args.epochs} --rounds {args.rounds}` ({results['date']}, "
        f"{results['machine']}). The default member (resnet34 U-Net, synthetic data, batch 8), "
        "its `time/*` metrics; median over the epochs after the first validated one, of every round (epoch 1 builds "
        "the training graph, the first validation the prediction graph). Settings alternate "
        "within each round, each trained in its own process.",
        "",
        "- *steps s*: the epoch's training steps. A checkpoint is written by TensorFlow in the background, so "
        "most of its cost shows here (the steps share the two cores with the write), not in *checkpoint s*, "
        "which is only its blocking part: compare the steps of the two 64 px rows.",
        "- *per epoch*: the parts' share of an epoch (steps + parts). *whole training*: the same summed over those "
        "epochs, the final checkpoint (always written after the last epoch) included. With validation every 2 epochs the "
        "per-epoch medians mix validated and other epochs: read its whole-training column.",
        "",
        "| setting | steps s | validation s | best weights s | checkpoint s | logging s | final checkpoint s | per "
        "epoch (min-max) | whole training (min-max) | epoch 1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['time/steps_s']:.2f} | {s['time/validation_s']:.3f} | {s['time/best_weights_s']:.3f} | "
            f"{s['time/checkpoint_s']:.3f} | {s['time/logging_s']:.3f} | {s['final_checkpoint_s']:.2f} | "
            f"{100 * s['time/overhead']:.1f}% ({100 * s['overhead_min']:.1f}-{100 * s['overhead_max']:.1f}) | "
            f"{100 * s['whole_overhead']:.1f}% ({100 * s['whole_min']:.1f}-{100 * s['whole_max']:.1f}) | "
            f"{100 * s['first_epoch_overhead']:.1f}% |"
        )
    pairs = [
        (a, b)
        for a, b in zip(
            *(
                sorted((r for r in rows if r["setting"] == n), key=lambda r: r["round"])
                for n in ("defaults (64 px, 60 training images)", "checkpoint every epoch (64 px)")
            ),
            strict=False,
        )
    ]
    if pairs:
        ratios = [statistics.median(b["time/steps_s"][1:]) / statistics.median(a["time/steps_s"][1:]) for a, b in pairs]
        lines += [
            "",
            "Steps with a checkpoint after every epoch / steps at the defaults, per round: "
            + ", ".join(f"{x:.3f}" for x in ratios)
            + ".",
        ]
    if checkpoint:
        lines += [
            "",
            f"One checkpoint of this member (resnet34 U-Net, {checkpoint['params'] / 1e6:.1f} M parameters: weights, "
            f"Adam's two moments, the best weights) is {checkpoint['bytes'] / 1e6:.0f} MB; written synchronously "
            f"on the idle machine it takes {checkpoint['sync_write_s']:.2f} s (median of 3).",
        ]
    text = "\n".join(lines) + "\n"
    write_results(OUT, report=text)
    print(text)


if __name__ == "__main__":
    main()
