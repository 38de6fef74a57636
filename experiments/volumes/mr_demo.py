"""A functional demo on the one real MR volume (issue 29): ``../shared/datasets/totalseg_mr_example``
(117 x 91 x 20 voxels, 3 mm, L-P-S; its labels are TotalSegmentator's own predictions).

    python experiments/volumes/mr_demo.py [--work /tmp/segx-volbench] [--dataset PATH] [--epochs 10]
                                          [--image-size 96]

Builds an nnU-Net v2 folder in a temporary directory under ``--work`` (never in the repository):
the volume cut along z into 4 sub-volumes of 5 slices (``mr_z00`` = slices 0-4, ... ``mr_z15`` =
15-19), each written with SimpleITK's slicing, which moves the origin to the first kept slice and
keeps spacing and direction. Four large classes are kept with their own values (spleen 1,
kidney_right 2, kidney_left 3, liver 5); every other value becomes background 0.
``dataset.json``: channel "MRI" (z-scored per volume), those labels, file ending ".nii.gz".

A split file fixes the roles: train ``mr_z00`` and ``mr_z15``, validation ``mr_z05``, test
``mr_z10`` (the only piece that holds all four classes; the training pieces hold every class
between them). Two members (resnet18, mobilenetv2 Unets, ``--epochs`` epochs, resize mode at
``--image-size`` px, ``data.flip_swap`` for the kidneys) are trained and ensembled by one
``segx.ensemble ... ensemble.train_missing=true``; then ``segx.predict`` writes the held-out
sub-volume's label volume, which is read back: its affine, shape and NIfTI qform/sform codes
against the input's, and its 3D Dice per class against the labels (computed here with numpy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import WORK, artifact, ensemble_run_id, run_segx, save, store, write_split

DATASET = Path("/work/shared/datasets/totalseg_mr_example")
KEEP = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}
PIECE = 5  # slices per sub-volume


def build(dataset: Path, folder: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(dataset / "example_mr_sm.nii.gz"))
    label = sitk.ReadImage(str(dataset / "example_seg_mr.nii.gz"))
    values = sitk.GetArrayFromImage(label)
    kept = np.where(np.isin(values, list(KEEP.values())), values, 0).astype(np.uint8)
    mapped = sitk.GetImageFromArray(kept)
    mapped.CopyInformation(label)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    depth = image.GetSize()[2]
    pieces = {}
    for z0 in range(0, depth - PIECE + 1, PIECE):
        case = f"mr_z{z0:02d}"
        sitk.WriteImage(image[:, :, z0 : z0 + PIECE], str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        piece = mapped[:, :, z0 : z0 + PIECE]
        sitk.WriteImage(piece, str(folder / "labelsTr" / f"{case}.nii.gz"))
        counts = np.bincount(sitk.GetArrayFromImage(piece).ravel(), minlength=6)
        pieces[case] = {"slices": [z0, z0 + PIECE - 1], **{n: int(counts[v]) for n, v in KEEP.items()}}
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, **KEEP},
                    "numTraining": len(pieces), "file_ending": ".nii.gz", "name": "totalseg_mr_example in z pieces"}  # fmt: skip
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    dropped = sorted(int(v) for v in np.unique(values) if v and v not in KEEP.values())
    return {
        "pieces": pieces,
        "dropped_values": dropped,
        "source_voxels": {n: int((values == v).sum()) for n, v in KEEP.items()},
    }


def dice(pred, truth, value: int) -> float | None:
    p, t = pred == value, truth == value
    if not p.any() and not t.any():
        return None
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=str, default=str(WORK))
    parser.add_argument("--dataset", type=str, default=str(DATASET))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    import nibabel as nib
    import numpy as np

    base = Path(args.work)
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mr-demo-", dir=base))
    try:
        folder = work / "Dataset001_TotalSegMR"
        built = build(Path(args.dataset), folder)
        split = write_split(work / "split.json", ["mr_z00", "mr_z15"], ["mr_z05"], ["mr_z10"])
        out = work / "outputs"
        overrides = ["data=folder", f"data.root={folder}", f"data.split_file={split}", f"data.image_size={args.image_size}",
                     "data.flip_swap=[[kidney_left,kidney_right]]", "ensemble.train_missing=true",
                     "ensemble.members=[resnet18,mobilenetv2]", f"ensemble.train_overrides=['trainer.epochs={args.epochs}']",
                     *store(out)]  # fmt: skip
        print("training 2 members on the MR pieces and ensembling ...", flush=True)
        ens = run_segx("ensemble", overrides, base / "mr_demo_logs" / "ensemble.log")
        run_id = ensemble_run_id(ens["lines"])
        inputs = work / "held_out"
        inputs.mkdir()
        shutil.copy(folder / "imagesTr" / "mr_z10_0000.nii.gz", inputs / "mr_z10_0000.nii.gz")
        pred = run_segx("predict", [*store(out), f"ensemble_run_id={run_id}", f"input_dir={inputs}",
                                    f"output_dir={work / 'labels'}"], base / "mr_demo_logs" / "predict.log")  # fmt: skip
        source, written = (
            nib.load(str(inputs / "mr_z10_0000.nii.gz")),
            nib.load(str(work / "labels" / "masks" / "mr_z10.nii.gz")),
        )
        truth = np.asarray(nib.load(str(folder / "labelsTr" / "mr_z10.nii.gz")).dataobj)
        predicted = np.asarray(written.dataobj)
        table = None
        try:
            import pandas as pd

            per_volume = pd.read_csv(artifact(out, run_id, "tables/test_per_volume.csv"))
            row = per_volume[per_volume.method == "ensemble"].iloc[0]
            table = {k: float(row[k]) for k in per_volume.columns if k.startswith(("dice", "hd95", "nsd"))}
        except (SystemExit, IndexError) as exc:
            print(f"no per-volume table read: {exc}")
        payload = {
            "dataset": args.dataset,
            "pieces": built["pieces"],
            "dropped_values": built["dropped_values"],
            "source_voxels": built["source_voxels"],
            "epochs": args.epochs,
            "image_size": args.image_size,
            "members": ["resnet18", "mobilenetv2"],
            "ensemble": {k: v for k, v in ens.items() if k != "lines"},
            "predict": {k: v for k, v in pred.items() if k != "lines"},
            "affine_equal": bool(np.array_equal(source.affine, written.affine)),
            "shape_equal": source.shape == written.shape,
            "input_affine": source.affine.tolist(),
            "output_affine": written.affine.tolist(),
            "axcodes": ["".join(nib.aff2axcodes(source.affine)), "".join(nib.aff2axcodes(written.affine))],
            "qform_sform_codes": [
                [int(source.header["qform_code"]), int(source.header["sform_code"])],
                [int(written.header["qform_code"]), int(written.header["sform_code"])],
            ],
            "dtype": str(written.get_data_dtype()),
            "label_values_written": sorted(int(v) for v in np.unique(predicted)),
            "dice_numpy": {n: dice(predicted, truth, v) for n, v in KEEP.items()},
            "voxels_truth": {n: int((truth == v).sum()) for n, v in KEEP.items()},
            "voxels_predicted": {n: int((predicted == v).sum()) for n, v in KEEP.items()},
            "ensemble_test_per_volume": table,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        save("mr_demo", payload)
        print(f"affine equal: {payload['affine_equal']}, shape equal: {payload['shape_equal']}, "
              f"codes {payload['qform_sform_codes']}")  # fmt: skip
        for name, value in payload["dice_numpy"].items():
            print(f"{name:<14} Dice {'-' if value is None else f'{value:.4f}'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
