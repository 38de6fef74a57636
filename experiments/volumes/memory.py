"""Memory flat from 10 to 100 synthetic volumes (issue 29): peak RSS of ``python -m segx.train``
(one member, one epoch) and of ``python -m segx.predict`` on a folder of volumes.

    python experiments/volumes/memory.py [--work /tmp/segx-volbench] [--sizes 10,100]
                                         [--modes resize,patch] [--side 48] [--depth 12] [--quick]

Each configuration runs in its own process; its peak RSS is the child's ``ru_maxrss`` from
``os.wait4`` (experiments/volumes/common.py). Data: ``data=synthetic_volumes`` with ``--sizes``
cases of ``--side`` x ``--side`` x ``--depth`` voxels (0.8 x 0.8 x 3 mm), each size its own folder.
Every size gets a split file with the SAME 2 validation and 2 test volumes (case_000..case_003), so
the validation and test slices a member predicts at the end of training are the same work and only
the training set grows (6 -> 96 volumes).

Training: resnet18 Unet, ``trainer.epochs=1``, ``augment=none``, batch 8, from an empty output
folder (slicing, decoding and the MLflow store are part of the run). ``resize`` mode: every
training slice at 64 x 64 (an epoch sees every slice, so it grows with N); ``patch`` mode:
32 px patches, ``data.samples_per_epoch=64`` (the same work per epoch at every N).

Prediction: the resize member of the smallest size becomes a one-member ensemble
(``segx.ensemble ensemble.members=[resnet18]``), then ``segx.predict`` writes label volumes for
the first 10 and all 100 scans of the largest folder (batch_size 8; the default outputs: masks
and the uncertainty volume). ``--quick``: resize mode only.
"""

from __future__ import annotations

import argparse
import shutil
import time

from common import WORK, cases, ensemble_run_id, link_images, run_segx, save, store, write_split


def data_overrides(root, n: int, side: int, depth: int) -> list[str]:
    return ["data=synthetic_volumes", f"data.root={root}", f"data.n_cases={n}", f"data.source_size={side}",
            f"data.depth={depth}", "data.image_size=64"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=str, default=str(WORK))
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--modes", default="resize,patch")
    parser.add_argument("--side", type=int, default=48)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="resize mode only")
    args = parser.parse_args()
    from pathlib import Path

    work = Path(args.work) / "memory"
    shutil.rmtree(work, ignore_errors=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = ["resize"] if args.quick else args.modes.split(",")
    started = time.perf_counter()
    payload = {"sizes": sizes, "modes": modes, "side": args.side, "depth": args.depth, "train": [], "predict": []}
    for mode in modes:
        for n in sizes:
            root = work / "data" / f"n{n}"
            ids = cases(n)
            split = write_split(work / "splits" / f"n{n}.json", ids[4:], ids[:2], ids[2:4])
            out = work / "runs" / f"{mode}-n{n}"
            extra = ["data.mode=patch", "data.patch_size=32", "data.samples_per_epoch=64"] if mode == "patch" else []
            overrides = [*store(out), *data_overrides(root, n, args.side, args.depth), f"data.split_file={split}",
                         *extra, "backbone=resnet18", "trainer.epochs=1", "trainer.batch_size=8", "augment=none",
                         "trainer.verbose=2"]  # fmt: skip
            print(f"train {mode} n={n} ...", flush=True)
            run = run_segx("train", overrides, work / "logs" / f"train-{mode}-n{n}.log")
            row = {k: v for k, v in run.items() if k != "lines"}
            row.update(mode=mode, volumes=n, train_volumes=n - 4, slices=n * args.depth)
            payload["train"].append(row)
            print(f"  peak RSS {row['peak_rss_mib']:.0f} MiB, {row['wall_s']:.1f} s", flush=True)
            save("memory", payload)
    # One-member ensemble of the smallest resize member, then prediction on 10 and 100 scans.
    out = work / "runs" / f"resize-n{min(sizes)}"
    ens = run_segx("ensemble", [*store(out), "ensemble.members=[resnet18]"], work / "logs" / "ensemble.log")
    run_id = ensemble_run_id(ens["lines"])
    largest = work / "data" / f"n{max(sizes)}"
    for n in sizes:
        inputs = link_images(largest, cases(n), work / "predict_in" / f"n{n}")
        overrides = [*store(out), f"ensemble_run_id={run_id}", f"input_dir={inputs}",
                     f"output_dir={work / 'predict_out' / f'n{n}'}", "batch_size=8"]  # fmt: skip
        print(f"predict n={n} ...", flush=True)
        run = run_segx("predict", overrides, work / "logs" / f"predict-n{n}.log")
        row = {k: v for k, v in run.items() if k != "lines"}
        written = sorted((work / "predict_out" / f"n{n}" / "masks").glob("*.nii.gz"))
        row.update(volumes=n, slices=n * args.depth, written=len(written))
        payload["predict"].append(row)
        print(f"  peak RSS {row['peak_rss_mib']:.0f} MiB, {row['wall_s']:.1f} s, {len(written)} volumes", flush=True)
        save("memory", payload)
    payload["ensemble_run_id"] = run_id
    payload["total_s"] = time.perf_counter() - started
    save("memory", payload)
    print(f"memory: done in {payload['total_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
