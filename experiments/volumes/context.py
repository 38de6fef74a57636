"""2D against 2.5D at the same budget, scored in 3D on the test volumes (issue 29).

    python experiments/volumes/context.py [--work /tmp/segx-volbench] [--cases 24] [--epochs 6]
                                          [--side 48] [--depth 12] [--resamples 2000]

``data=synthetic_volumes`` with ``--cases`` volumes of ``--side`` x ``--side`` x ``--depth``
voxels (0.8 x 0.8 x 3 mm, generator seed 0), one split file shared by both arms (24 cases: 10
train, 4 validation, 10 test: segx's own gain verdict wants at least 10 test cases). Each arm is one command from an empty store:

    python -m segx.ensemble data=synthetic_volumes data.context_slices=K ensemble.train_missing=true
        ensemble.members=[resnet18,mobilenetv2] ensemble.train_overrides=['trainer.epochs=E']

with K = 0 (2D: each slice alone) and K = 1 (2.5D: the slice either side as two more channels).
The same members, epochs, batch (8), augmentation (light), seed (42) and split; only the input
channels differ. The score: each test volume's 3D Dice, foreground mean over liver and the two
kidneys (the ensemble's ``tables/test_per_volume.csv``), and the paired bootstrap of the
difference 2.5D - 2D over test volumes (``segx.evaluation.report.paired_bootstrap``, 95%
percentile interval). The members are compared the same way, each against itself.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import HERE, WORK, artifact, cases, ensemble_run_id, run_segx, save, store, write_split

from segx.benchmark.helpers import read_results

CLASSES = ("liver", "kidney_left", "kidney_right")


def history(previous: dict | None) -> list[dict]:
    """Every earlier run's differences (the previous run's history plus the previous run), kept
    beside this run's: with one seed of synthetic data, how much a rerun moves them matters."""
    if not previous or not previous.get("compare"):
        return []
    runs = list(previous.get("history", []))
    runs.append(
        {
            "finished": previous.get("finished"),
            "split": previous.get("split"),
            "epochs": previous.get("epochs"),
            "compare": {
                m: {"dice_2d": e["dice_2d"], "dice_2.5d": e["dice_2.5d"], "bootstrap": e["bootstrap"]}
                for m, e in previous["compare"].items()
            },
        }
    )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=str, default=str(WORK))
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--side", type=int, default=48)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    import pandas as pd

    from segx.evaluation.report import paired_bootstrap

    work = Path(args.work) / "context"
    shutil.rmtree(work, ignore_errors=True)
    ids = cases(args.cases)
    n_val, n_test = max(2, args.cases // 6), max(2, args.cases * 5 // 12)  # 24 cases: 10 train, 4 val, 10 test
    split = write_split(work / "split.json", ids[n_val + n_test :], ids[:n_val], ids[n_val : n_val + n_test])
    root = work / "data"
    arms = {}
    tables = {}
    for context in (0, 1):
        name = "2d" if context == 0 else "2.5d"
        out = work / f"store-{name}"
        overrides = ["data=synthetic_volumes", f"data.root={root}", f"data.n_cases={args.cases}",
                     f"data.source_size={args.side}", f"data.depth={args.depth}", "data.image_size=64",
                     f"data.split_file={split}", f"data.context_slices={context}", "ensemble.train_missing=true",
                     "ensemble.members=[resnet18,mobilenetv2]", f"ensemble.train_overrides=['trainer.epochs={args.epochs}']",
                     *store(out)]  # fmt: skip
        print(f"{name}: training 2 members and ensembling ...", flush=True)
        run = run_segx("ensemble", overrides, work / "logs" / f"{name}.log")
        run_id = ensemble_run_id(run["lines"])
        table = pd.read_csv(artifact(out, run_id, "tables/test_per_volume.csv"))
        tables[name] = table
        arms[name] = {"ensemble_run_id": run_id, "wall_s": run["wall_s"], "command": run["command"],
                      "load_start": run["load_start"], "load_end": run["load_end"]}  # fmt: skip
        print(f"  {run['wall_s']:.0f} s", flush=True)
    methods = [m for m in tables["2d"]["method"].unique() if m in set(tables["2.5d"]["method"])]
    compare = {}
    for method in methods:
        a = tables["2.5d"][tables["2.5d"].method == method].set_index("case").sort_index()
        b = tables["2d"][tables["2d"].method == method].set_index("case").sort_index()
        assert list(a.index) == list(b.index), "the two arms scored different test volumes"
        entry = {
            "dice_2d": float(b["dice"].mean()),
            "dice_2.5d": float(a["dice"].mean()),
            "bootstrap": paired_bootstrap(a["dice"].to_numpy(), b["dice"].to_numpy(), args.resamples),
            "per_class": {
                c: {"2d": float(b[f"dice/{c}"].mean()), "2.5d": float(a[f"dice/{c}"].mean())}
                for c in CLASSES
                if f"dice/{c}" in a.columns
            },
            "hd95_2d": float(b["hd95"].mean()),
            "hd95_2.5d": float(a["hd95"].mean()),
            "nsd_2d": float(b["nsd"].mean()),
            "nsd_2.5d": float(a["nsd"].mean()),
        }
        if method == "ensemble":
            entry["per_volume"] = {
                case: {"2d": float(b.loc[case, "dice"]), "2.5d": float(a.loc[case, "dice"])} for case in a.index
            }
        compare[method] = entry
    previous = read_results(HERE, required=False).get("context")
    payload = {
        "history": history(previous),
        "cases": args.cases,
        "split": {"train": len(ids) - n_val - n_test, "val": n_val, "test": n_test},
        "side": args.side,
        "depth": args.depth,
        "epochs": args.epochs,
        "members": ["resnet18", "mobilenetv2"],
        "arms": arms,
        "compare": compare,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save("context", payload)
    for method, entry in compare.items():
        boot = entry["bootstrap"]
        print(f"{method:<28} 2D {entry['dice_2d']:.4f}  2.5D {entry['dice_2.5d']:.4f}  "
              f"diff {boot['diff']:+.4f} [{boot['low']:+.4f}, {boot['high']:+.4f}]")  # fmt: skip


if __name__ == "__main__":
    main()
