"""What the exported ensemble costs and gains: images per second of the same ensemble through
segx's TensorFlow predictor, the exported SavedModel and ONNX Runtime; file sizes; load times
(issue 14).

    python experiments/export/benchmark.py [--size 64] [--images 32] [--image-size 128]
                                           [--rounds 5] [--load-rounds 2] [--tta none]

The ensemble: the three members ``make ensemble`` trains (resnet18, mobilenetv2, efficientnetb0
Unets, random init: speed does not depend on the weights), saved as segx saves members, at
``--size`` px in resize mode, equal weights, threshold 0.5, ``--tta``. It is exported with
``segx.inference.export_graph.export_ensemble`` to both formats, each in a fresh process
(time and peak memory recorded).

- **throughput**: one process holds the three predictors (``EnsemblePredictor``: segx.predict's
  backend=keras; ``ExportedPredictor`` on the SavedModel and on the ONNX model), each warmed up
  by one call; then ``--rounds`` rounds, each predicting the same ``--images`` random uint8 RGB
  images of ``--image-size`` px through ``predict`` (resize, networks, quantisation, weights,
  threshold, back at the image's size: everything segx.predict does but reading and writing
  files), the order of the three rotated from round to round. images/s per round; ratios are
  taken within a round. The masks of each export are compared with the TensorFlow predictor's.
- **load**: ``--load-rounds`` rounds of one fresh process per runtime (order rotated): the time
  to import what that runtime needs, to load the ensemble (build + weights, ``tf.saved_model.load``,
  ``onnxruntime.InferenceSession``) and to predict the first batch of 8 images (graph tracing
  included).

Writes experiments/export/results.json (after each round) and RESULTS.md (``--report-only``
rewrites it from results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segx.benchmark.helpers import read_results, spread, write_results

OUT = Path(__file__).resolve().parent
ROOT = OUT.parent.parent
BACKBONES = ("resnet18", "mobilenetv2", "efficientnetb0")
RUNTIMES = ("keras", "savedmodel", "onnx")
LABELS = {
    "keras": "segx TF predictor (backend=keras)",
    "savedmodel": "SavedModel (backend=savedmodel)",
    "onnx": "ONNX Runtime (backend=onnx)",
}


def build(work: Path, size: int, tta: str) -> tuple[dict, list[Path], dict]:
    """Members saved as segx saves them, the record, and both exports (each in a fresh process,
    for its time and peak memory)."""
    from segx.backend import keras
    from segx.member_spec import MemberSpec
    from segx.models import build_model, save_member

    paths = []
    for i, backbone in enumerate(BACKBONES):
        keras.utils.set_random_seed(i)
        model = build_model("unet", backbone, size)
        paths.append(save_member(model, work / "members" / backbone, MemberSpec("unet", backbone, size)))
    view = {"mode": "resize", "size": size, "resize_mode": "resize"}
    n = len(BACKBONES)
    record = {
        "format": "segx-ensemble",
        "version": 3,
        "tta": tta,
        "threshold": 0.5,
        "postprocess": {},
        "weight_denominator": n,
        "members": [
            {"run_id": f"bench{i}", "backbone": b, "arch": "unet", "weight": 1 / n, "weight_count": 1, "view": view}
            for i, b in enumerate(BACKBONES)
        ],
    }
    (work / "record.json").write_text(json.dumps(record))
    exports = {}
    for fmt in ("savedmodel", "onnx"):
        proc = subprocess.run(
            [sys.executable, __file__, "--export-child", fmt, str(work)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            cwd=ROOT,
            timeout=1800,
        )
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        exports[fmt] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"exported {fmt}: {exports[fmt]}", flush=True)
    return record, paths, exports


def export_child(fmt: str, work: str) -> None:
    """One fresh process: export_ensemble; prints one JSON line (seconds, peak memory, sizes)."""
    import resource

    from segx.ensembling.record import EnsembleRecord
    from segx.inference.export_graph import export_ensemble
    from segx.inference.export_plan import ExportSettings

    work = Path(work)
    record = json.loads((work / "record.json").read_text())
    started = time.perf_counter()
    manifest = export_ensemble(
        EnsembleRecord.from_json(record), [work / "members" / b for b in BACKBONES], work / fmt, ExportSettings(fmt)
    )
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "check": manifest["check"]["member_probabilities_max_abs_diff"],
                "bytes": sum(manifest["sizes_bytes"].values()),
                "opset": manifest["opset"],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_child(runtime: str, work: str) -> None:
    """One fresh process: import, load, first batch; prints one JSON line."""
    t0 = time.perf_counter()
    if runtime == "keras":
        from segx.ensembling.record import EnsembleRecord
        from segx.inference.predictor import EnsemblePredictor
        from segx.models import build_model  # noqa: F401 - TensorFlow, as segx.predict imports it
    else:
        from segx.inference.export_runtime import load_exported

        if runtime == "savedmodel":
            from segx.backend import tf  # noqa: F401
        else:
            import onnxruntime  # noqa: F401
    t1 = time.perf_counter()
    work = Path(work)
    if runtime == "keras":
        record = json.loads((work / "record.json").read_text())
        predictor = EnsemblePredictor(EnsembleRecord.from_json(record), [work / "members" / b for b in BACKBONES])
    else:
        predictor = load_exported(work / runtime)
    t2 = time.perf_counter()
    images = list(np.random.default_rng(1).integers(0, 256, (8, 128, 128, 3), dtype=np.uint8))
    predictor.predict(images)
    t3 = time.perf_counter()
    tf_loaded = any(m.startswith("tensorflow") for m in sys.modules)
    print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_batch": t3 - t2, "tensorflow_imported": tf_loaded}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load-rounds", type=int, default=2)
    parser.add_argument("--tta", default="none", choices=("none", "flip"))
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    parser.add_argument("--load-child", nargs=2, metavar=("RUNTIME", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--export-child", nargs=2, metavar=("FORMAT", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        load_child(*args.load_child)
        return
    if args.export_child:
        export_child(*args.export_child)
        return
    if args.report_only:
        write_report()
        return

    from segx.benchmark.study import machine
    from segx.ensembling.record import EnsembleRecord
    from segx.inference.export_runtime import load_exported
    from segx.inference.predictor import EnsemblePredictor

    work = Path(tempfile.mkdtemp(prefix="segx-export-bench-"))
    from importlib import metadata

    info = {**machine(), **{name: metadata.version(name) for name in ("onnxruntime", "tf2onnx", "onnx")}}
    saved = {
        "args": {k: v for k, v in vars(args).items() if k not in ("report_only", "load_child", "export_child")},
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "machine": info,
        "load": [],
    }
    record, paths, exports = build(work, args.size, args.tta)
    saved["exports"] = exports
    saved["bytes"] = {
        "keras": sum((p / "weights.h5").stat().st_size for p in paths),
        "keras_with_model_keras": sum(folder_bytes(p) for p in paths),
        "savedmodel": folder_bytes(work / "savedmodel" / "saved_model"),
        "onnx": (work / "onnx" / "model.onnx").stat().st_size,
    }

    # Load times, fresh processes, rotated order.
    saved["load_seconds"] = {r: [] for r in RUNTIMES}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for round_ in range(args.load_rounds):
        shift = round_ % len(RUNTIMES)
        for runtime in RUNTIMES[shift:] + RUNTIMES[:shift]:
            proc = subprocess.run(
                [sys.executable, __file__, "--load-child", runtime, str(work)],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=600,
            )
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            saved["load_seconds"][runtime].append(result)
            print(f"load round {round_ + 1} {runtime}: {result}", flush=True)

    # Throughput, one process, rotated order.
    predictors = {
        "keras": EnsemblePredictor(EnsembleRecord.from_json(record), paths),
        "savedmodel": load_exported(work / "savedmodel"),
        "onnx": load_exported(work / "onnx"),
    }
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (args.images, args.image_size, args.image_size, 3), dtype=np.uint8))
    reference = [p.mask for p in predictors["keras"].predict(images)]  # also the keras warm-up
    saved["mask_pixels_differing"] = {}
    for runtime in ("savedmodel", "onnx"):
        masks = [p.mask for p in predictors[runtime].predict(images)]  # warm-up
        saved["mask_pixels_differing"][runtime] = int(
            sum((a != b).sum() for a, b in zip(reference, masks, strict=True))
        )
    saved["mask_pixels"] = int(sum(m.size for m in reference))
    saved["seconds"] = {r: [] for r in RUNTIMES}
    OUT.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.rounds):
        shift = round_ % len(RUNTIMES)
        for runtime in RUNTIMES[shift:] + RUNTIMES[:shift]:
            started = time.perf_counter()
            predictors[runtime].predict(images)
            seconds = time.perf_counter() - started
            saved["seconds"][runtime].append(seconds)
            print(f"round {round_ + 1} {runtime}: {args.images / seconds:.1f} img/s", flush=True)
        saved["load"].append(os.getloadavg()[0])
        saved["rounds_done"] = round_ + 1
        write_results(OUT, saved)
        write_report(quiet=True)
    write_report()


def write_report(quiet: bool = False) -> None:
    """RESULTS.md from results.json."""
    saved = read_results(OUT)
    args, info, n = saved["args"], saved["machine"], saved["args"]["images"]
    rate = {r: [n / s for s in saved["seconds"][r]] for r in RUNTIMES}
    ratio = {r: [a / b for a, b in zip(rate[r], rate["keras"], strict=True)] for r in RUNTIMES}
    onnx_vs_sm = [a / b for a, b in zip(rate["onnx"], rate["savedmodel"], strict=True)]
    mb = {k: v / 1e6 for k, v in saved["bytes"].items()}
    rows = []
    for r in RUNTIMES:
        loads = saved["load_seconds"][r]
        rows.append(
            f"| {LABELS[r]} | {spread(rate[r], 1)} | {spread(ratio[r], 2) if r != 'keras' else '1'} | "
            f"{mb[r]:.1f} | {spread([x['import'] for x in loads], 1)} | {spread([x['load'] for x in loads], 1)} | "
            f"{spread([x['first_batch'] for x in loads], 2)} | {'yes' if all(x['tensorflow_imported'] for x in loads) else 'no'} |"
        )
    exports = saved["exports"]
    differ = saved["mask_pixels_differing"]
    faster = statistics.median(ratio["savedmodel"]) >= 1 and statistics.median(ratio["onnx"]) >= 1
    onnx_median = statistics.median(onnx_vs_sm)
    load = saved.get("load") or [float("nan")]
    verdict = (
        f"Target 'the exported ensemble at least as fast as segx's own predictor': "
        f"{'met' if faster else 'not met'} (median images/s ratio to the TF predictor: SavedModel "
        f"{statistics.median(ratio['savedmodel']):.2f}, ONNX Runtime {statistics.median(ratio['onnx']):.2f}; "
        f"min-max over rounds in the table). ONNX Runtime against the SavedModel, same round: "
        f"{spread(onnx_vs_sm, 2)}, so ONNX Runtime is {'faster' if onnx_median > 1 else 'not faster'} than "
        "TensorFlow on this CPU"
        + (
            " in every round"
            if min(onnx_vs_sm) > 1
            else " in the median, not in every round"
            if onnx_median > 1
            else ""
        )
        + "."
    )
    text = (
        "# The exported ensemble: speed, size and load time (SavedModel, ONNX Runtime, segx's predictor)\n\n"
        f"`python experiments/export/benchmark.py --size {args['size']} --images {args['images']} --image-size "
        f"{args['image_size']} --rounds {args['rounds']} --load-rounds {args['load_rounds']} --tta {args['tta']}` "
        f"({saved['started']}; {saved.get('rounds_done', 0)} of {args['rounds']} rounds done). Machine: "
        f"{info.get('cpu')}, {info.get('cores')} cores, tensorflow {info.get('tensorflow', '?')}, tf2onnx "
        f"{info.get('tf2onnx', '?')}, onnxruntime {info.get('onnxruntime', '?')}; shared with other jobs (1-minute "
        "load average after each round "
        f"{min(load):.1f}-{max(load):.1f}: treat single timings with suspicion).\n\n"
        f"The ensemble: {', '.join(BACKBONES)} Unets (random init) at {args['size']} px, resize mode, equal "
        f"weights, threshold 0.5, tta={args['tta']}; {args['images']} random uint8 RGB images of "
        f"{args['image_size']} x {args['image_size']} px per round, through each predictor's `predict` (resize, "
        "networks, uint8 quantisation, weights, threshold, back at each image's size). Exported with "
        f"`segx.inference.export_graph.export_ensemble` in a fresh process each: SavedModel in "
        f"{exports['savedmodel']['seconds']:.0f} s (peak memory {exports['savedmodel']['peak_rss_mb'] / 1024:.1f} GB), "
        f"ONNX (opset {exports['onnx']['opset']}, tf2onnx) in {exports['onnx']['seconds']:.0f} s (peak memory "
        f"{exports['onnx']['peak_rss_mb'] / 1024:.1f} GB: tf2onnx needs some 60-70 times a network's weights while "
        "it converts it, so segx converts one network at a time).\n\n"
        "images/s: median (min-max) over rounds, the three predictors in one process, the order rotated "
        "each round; 'vs TF' is the ratio to the TF predictor in the same round. Load: fresh processes, "
        "median (min-max) of the rounds: import (what that runtime needs: TensorFlow for the first two, "
        "onnxruntime and numpy only for ONNX), load (rebuild members + weights / `tf.saved_model.load` / "
        "`InferenceSession`), first batch of 8 images (tracing included). Size: the model files "
        f"(members: their `weights.h5`; with the `.keras` copies segx also keeps, {mb['keras_with_model_keras']:.1f} MB).\n\n"
        + verdict
        + "\n\n"
        "| predictor | images/s | vs TF | size MB | import s | load s | first batch s | imports TensorFlow |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Agreement with the TF predictor on the {saved['mask_pixels']} mask pixels of one round: SavedModel "
        f"{differ['savedmodel']} differ, ONNX Runtime {differ['onnx']} differ (largest difference of a member "
        f"probability on the export's check batch: SavedModel {exports['savedmodel']['check']:.2g}, ONNX "
        f"{exports['onnx']['check']:.2g}).\n"
    )
    write_results(OUT, report=text)
    if not quiet:
        print(text)


if __name__ == "__main__":
    main()
