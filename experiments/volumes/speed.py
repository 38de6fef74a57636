"""Slice-wise inference on volumes against the plain 2D path on the same pixels (issue 29's target:
2D time / volume time at least 0.9, i.e. the volume path at most ~10% slower).

    python experiments/volumes/speed.py [--work /tmp/segx-volbench] [--repeats 5] [--batch-size 8]
                                        [--volumes N]

One process, one trained ensemble (flow.py's: three members on ``data=synthetic_volumes``; run
flow.py first), loaded once. The same ``--volumes`` scans (all of flow.py's, by default) are
predicted two ways, alternating (volume first in even repeats, 2D first in odd ones), after one
untimed warm-up call of each:

- **volume**: ``segx.inference.volume_folder.predict_volume_folder`` on a folder of the scans
  (``<case>_0000.nii.gz``): reads each NIfTI, normalises and slices it by the members' plan,
  predicts its slices ``--batch-size`` at a time, decides the volume as one case and writes a
  label volume on the scan's grid;
- **2D**: ``segx.inference.folder.predict_folder`` on a folder of PNGs holding exactly the slices
  the volume path feeds the members (``SlicedVolume.image(i)``, written once before timing):
  reads each PNG, predicts ``--batch-size`` at a time, writes one mask PNG per slice.

Both write masks only (no overlays, uncertainty or probabilities) into a fresh folder per call
(removed after). A third arm, **network**, times ``EnsemblePredictor.predict`` on the same slices
already in memory, in the same batches: what is left when no file is read or written.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from common import WORK, load_average, save

from segx.benchmark.helpers import read_results, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=str, default=str(WORK))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--volumes", type=int, default=None, help="the first N of flow.py's scans (default: all)")
    args = parser.parse_args()
    flow = read_results(Path(__file__).resolve().parent).get("flow")
    if not flow:
        raise SystemExit("run experiments/volumes/flow.py first: this script predicts with its ensemble")
    import cv2
    import numpy as np

    from segx import tracking
    from segx.data.io import write_png
    from segx.data.volume_prep import SlicedVolume, SlicePlan, slice_stem
    from segx.inference.folder import Batching, PredictOutputs, predict_folder
    from segx.inference.volume_folder import find_volumes, predict_volume_folder, read_input, volumes_json
    from segx.tracking.ensembles import fetch_ensemble
    from segx.workflows.predict import load_ensemble

    work = Path(args.work) / "speed"
    shutil.rmtree(work, ignore_errors=True)
    store, run_id, root = Path(flow["store"]), flow["ensemble_run_id"], Path(flow["data_root"])
    client = tracking.connect(f"sqlite:///{store}/mlflow.db", create=False)
    cache = work / "ensemble"
    record, predictor = load_ensemble(client, run_id, cache)
    _, model_paths = fetch_ensemble(client, run_id, cache)
    volumes = volumes_json(model_paths)
    plan = SlicePlan.from_json(volumes["plan"])
    ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (root / "imagesTr").glob("*_0000.nii.gz"))
    ids = ids[: args.volumes] if args.volumes else ids
    vol_in, png_in = work / "volumes", work / "slices"
    vol_in.mkdir(parents=True)
    png_in.mkdir(parents=True)
    for case in ids:
        (vol_in / f"{case}_0000.nii.gz").symlink_to(root / "imagesTr" / f"{case}_0000.nii.gz")
    max_voxels = 512 * 512 * 1024
    slices: list[np.ndarray] = []
    shapes = set()
    for case in find_volumes(vol_in, len(plan.norms)):
        volume = read_input(case, max_voxels)
        sliced = SlicedVolume(volume.array, None, volume.spacing_zyx, plan)
        for i in range(sliced.n):
            image = sliced.image(i)
            slices.append(image)
            shapes.add(image.shape)
            write_png(png_in / f"{slice_stem(case.case, i)}.png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    outputs = PredictOutputs()
    batch = args.batch_size

    def volume(out: Path) -> int:
        return predict_volume_folder(predictor, volumes, vol_in, out, outputs, batch, max_voxels)

    def flat(out: Path) -> int:
        return predict_folder(predictor, png_in, out, outputs, Batching(batch))

    def network(out: Path) -> int:
        for start in range(0, len(slices), batch):
            predictor.predict(slices[start : start + batch])
        return len(slices)

    arms = {"volume": volume, "2d": flat, "network": network}
    times: dict[str, list[float]] = {name: [] for name in arms}
    counter = 0

    def timed(name: str, keep: bool) -> float:
        nonlocal counter
        counter += 1
        out = work / "out" / f"{counter:03d}-{name}"
        start = time.perf_counter()
        arms[name](out)
        seconds = time.perf_counter() - start
        if keep:
            times[name].append(seconds)
        if name != "network" and counter > 3:  # the warm-up outputs are kept for the agreement check
            shutil.rmtree(out)
        return seconds

    load_start = load_average()
    for name in ("volume", "2d", "network"):  # warm-up: graphs traced, files in the page cache
        timed(name, keep=False)
    for r in range(args.repeats):
        order = ("volume", "2d", "network") if r % 2 == 0 else ("2d", "volume", "network")
        for name in order:
            print(f"repeat {r + 1} {name}: {timed(name, keep=True):.2f} s", flush=True)
    load_end = load_average()
    ratios = [b / a for a, b in zip(times["volume"], times["2d"], strict=True)]  # 2D time / volume time
    # Do the two paths write the same labels? (the volume path decides each volume as one case)
    from segx.data.volume_io import read_volume

    agree, total, identical = 0, 0, 0
    for case in ids:
        labels = read_volume(work / "out" / "001-volume" / "masks" / f"{case}.nii.gz", max_voxels).array
        planes = [cv2.imread(str(work / "out" / "002-2d" / "masks" / f"{slice_stem(case, i)}.png"),
                             cv2.IMREAD_UNCHANGED) for i in range(labels.shape[0])]  # fmt: skip
        flat_labels = np.stack(planes)
        agree += int((flat_labels == labels).sum())
        total += labels.size
        identical += int(np.array_equal(flat_labels, labels))
    members = [m for m, c in zip(record.members, record.weights.counts, strict=True) if c]
    payload = {
        "ensemble_run_id": run_id,
        "members_used": len(members),
        "volumes": len(ids),
        "slices": len(slices),
        "slice_shapes": sorted(shapes),
        "batch_size": batch,
        "repeats": args.repeats,
        "times_s": times,
        "ratio_2d_over_volume": ratios,
        "ratio_spread": spread(ratios, 3),
        "ratio_median": statistics.median(ratios),
        "network_over_volume": [n / v for v, n in zip(times["volume"], times["network"], strict=True)],
        "voxels_equal_fraction": agree / total,
        "volumes_identical": identical,
        "load_start": load_start,
        "load_end": load_end,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save("speed", payload)
    shutil.rmtree(work / "out", ignore_errors=True)
    print(f"volume  {spread(times['volume'])} s")
    print(f"2d      {spread(times['2d'])} s")
    print(f"network {spread(times['network'])} s")
    print(f"2D time / volume time: {payload['ratio_spread']} (target >= 0.9)")
    print(f"voxels where the two paths agree: {payload['voxels_equal_fraction']:.6f}; identical volumes {identical}")


if __name__ == "__main__":
    main()
