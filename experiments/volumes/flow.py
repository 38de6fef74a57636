"""The README's flow on ``data=synthetic_volumes``, timed from an empty store (issue 29):

    python -m segx.ensemble data=synthetic_volumes ensemble.train_missing=true
    python -m segx.predict ensemble_run_id=<id> input_dir=<the test scans> output_dir=<labels>

    python experiments/volumes/flow.py [--work /tmp/segx-volbench] [--quick]

The data config's defaults (12 volumes of 64 x 64 x 16 voxels, 0.8 x 0.8 x 3 mm, resize mode at
64 px) and conf/ensemble.yaml's members (resnet18, mobilenetv2, efficientnetb0 Unets, each trained
with conf/train.yaml's trainer: 15 epochs, batch 8, early stopping after 8 epochs without gain,
augment=light) into an empty ``paths.output_dir`` under ``--work``; only ``data.root``,
``paths.output_dir`` and the MLflow store are moved out of the repository. ``--quick`` adds
``ensemble.train_overrides=['trainer.epochs=3']``.

Stages are told apart by the lines segx prints (``member i/3``, ``ensembling``, ``scoring the test
split per volume``, ``ensemble run <id>: logging``) and timed by when the driver read them. Then
``segx.predict`` writes a label volume for each test scan (the split file's test cases), and the
written volumes are checked against the scans' geometry (nibabel affine and shape).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import WORK, ensemble_run_id, first_time, link_images, run_segx, save, store

STAGES = (  # (name, the line that starts it)
    ("start-up and data (imports; generate, slice, decode, split)", r"^"),
    ("member 1: resnet18 (train, cache val/test, log)", r"segx: member 1/3"),
    ("member 2: mobilenetv2", r"segx: member 2/3"),
    ("member 3: efficientnetb0", r"segx: member 3/3"),
    ("load the members' runs and cached probabilities", r"efficientnetb0-unet-s\d+: best epoch"),
    ("search on validation (weights, post-processing)", r"segx: ensembling \d+ members"),
    ("score the test split per volume (3D)", r"segx: scoring the test split per volume"),
    ("log the ensemble run (record, tables, figures, pyfunc), print", r"segx: ensemble run [0-9a-f]{32}: logging"),
)


def stage_times(lines, wall: float) -> list[dict]:
    marks = [(name, first_time(lines, pattern)) for name, pattern in STAGES]
    marks = [(name, 0.0 if pattern == r"^" else t) for (name, t), (_, pattern) in zip(marks, STAGES, strict=True)]
    marks = [(name, t) for name, t in marks if t is not None]
    out = []
    for i, (name, t) in enumerate(marks):
        end = marks[i + 1][1] if i + 1 < len(marks) else wall
        out.append({"stage": name, "seconds": end - t})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=str, default=str(WORK))
    parser.add_argument("--quick", action="store_true", help="members trained 3 epochs instead of 15")
    args = parser.parse_args()
    work = Path(args.work) / "flow"
    shutil.rmtree(work, ignore_errors=True)
    out, root = work / "outputs", work / "data" / "synthetic_volumes"
    extra = ["ensemble.train_overrides=['trainer.epochs=3']"] if args.quick else []
    overrides = ["data=synthetic_volumes", f"data.root={root}", "ensemble.train_missing=true", *store(out), *extra]
    print("segx.ensemble from an empty store ...", flush=True)
    ens = run_segx("ensemble", overrides, work / "logs" / "ensemble.log")
    run_id = ensemble_run_id(ens["lines"])
    split = json.loads(next((out / "splits").glob("synthetic_volumes*.json")).read_text())
    inputs = link_images(root, split["test"], work / "test_scans")
    pred_out = work / "labels"
    print("segx.predict on the test scans ...", flush=True)
    pred = run_segx("predict", [*store(out), f"ensemble_run_id={run_id}", f"input_dir={inputs}",
                                f"output_dir={pred_out}"], work / "logs" / "predict.log")  # fmt: skip
    import nibabel as nib
    import numpy as np

    checked = []
    for case in split["test"]:
        a = nib.load(str(inputs / f"{case}_0000.nii.gz"))
        b = nib.load(str(pred_out / "masks" / f"{case}.nii.gz"))
        labels = sorted(int(v) for v in np.unique(np.asarray(b.dataobj)))
        checked.append({"case": case, "affine_equal": bool(np.array_equal(a.affine, b.affine)),
                        "shape_equal": a.shape == b.shape, "label_values": labels})  # fmt: skip
    summary = [line for _, line in ens["lines"]]
    start = next(i for i, line in enumerate(summary) if line.startswith("Validation (weights"))
    payload = {
        "quick": args.quick,
        "overrides": overrides,
        "ensemble": {k: v for k, v in ens.items() if k != "lines"},
        "stages": stage_times(ens["lines"], ens["wall_s"]),
        "predict": {k: v for k, v in pred.items() if k != "lines"},
        "test_cases": split["test"],
        "written": checked,
        "ensemble_run_id": run_id,
        "store": str(out),
        "data_root": str(root),
        "printed_report": summary[start:],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save("flow", payload)
    for s in payload["stages"]:
        print(f"{s['stage']:<58} {s['seconds']:7.1f} s")
    print(f"{'segx.predict (' + str(len(split['test'])) + ' test volumes)':<58} {pred['wall_s']:7.1f} s")


if __name__ == "__main__":
    main()
