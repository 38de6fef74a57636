"""What an ensemble of three members costs to predict, against the sum of its members alone, and
what running every member in one compiled function (``NetworkGroup``) gains over one call per
member (issue 15).

    python experiments/ensemble_speed.py [--sizes 64 128] [--images 48] [--rounds 5] [--tta none flip]

The ensemble: the three members ``make ensemble`` trains (resnet18, mobilenetv2, efficientnetb0
U-Nets, random init: speed does not depend on the weights), saved as segx saves members, in
resize mode at each ``--sizes`` px, equal weights, threshold 0.5. The images: the first
``--images`` DSB2018 training images at their own sizes (256x256 to 1024x1360 px;
``../shared/datasets/dsb2018_nuclei``), or random 256 px images where that folder is missing.

Per size and TTA, one process holds five predictors over the same networks: each member alone
(``EnsemblePredictor`` of that member with weight 1), the ensemble with one call per network
(``fused=False``) and the ensemble with one compiled function (``fused=True``, the default),
each warmed up once. Then ``--rounds`` rounds, each timing ``predict`` on all the images (resize,
networks, quantisation, weights, threshold, resize back: everything ``segx.predict`` does but
read and write files) for the five, in an order rotated from round to round. Ratios are taken
within a round; the table gives their median and range. The masks of the two ensembles are
compared (they must be equal).

Writes experiments/ensemble_speed/results.json (after each setting) and RESULTS.md
(``--report-only`` rewrites it from results.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segx.benchmark.helpers import read_results, spread, write_results

OUT = Path(__file__).resolve().parent / "ensemble_speed"
ROOT = OUT.parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets" / "dsb2018_nuclei" / "train_images"
BACKBONES = ("resnet18", "mobilenetv2", "efficientnetb0")


def load_images(n: int) -> tuple[list[np.ndarray], str]:
    import cv2

    files = sorted(DATA.glob("*.png"))[:n] if DATA.is_dir() else []
    if files:
        images = [cv2.cvtColor(cv2.imread(str(f), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for f in files]
        sizes = sorted({im.shape[:2] for im in images})
        return (
            images,
            f"the first {len(images)} DSB2018 training images at their own sizes ({len(sizes)} sizes, "
            f"{sizes[0][1]}x{sizes[0][0]} to {sizes[-1][1]}x{sizes[-1][0]} px)",
        )
    rng = np.random.default_rng(0)
    return list(
        rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    ), f"{n} random 256x256 images (DSB2018 not found)"


def build_members(work: Path, size: int) -> tuple[dict, list[Path]]:
    from segx.backend import keras
    from segx.member_spec import MemberSpec
    from segx.models import build_model, save_member

    paths = []
    for i, backbone in enumerate(BACKBONES):
        keras.utils.set_random_seed(i)
        model = build_model("unet", backbone, size)
        paths.append(save_member(model, work / f"{backbone}-{size}", MemberSpec("unet", backbone, size)))
    view = {"mode": "resize", "size": size, "resize_mode": "resize"}
    n = len(BACKBONES)
    record = {
        "format": "segx-ensemble",
        "version": 3,
        "tta": "none",
        "threshold": 0.5,
        "postprocess": {},
        "weight_denominator": n,
        "members": [
            {"run_id": f"bench{i}", "backbone": b, "arch": "unet", "weight": 1 / n, "weight_count": 1, "view": view}
            for i, b in enumerate(BACKBONES)
        ],
    }
    return record, paths


def measure(size: int, tta: str, images: list[np.ndarray], rounds: int, work: Path) -> dict:
    from segx.ensembling.record import EnsembleRecord
    from segx.inference.predictor import EnsemblePredictor

    record, paths = build_members(work, size)
    record["tta"] = tta
    predictors = {
        **{
            b: EnsemblePredictor(
                EnsembleRecord.from_json(
                    {**record, "weight_denominator": 1, "members": [dict(m, weight=1.0, weight_count=1)]}
                ),
                [p],
            )
            for b, m, p in zip(BACKBONES, record["members"], paths, strict=True)
        },
        "separate": EnsemblePredictor(EnsembleRecord.from_json(record), paths, fused=False),
        "fused": EnsemblePredictor(EnsembleRecord.from_json(record), paths, fused=True),
    }
    for predictor in predictors.values():
        predictor.predict(images[:8])  # traces the graphs
    names = list(predictors)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    masks = {}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            result = predictors[name].predict(images)
            seconds[name].append(time.perf_counter() - t0)
            if name in ("separate", "fused"):
                masks[name] = [p.mask for p in result]
        print(f"size {size} tta {tta} round {r}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names), flush=True)
    equal = all(np.array_equal(a, b) for a, b in zip(masks["separate"], masks["fused"], strict=True))
    sums = [sum(seconds[b][r] for b in BACKBONES) for r in range(rounds)]
    ratio = {
        "fused_over_sum": [seconds["fused"][r] / sums[r] for r in range(rounds)],
        "separate_over_sum": [seconds["separate"][r] / sums[r] for r in range(rounds)],
        "speedup_fused_over_separate": [seconds["separate"][r] / seconds["fused"][r] for r in range(rounds)],
    }
    return {
        "size": size,
        "tta": tta,
        "images": len(images),
        "rounds": rounds,
        "seconds": seconds,
        "sum_of_members": sums,
        "ratios": ratio,
        "masks_equal": equal,
    }


def write_report(results: dict) -> None:
    lines = [
        "# Ensemble prediction: three members against the sum of their times",
        "",
        f"`{results['command']}` ({results['date']}, {results['machine']}). Members: "
        f"{', '.join(BACKBONES)} U-Nets (random init), resize mode, equal weights; images: {results['images']}. "
        "Each row: one process, five predictors timed in rotated order over the rounds; median (min-max) over rounds, "
        "ratios taken within a round. `separate`: one compiled call per member network (segx before this "
        "change); `fused`: every member in one compiled function (the default now).",
        "",
        "| px | TTA | members alone s (each) | sum s | separate s | fused s | fused / sum | separate / sum | fused "
        "speed-up over separate | masks equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        each = ", ".join(f"{statistics.median(row['seconds'][b]):.2f}" for b in BACKBONES)
        r = row["ratios"]
        lines.append(
            f"| {row['size']} | {row['tta']} | {each} | {spread(row['sum_of_members'])} | {spread(row['seconds']['separate'])} | "
            f"{spread(row['seconds']['fused'])} | {spread(r['fused_over_sum'], 3)} | {spread(r['separate_over_sum'], 3)} | "
            f"x{spread(r['speedup_fused_over_separate'], 3)} | {'yes' if row['masks_equal'] else 'NO'} |"
        )
    lines += [
        "",
        "The target (issue 15): the ensemble predicts in no more than the sum of its members' times "
        "(fused / sum <= 1). No files are read or written here. Each member alone resizes every image to "
        "its input; the fused ensemble resizes each image once for all its members and runs them in one call, "
        "so part of its gain is that shared work, part TensorFlow running three small networks' ops side by "
        "side on the two cores. Both ensembles combine the members and threshold, which the members alone do "
        "not; `separate / sum` near 1 says that costs little.",
        "",
    ]
    write_results(OUT, report="\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tta", nargs="+", default=["none", "flip"])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(read_results(OUT))
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    images, described = load_images(args.images)
    results = {
        "command": "python experiments/ensemble_speed.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "images": described,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="segx-ensemble-speed-") as work:
        for size in args.sizes:
            for tta in args.tta:
                results["rows"].append(measure(size, tta, images, args.rounds, Path(work)))
                write_results(OUT, results)
                write_report(results)
    print((OUT / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
