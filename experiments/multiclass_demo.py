"""Time the README's multi-class commands on the embedded synthetic data, from an empty store.

    python experiments/multiclass_demo.py                 # train, search, predict (5-15 min on 2 cores)
    python experiments/multiclass_demo.py --report-only   # rewrite RESULTS.md from results.json

Runs, into a fresh temporary folder (the store, the MLflow artifacts, the generated data, Keras's
and Matplotlib's caches all inside it, so ``outputs/`` and ``data/`` are neither reused nor
touched):

1. ``python -m segx.ensemble data=synthetic_multiclass ensemble.train_missing=true``: the three
   default members (resnet18, mobilenetv2, efficientnetb0, the default epochs) trained on the
   four-class data (background, left_lobe, right_lobe, vessel), then the ensemble searched; timed;
2. ``python -m segx.predict ensemble_run_id=<id> input_dir=<data>/train_images output_dir=<tmp>/pred
   overlays=true save_probabilities=true``, and checks that every label map holds only 0..3.

Copies into experiments/multiclass_demo/ the ensemble run's tables/test_summary.csv,
tables/test_per_class.csv, tables/gain.csv, tables/test_per_case.csv (for the per-class intervals
below), plots/test_cases.png and one prediction overlay (a test case), and writes results.json and
RESULTS.md: wall time, machine, the per-class test Dice / IoU / HD95 of every method, the
ensemble's gain over its best member with segx's 95% paired bootstrap interval, and, per class,
the same paired bootstrap computed here from the per-case table.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segx.benchmark.helpers import machine, read_results, write_results


def _image_size() -> int:
    """The members' input size, as conf/data/synthetic_multiclass.yaml sets it."""
    text = (Path(__file__).resolve().parent.parent / "conf" / "data" / "synthetic_multiclass.yaml").read_text()
    return int(re.search(r"^image_size:\s*(\d+)", text, re.M).group(1))


ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "multiclass_demo"
CLASSES = {"background": 0, "left_lobe": 1, "right_lobe": 2, "vessel": 3}  # conf/data/synthetic_multiclass.yaml
MAX_BYTES = 500 * 1024  # every copied file stays small
TABLES = ("test_summary.csv", "test_per_class.csv", "gain.csv", "test_per_case.csv")
ENSEMBLE = "python -m segx.ensemble data=synthetic_multiclass ensemble.train_missing=true"
PREDICT = (
    "python -m segx.predict ensemble_run_id=<id> input_dir=<data>/train_images output_dir=<tmp>/pred "
    "overlays=true save_probabilities=true"
)


def main() -> None:
    if sys.argv[1:] == ["--report-only"]:
        write_report()
        return
    if sys.argv[1:]:
        sys.exit(__doc__)
    facts = run()
    write_results(OUT, facts)
    write_report()


def _run(command: list[str], env: dict, log: Path) -> float:
    """Run ``command`` from the repository root with stdout and stderr into ``log``; its seconds.
    Exits with the command and the end of the log when it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        shown = " ".join(command[2:])
        sys.exit(f"failed ({done.returncode}) after {seconds:.0f} s: python {shown}\n{log.read_text()[-4000:]}")
    return seconds


def run() -> dict:
    import cv2
    import numpy as np
    import pandas as pd

    from segx.evaluation.report import paired_bootstrap

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="segx-multiclass-demo-") as tmp:
        store = Path(tmp)
        data = store / "data"
        common = [
            f"paths.output_dir={store}",
            f"mlflow.tracking_uri=sqlite:///{store}/mlflow.db",
            f"mlflow.artifact_root={store}/mlartifacts",
        ]
        env = dict(os.environ, KERAS_HOME=str(store / ".keras"), MPLCONFIGDIR=str(store / ".mpl"))
        ensemble = [
            sys.executable,
            "-m",
            "segx.ensemble",
            "data=synthetic_multiclass",
            "ensemble.train_missing=true",
            f"data.root={data}",
            *common,
        ]
        print(f"multiclass demo: {' '.join(ensemble[2:])} (log: {store / 'ensemble.log'})", flush=True)
        seconds = _run(ensemble, env, store / "ensemble.log")
        log = (store / "ensemble.log").read_text()
        found = re.findall(r"segx: ensemble run ([0-9a-f]{32})\b", log)
        if not found:
            sys.exit(f"no ensemble run ID in the log:\n{log[-3000:]}")
        run_id = found[-1]
        artifacts = next(store.glob(f"mlartifacts/*/{run_id}/artifacts"), None)
        if artifacts is None:  # artifact layout differs (e.g. a run ID folder one level deeper)
            artifacts = next(store.rglob(f"{run_id}/**/tables/test_per_class.csv")).parent.parent

        pred = store / "pred"
        predict = [
            sys.executable,
            "-m",
            "segx.predict",
            f"ensemble_run_id={run_id}",
            f"input_dir={data / 'train_images'}",
            f"output_dir={pred}",
            "overlays=true",
            "save_probabilities=true",
            *common,
        ]
        print(f"multiclass demo: {' '.join(predict[2:])}", flush=True)
        predict_seconds = _run(predict, env, store / "predict.log")

        # The label maps: one per input, at the input's size, values 0..3 only.
        inputs = sorted((data / "train_images").glob("*.png"))
        seen: set[int] = set()
        bad, pixels = [], dict.fromkeys(CLASSES, 0)
        for image in inputs:
            mask = cv2.imread(str(pred / "masks" / image.name), cv2.IMREAD_UNCHANGED)
            if mask is None or mask.ndim != 2 or mask.shape != cv2.imread(str(image)).shape[:2]:
                bad.append(image.name)
                continue
            values = np.unique(mask)
            seen.update(int(v) for v in values)
            for name, value in CLASSES.items():
                pixels[name] += int((mask == value).sum())
        outside = sorted(seen - set(CLASSES.values()))
        if bad or outside:
            sys.exit(
                f"label maps: {len(bad)} missing or of the wrong shape ({bad[:5]}); values outside 0..3: {outside}"
            )
        total = sum(pixels.values())
        probabilities = sorted(p.name for p in (pred / "probabilities").glob("*.png"))

        # The files kept: small tables, the figure, one overlay of a test case.
        OUT.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            shutil.copy(artifacts / "tables" / name, OUT / name)
        shrunk = {"test_cases.png": _small_png(artifacts / "plots" / "test_cases.png", OUT / "test_cases.png")}
        per_case = pd.read_csv(OUT / "test_per_case.csv")
        test_stems = list(dict.fromkeys(per_case["stem"].astype(str)))
        overlay = pred / "overlays" / f"{test_stems[0]}.png"
        shutil.copy(overlay, OUT / f"overlay_{overlay.name}")
        copied = {p.name: p.stat().st_size for p in sorted(OUT.iterdir()) if p.suffix in (".csv", ".png")}
        large = {k: v for k, v in copied.items() if v >= MAX_BYTES}
        if large:
            sys.exit(f"copied files over {MAX_BYTES // 1024} KB: {large}")
        disk = {p.name: round(_size(p) / 2**20, 1) for p in sorted(store.iterdir()) if not p.name.startswith(".")}

    per_class = pd.read_csv(OUT / "test_per_class.csv", index_col=0)
    gain = pd.read_csv(OUT / "gain.csv").iloc[0].to_dict()
    # Per class: the same paired bootstrap as segx's gain (ensemble minus the member best on
    # validation, 2000 resamples, seed 0), over the test cases where both count the class.
    by_method = {m: t.set_index(t["stem"].astype(str)) for m, t in per_case.groupby("method", sort=False)}
    best = str(gain["best_member"])
    class_gain = {}
    for name in [c for c in CLASSES if c != "background"]:
        a = by_method["ensemble"].loc[test_stems, f"dice/{name}"].to_numpy()
        b = by_method[best].loc[test_stems, f"dice/{name}"].to_numpy()
        keep = np.isfinite(a) & np.isfinite(b)
        class_gain[name] = paired_bootstrap(a[keep], b[keep]) if keep.any() else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "commands": {"ensemble": ENSEMBLE, "predict": PREDICT},
        "seconds": round(seconds, 1),
        "predict_seconds": round(predict_seconds, 1),
        "ensemble_run_id": run_id,
        "test_cases": len(test_stems),
        "label_maps": {
            "files": len(inputs),
            "values": sorted(seen),
            "pixel_share": {k: round(v / total, 5) for k, v in pixels.items()},
            "probability_maps": len(probabilities),
        },
        "copied_bytes": copied,
        "shrunk": {k: v for k, v in shrunk.items() if v},
        "disk_mb": disk,
        "per_class": {m: {k: _float(v) for k, v in row.items()} for m, row in per_class.iterrows()},
        "gain": {k: (_float(v) if isinstance(v, float) else v) for k, v in gain.items()},
        "class_gain": class_gain,
    }


def _small_png(source: Path, target: Path) -> dict | None:
    """Copy the PNG ``source`` to ``target``; where it is over MAX_BYTES, re-encoded with a
    256-colour palette instead (octree: the figure's contours and grey levels survive it), then
    halved in size until it fits. None when copied as it was,
    else what was done (sizes in bytes and pixels)."""
    from PIL import Image

    size = source.stat().st_size
    if size < MAX_BYTES:
        shutil.copy(source, target)
        return None
    with Image.open(source) as image:
        image = image.convert("RGB")
    original = image.size
    while True:
        image.quantize(256, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)
        if target.stat().st_size < MAX_BYTES or min(image.size) < 200:
            break
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    return {
        "original_bytes": size,
        "original_pixels": list(original),
        "bytes": target.stat().st_size,
        "pixels": list(image.size),
        "how": "256-colour palette" + ("" if image.size == original else ", downscaled"),
    }


def _float(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _size(path: Path) -> int:
    """Bytes on disk under ``path`` (a file or a folder)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _tables(per_class: dict) -> str:
    """One table per metric: methods as rows, the foreground classes and their mean as columns."""
    names = [c for c in CLASSES if c != "background"]
    out = []
    for metric, title, digits in (
        ("dice", "Dice", 4),
        ("iou", "IoU", 4),
        ("hd95", "HD95 (pixels of the 128 px images)", 2),
    ):
        out.append(
            f"**Test {title}** (higher is better)" if metric != "hd95" else f"**Test {title}** (lower is better)"
        )
        out.append("\n\n| method | " + " | ".join(names) + " | foreground mean |\n")
        out.append("|---" * (len(names) + 2) + "|\n")
        for method, row in per_class.items():
            cells = [_fmt(row.get(f"{metric}/{n}"), digits) for n in names] + [_fmt(row.get(metric), digits)]
            out.append(f"| {method} | " + " | ".join(cells) + " |\n")
        out.append("\n")
    out.append(
        "HD95 of a class predicted in a case without it, or missed in a case with it, is the image "
        "diagonal (181.02 px at 128 px), so a few such cases dominate a class's HD95 mean.\n\n"
    )
    return "".join(out)


def _interval(g: dict) -> str:
    return f"{g['diff']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]"


def _verdict(g: dict) -> str:
    if g["low"] > 0:
        return "better (interval above zero)"
    if g["high"] < 0:
        return "worse (interval below zero)"
    return "not shown different (interval includes zero)"


def _statements(facts: dict) -> str:
    """What the numbers say, class by class, generated from them (so ``--report-only`` agrees)."""
    per_class, gain, class_gain = facts["per_class"], facts["gain"], facts["class_gain"]
    members = [m for m in per_class if m.startswith("member:")]
    short = lambda m: m.removeprefix("member:")  # noqa: E731
    predicted = facts["label_maps"]["values"]
    lines = []
    for name, g in class_gain.items():
        key, hd_key = f"dice/{name}", f"hd95/{name}"
        ens = per_class["ensemble"][key]
        scores = {m: per_class[m][key] for m in per_class if m != "ensemble" and per_class[m][key] is not None}
        text = f"- **{name}**: "
        if all(v == 0 for v in (*scores.values(), ens)):
            text += (
                f"no method finds it: Dice 0 for every method in all {g['cases'] if g else 0} test cases that "
                f"contain it, HD95 {per_class['ensemble'][hd_key]:.2f} px (the diagonal, a miss) for every method"
                + (
                    f"; and segx.predict's {facts['label_maps']['files']} label maps hold no pixel of it "
                    f"(value {CLASSES[name]} never written)"
                    if CLASSES[name] not in predicted
                    else ""
                )
                + ". The ensemble cannot recover a class that no member predicts. "
            )
        else:
            member_top = max(members, key=lambda m: per_class[m][key])
            text += (
                f"ensemble Dice {ens:.4f}; members "
                + ", ".join(f"{short(m)} {per_class[m][key]:.4f}" for m in members)
                + f" (best member on this class: {short(member_top)}, the ensemble {ens - per_class[member_top][key]:+.4f}). "
            )
            above = [m for m, v in scores.items() if v > ens + 5e-5]
            tied = [m for m, v in scores.items() if abs(v - ens) <= 5e-5]
            if above:
                top = max(above, key=scores.get)
                text += f"The ensemble loses on Dice to {', '.join(above)} (most: {top}, {ens - scores[top]:+.4f}). "
            else:
                text += "No method has a higher Dice" + (f" ({', '.join(tied)} ties)" if tied else "") + ". "
            hd = {m: per_class[m][hd_key] for m in per_class if per_class[m][hd_key] is not None}
            lowest = min(hd, key=hd.get)
            if hd["ensemble"] - hd[lowest] <= 0.005:
                text += f"HD95 {hd['ensemble']:.2f} px, the lowest (or tied). "
            else:
                text += (
                    f"HD95 {hd['ensemble']:.2f} px, {hd['ensemble'] - hd[lowest]:+.2f} px worse than the lowest "
                    f"({lowest}, {hd[lowest]:.2f} px). "
                )
        if g is None:
            text += "No test case counts this class for both methods, so there is no interval."
        elif g["low"] == g["high"] == 0:
            text += f"Against {gain['best_member']}: identical in all {g['cases']} cases (difference 0)."
        else:
            text += (
                f"Against {gain['best_member']} (best on validation): {_interval(g)} over {g['cases']} cases, "
                f"{_verdict(g)}."
            )
        lines.append(text)
    same = [
        m
        for m in per_class
        if m not in ("ensemble", *members)
        and all(
            (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-12)
            for a, b in ((per_class[m][k], per_class["ensemble"][k]) for k in per_class["ensemble"])
        )
    ]
    if same:
        lines.append(f"- The searched ensemble scores exactly as {', '.join(same)} on every class and metric.")
    zero = [n for n in class_gain if per_class["ensemble"][f"dice/{n}"] == 0]
    if zero:
        k = len(class_gain)
        lines.append(
            f"- The foreground mean averages the {k} classes, so {', '.join(zero)} at Dice 0 caps every method's "
            f"mean at {(k - len(zero)) / k:.3f}, and its HD95 of 181.02 px dominates the HD95 mean: the gain above "
            "comes from the lobes alone."
        )
    return "\n".join(lines) + "\n"


def write_report() -> None:
    """RESULTS.md from results.json (``--report-only`` rewrites it)."""
    facts = read_results(OUT)
    m, gain = facts["machine"], facts["gain"]
    minutes, secs = divmod(round(facts["seconds"]), 60)
    where = f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}"
    maps = facts["label_maps"]
    share = ", ".join(f"{k} {100 * v:.2f}%" for k, v in maps["pixel_share"].items())
    load = facts.get("load_average_1min_after", 0)
    text = (
        "# Multi-class ensemble on the embedded synthetic data, from an empty store\n\n"
        f"`python experiments/multiclass_demo.py` ({facts['date']}; {where}).\n\n"
        f"- `{facts['commands']['ensemble']}`: **{minutes} min {secs} s** wall time ({facts['seconds']} s), "
        f"install excluded: the data generated ({maps['files']} cases, 128 px, trained at {_image_size()} px), the three "
        "default members trained with their default epochs, the ensemble searched and logged. "
        f"Ensemble run `{facts['ensemble_run_id']}` (in a temporary store, deleted afterwards).\n"
        f"- `{facts['commands']['predict']}`: {facts['predict_seconds']} s for {maps['files']} images. "
        f"Every label map has the input's size and holds only the values {maps['values']} "
        f"(0..3 allowed); pixel shares: {share}. {maps['probability_maps']} per-class probability maps written.\n"
        + (
            f"- Load average (1 min) before / after: {facts['load_average_1min_before']} / {load}"
            + (" (other jobs were running: the time is inflated accordingly)" if load > 1.5 else "")
            + ".\n"
        )
        + (f"- Note: {facts['note']}\n" if facts.get("note") else "")
        + (
            f"- Disk left by the run (MB): {', '.join(f'{k} {v}' for k, v in facts['disk_mb'].items())}.\n"
            if facts.get("disk_mb")
            else ""
        )
        + f"\nTest split: {facts['test_cases']} cases. Per class, each method's mean over the test cases "
        "that count the class; the foreground mean is the mean of the three (the number the search "
        "optimises and the summary reports). Members and baselines use argmax label maps; `ensemble` "
        "is the searched weights with the chosen per-class post-processing.\n\n"
        + _tables(facts["per_class"])
        + "## Gain over the best member\n\n"
        f"Ensemble minus {gain['best_member']} (the member best on validation), per-case foreground-mean "
        f"test Dice: **{_interval(gain)}** (95% paired bootstrap, {int(gain['resamples'])} resamples, "
        f"{int(gain['cases'])} cases; share of resamples where the ensemble is not better: "
        f"{gain['p_not_better']:.3f}): {_verdict(gain)}. Test Dice {gain['ensemble_test_dice']:.4f} vs "
        f"{gain['best_member_test_dice']:.4f}. Selection optimism (validation minus test Dice): ensemble "
        f"{gain['ensemble_optimism']:+.4f}, best member {gain['best_member_optimism']:+.4f}.\n\n"
        "## Per class\n\n"
        "Intervals: the same paired bootstrap (2000 resamples, seed 0) of the per-class Dice, ensemble "
        f"minus {gain['best_member']}, over the test cases where both count the class "
        "(computed by this script from test_per_case.csv; segx reports only the foreground mean).\n\n"
        + _statements(facts)
        + "\nFiles: test_summary.csv, test_per_class.csv, test_per_case.csv, gain.csv (the ensemble run's "
        "tables), test_cases.png (its figure), "
        + ", ".join(f"`{k}`" for k in facts["copied_bytes"] if k.startswith("overlay_"))
        + " (segx.predict's overlay of the first test case); results.json (everything above).\n"
        + "".join(
            f"\n{k} was {v['original_bytes'] / 1024:.0f} KB ({v['original_pixels'][0]}x{v['original_pixels'][1]} px) as "
            f"logged; kept here as {v['how']} ({v['pixels'][0]}x{v['pixels'][1]} px, {v['bytes'] / 1024:.0f} KB) "
            "to stay under 500 KB.\n"
            for k, v in facts.get("shrunk", {}).items()
        )
    )
    write_results(OUT, report=text)
    print(text)


if __name__ == "__main__":
    main()
