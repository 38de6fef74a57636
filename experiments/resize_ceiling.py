"""What resizing alone costs: the Dice of a *perfect* prediction made at a small square and brought
back to each image's own size, against the original masks (issue 10's ceiling table).

    python experiments/resize_ceiling.py [--root ../shared/datasets/dsb2018_nuclei] [--sizes 64,96,128,256]

Each ground-truth mask is brought to the square in two ways, then back with segx's own
``from_model_size`` and a 0.5 cut (as prediction does), in both resize modes, and scored with
``segx.scoring.metrics.dice_per_case`` against the untouched original. No network is involved:

- ``nearest``: ``to_model_size(mask, is_mask=True)``, the nearest-neighbour mask segx trains on
  today, so the best a member that learnt its targets perfectly can score;
- ``area``: the mask averaged over each small pixel (a soft target), the best any prediction at
  that size can do. Writes
experiments/resize_ceiling/results.csv (one row per case, size and mode) and RESULTS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from segx.benchmark.helpers import write_results
from segx.data.folder import discover_cases, from_model_size, to_model_size
from segx.data.io import read_mask
from segx.scoring.metrics import dice_per_case

OUT = Path(__file__).resolve().parent / "resize_ceiling"
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "datasets" / "dsb2018_nuclei"))
    parser.add_argument("--sizes", default="64,96,128,256")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.root)
    meta = pd.read_csv(root / "metadata.csv").set_index("stem") if (root / "metadata.csv").exists() else None
    rows = []
    for case in discover_cases(root):
        mask = read_mask(case.mask)
        for mode in ("resize", "pad"):
            for size in sizes:
                for target in ("nearest", "area"):
                    if target == "nearest":
                        small = to_model_size(mask, size, mode, is_mask=True).astype(np.float32)
                    else:  # image interpolation of the float mask: INTER_AREA when shrinking
                        small = to_model_size(mask.astype(np.float32), size, mode, is_mask=False)
                    back = from_model_size(small, mask.shape, mode) >= 0.5
                    dice = float(dice_per_case(back[None], mask[None].astype(bool))[0])
                    rows.append(
                        {
                            "stem": case.stem,
                            "height": mask.shape[0],
                            "width": mask.shape[1],
                            "mode": mode,
                            "target": target,
                            "size": size,
                            "dice": dice,
                            "appearance": meta.loc[case.stem, "appearance"] if meta is not None else "",
                        }
                    )
    OUT.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(OUT / "results.csv", index=False)
    lines = [
        "# What resizing costs: a perfect prediction at a small square, scored at each image's own size",
        "",
        f"`python experiments/resize_ceiling.py --root {args.root} --sizes {args.sizes}`: "
        f"{frame.stem.nunique()} cases ({frame.height.min()}-{frame.height.max()} px high, "
        f"{frame.width.min()}-{frame.width.max()} px wide). Each true mask is brought to the square "
        "and back through segx's own resize path and scored against the original (no network).",
        "",
        "| mode | target | size | mean Dice | median | worst case | cases below 0.9 |",
        "|---|---|---|---|---|---|---|",
    ]
    for (mode, target, size), g in frame.groupby(["mode", "target", "size"], sort=True):
        lines.append(
            f"| {mode} | {target} | {size} | {g.dice.mean():.4f} | {g.dice.median():.4f} | {g.dice.min():.4f} "
            f"({g.loc[g.dice.idxmin(), 'stem'][:12]}) | {(g.dice < 0.9).sum()} |"
        )
    if meta is not None:
        lines += [
            "",
            "Mean Dice by appearance (resize mode, nearest-neighbour targets as segx trains today):",
            "",
            "| size | " + " | ".join(sorted(frame.appearance.unique())) + " |",
            "|---|" + "---|" * frame.appearance.nunique(),
        ]
        for size, g in frame[(frame["mode"] == "resize") & (frame["target"] == "nearest")].groupby("size"):
            means = g.groupby("appearance").dice.mean()
            lines.append(f"| {size} | " + " | ".join(f"{means[a]:.4f}" for a in sorted(means.index)) + " |")
    text = "\n".join(lines) + "\n"
    write_results(OUT, report=text)
    print(text)


if __name__ == "__main__":
    main()
