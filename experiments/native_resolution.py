"""DSB2018 at native resolution (issue 10): resize mode against patch mode, same training budget.

    python experiments/native_resolution.py              # the full study (1-2 hours on 2 cores)
    python experiments/native_resolution.py --quick      # every stage on a small subset, 2 epochs
    python experiments/native_resolution.py --report-only  # rewrite RESULTS.md from results.json

Three Unet members (resnet18, mobilenetv2, efficientnetb0) are trained on
``../shared/datasets/dsb2018_nuclei`` (``experiment=dsb2018``: its split, 30 epochs, early stopping
with patience 8, ``augment=strong``) in each of two modes:

- resize: ``data.mode=resize data.image_size=96``, every image resized to 96 x 96;
- patch: ``data.mode=patch data.patch_size=96``, random 96 px patches at each image's own
  resolution, whole images predicted with the Gaussian-weighted sliding window.

``samples_per_epoch`` stays null (one patch per training image per epoch), so both modes take the
same number of gradient steps on batches of the same shape. The modes alternate (resize r18,
patch r18, resize mnv2, ...) so that load from other work on the machine hits both. Each member is
trained by ``python -m segx.train`` in its own process (a fresh process per member, as a user
runs it); a FINISHED member run with the same ``segx.config_hash`` is reused, so a rerun resumes.

Three ensembles are then built with ``segx.ensemble.build_ensemble``: the resize members, the
patch members and all six (every member caches its probabilities at each image's own size, so
members of both modes combine). Test Dice, IoU and HD95 per method come from each ensemble run's
``tables/test_per_case.csv``, split by the ``appearance`` column of ``metadata.csv``.

Writes ``experiments/native_resolution/results.json`` (every number), ``test_per_case.csv`` and
``RESULTS.md`` after each stage, so an interrupted run keeps what it measured. ``--quick`` writes
to ``outputs/native_resolution-quick/`` and its own MLflow experiment instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from segx.benchmark.helpers import read_results, subset_folder, write_results

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "experiments" / "native_resolution"
QUICK_OUT = REPO / "outputs" / "native_resolution-quick"
DATASET = "../shared/datasets/dsb2018_nuclei"  # as conf/experiment/dsb2018.yaml reads it
CEILING_CSV = REPO / "experiments" / "resize_ceiling" / "results.csv"
PREVIOUS_JSON = REPO / "experiments" / "dsb2018" / "accuracy.json"
BACKBONES = ("resnet18", "mobilenetv2", "efficientnetb0")
MODES = ("resize", "patch")
SIZE = 96
TARGET_DICE = 0.90  # issue 10: test Dice at the original size
GROUPS = ("resize", "patch", "all")


# --- bookkeeping ---------------------------------------------------------------------------------
# --- stage 0: what resizing alone costs (copied from experiments/resize_ceiling) ------------------
def ceiling(test_stems: list[str] | None) -> dict:
    """Mean/median Dice of a perfect prediction at 96/128/256 px brought back to each image's own
    size (resize mode), over all cases and over this study's test split."""
    frame = pd.read_csv(CEILING_CSV)
    frame = frame[(frame["mode"] == "resize") & frame["size"].isin([96, 128, 256])]
    rows = []
    for (target, size), g in frame.groupby(["target", "size"], sort=True):
        row = {
            "target": target,
            "size": int(size),
            "cases": len(g),
            "dice_mean": g.dice.mean(),
            "dice_median": g.dice.median(),
            "below_0.9": int((g.dice < 0.9).sum()),
        }
        for appearance, ga in g.groupby("appearance"):
            row[f"dice_mean_{appearance}"] = ga.dice.mean()
        if test_stems:
            gt = g[g.stem.isin(test_stems)]
            row.update(
                {
                    "test_cases": len(gt),
                    "test_dice_mean": gt.dice.mean(),
                    "test_dice_median": gt.dice.median(),
                }
            )
        rows.append(row)
    return {"source": str(CEILING_CSV.relative_to(REPO)), "rows": rows}


def previous_study() -> dict | None:
    """Test Dice of the earlier resize-only study (scored at 96 px against resized masks)."""
    if not PREVIOUS_JSON.exists():
        return None
    acc = json.loads(PREVIOUS_JSON.read_text())
    return {
        "source": str(PREVIOUS_JSON.relative_to(REPO)),
        "ensemble_run_id": acc.get("ensemble_run_id"),
        "rows": [
            {"method": r["method"], "dice_mean": r["dice_mean"], "dice_median": r["dice_median"]}
            for r in acc.get("test_table", [])
        ],
    }


# --- stage 1: members --------------------------------------------------------------------------
def train_overrides(args, data_root: str, backbone: str, mode: str) -> list[str]:
    overrides = [
        "experiment=dsb2018",
        f"backbone={backbone}",
        "arch=unet",
        "augment=strong",
        f"data.mode={mode}",
        f"mlflow.experiment_name={args.experiment_name}",
    ]
    if mode == "resize":
        overrides.append(f"data.image_size={SIZE}")
    else:
        overrides.append(f"data.patch_size={SIZE}")
    if data_root != DATASET:
        overrides.append(f"data.root={data_root}")
    if args.epochs:
        overrides.append(f"trainer.epochs={args.epochs}")
    return overrides


def member(args, client, experiment: str, data_root: str, backbone: str, mode: str) -> dict:
    """Train one member in a fresh process (or reuse a FINISHED run of the same config)."""
    from segx import tracking
    from segx.config import compose
    from segx.workflows.member import config_identity

    overrides = train_overrides(args, data_root, backbone, mode)
    cfg = compose("train", overrides)
    identity = config_identity(cfg)
    entry = {
        "name": f"{mode}-{backbone}",
        "mode": mode,
        "backbone": backbone,
        "config_hash": identity,
        "overrides": overrides,
        "load_average_at_start": os.getloadavg()[0],
    }
    done = tracking.find_runs(client, experiment, "member", "FINISHED", {"segx.config_hash": identity}) or _same_member(
        client, experiment, backbone, mode, overrides
    )
    if done:
        run = done[0]
        entry["reused"] = True
        print(f"native: reusing {entry['name']} member {run.info.run_id}", flush=True)
    else:
        entry["reused"] = False
        print(
            f"native: training {entry['name']}: python -m segx.train {' '.join(overrides)}",
            flush=True,
        )
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        started = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "segx.train", *overrides], cwd=REPO, env=env).returncode
        seconds = time.perf_counter() - started
        if rc != 0:
            return {
                **entry,
                "error": f"python -m segx.train exited {rc} after {seconds:.0f} s (see run.log)",
            }
        done = tracking.find_runs(
            client, experiment, "member", "FINISHED", {"segx.config_hash": identity}
        ) or _same_member(client, experiment, backbone, mode, overrides)
        if not done:
            return {
                **entry,
                "error": f"training ended but no FINISHED run has segx.config_hash={identity}",
            }
        run = done[0]
        tracking.log_metrics(client, run.info.run_id, {"bench/train_seconds": seconds})
    return {**entry, **member_numbers(client, run.info.run_id, int(cfg.trainer.batch_size))}


def _same_member(client, experiment: str, backbone: str, mode: str, overrides: list[str]) -> list:
    """FINISHED runs of this backbone and mode whose logged params agree with every override.

    The study ran while segx gained config keys (data.folds, data.limit_cases, tags, note): the
    config hash of a member trained earlier differs from today's for the same training, so runs
    are also matched by what was set (each override's logged param), newest first.
    """
    from segx import tracking

    wanted = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if "." in key and not key.startswith(("paths.", "mlflow.", "hydra")):
            wanted[key] = value
    out = []
    for run in tracking.find_runs(client, experiment, "member", "FINISHED", {"segx.backbone": backbone}):
        params = run.data.params
        if params.get("data.mode", "resize") == mode and all(params.get(k) == v for k, v in wanted.items()):
            out.append(run)
    return out


def member_numbers(client, run_id: str, batch_size: int) -> dict:
    """Per-member facts from its MLflow run: Dice, epochs, gradient steps and where time went."""
    run = client.get_run(run_id)
    metrics, params = run.data.metrics, run.data.params
    history = sorted(client.get_metric_history(run_id, "curves/val_dice"), key=lambda m: m.step)
    stamps = [m.timestamp / 1000 for m in history]
    n_train = int(params["data.n_train"])
    steps_per_epoch = math.ceil(n_train / batch_size)  # samples_per_epoch null: one per image
    start, end = run.info.start_time / 1000, run.info.end_time / 1000
    return {
        "run_id": run_id,
        "n_train": n_train,
        "n_val": int(params["data.n_val"]),
        "n_test": int(params["data.n_test"]),
        "batch_size": batch_size,
        "epochs_run": len(history),
        "best_epoch": int(metrics.get("curves/best_epoch", 0)),
        "steps_per_epoch": steps_per_epoch,
        "steps": steps_per_epoch * len(history),
        # During training, at the network's input: resize, the 96 px images against resized
        # masks; patch, one fixed 96 px patch per validation case. Not comparable between modes.
        "best_val_dice_model_input": metrics.get("curves/best_val_dice"),
        # After training, whole images at their own size against the original masks (threshold 0.5).
        "val_dice_original": metrics.get("val/dice"),
        "test_dice_original": metrics.get("test/dice"),
        "train_seconds": metrics.get("bench/train_seconds"),
        # Run start to the last epoch's log: reading data, building the model, every epoch.
        "fit_seconds": stamps[-1] - start if stamps else None,
        # Between consecutive epochs' logs (the first epoch, with graph tracing, is left out).
        "epoch_seconds_median": float(statistics.median(np.diff(stamps))) if len(stamps) >= 2 else None,
        # Last epoch to run end: saving the model, predicting validation and test at each image's
        # own size (no TTA and flip TTA), figures, uploads.
        "after_fit_seconds": end - stamps[-1] if stamps else None,
    }


# --- stage 2: ensembles --------------------------------------------------------------------------
def ensemble(
    args, client, experiment: str, group: str, members: list[dict], data_root: str, work: Path
) -> tuple[dict, pd.DataFrame]:
    from segx import tracking
    from segx.config import compose
    from segx.workflows.ensemble import build_ensemble

    ids = [m["run_id"] for m in members]
    name = f"native-{group}-{len(ids)}m"
    found = [
        r
        for r in tracking.find_runs(client, experiment, "ensemble", "FINISHED", {"segx.members": ",".join(ids)})
        if r.info.run_name == name
    ]
    folder = Path(tempfile.mkdtemp(prefix=f"native-{group}-", dir=work))
    if found:
        run_id = found[0].info.run_id
        print(f"native: reusing ensemble '{group}' {run_id}", flush=True)
        record = json.loads(tracking.download(client, run_id, "ensemble.json", folder).read_text())
        record["run_id"] = run_id
    else:
        cfg = compose(
            "ensemble",
            [
                f"mlflow.experiment_name={args.experiment_name}",
                f"mlflow.run_name={name}",
                "ensemble.run_ids=[" + ",".join(ids) + "]",
            ],
        )
        record = build_ensemble(cfg).to_json()  # the record as JSON (with run_id), as read back above
    per_case = pd.read_csv(tracking.download(client, record["run_id"], "tables/test_per_case.csv", folder))
    val = pd.read_csv(tracking.download(client, record["run_id"], "tables/val_summary.csv", folder))
    names = [m["name"] for m in members]
    # Validation rows: the members first, in the order given (their labels repeat in "all").
    val_rows = val.to_dict(orient="records")
    for i, n in enumerate(names):
        val_rows[i]["method"] = f"member:{n}"
    weights = {n: m.get("weight") for n, m in zip(names, record["members"], strict=True)}
    chosen = record["search"]["chosen"]
    if chosen.startswith("member:"):
        chosen = "member:" + next(n for n, w in weights.items() if w)
    meta = pd.read_csv(Path(data_root) / "metadata.csv")[["stem", "appearance"]]
    per_case = per_case.merge(meta, on="stem", how="left")
    per_case.insert(0, "ensemble", group)
    out = {
        "run_id": record["run_id"],
        "members": names,
        "member_run_ids": ids,
        "weights": weights,
        "threshold": record["threshold"],
        "postprocess": record["postprocess"],
        "chosen": chosen,
        "search": record["search"]["method"],
        "val_dice": record["val_dice"],
        "val_table": val_rows,
    }
    return out, per_case


def relabel_members(
    per_case: pd.DataFrame, group: str, members: list[dict], by_group: dict[str, pd.DataFrame]
) -> tuple[pd.DataFrame, dict]:
    """Member rows named by mode. segx names a member's test rows ``member:<backbone>-<arch>``, so
    in the six-member ensemble two members share each name and segx's report keeps one of them
    (segx/evaluation/report.py, score_test_split: a dict keyed by that name). Those rows are
    replaced by the same members' rows from the per-mode ensembles (same cached probabilities,
    same scoring code), after checking that what segx kept equals one of them."""
    is_member = per_case["method"].str.startswith("member:")
    if group != "all":
        per_case = per_case.copy()
        per_case.loc[is_member, "method"] = per_case.loc[is_member, "method"].str.replace(
            "member:", f"member:{group}-", regex=False
        )
        per_case.loc[is_member, "method"] = per_case.loc[is_member, "method"].str.removesuffix("-unet")
        return per_case, {}
    check = {}
    kept = per_case[is_member]
    for label, g in kept.groupby("method", sort=False):
        backbone = label.removeprefix("member:").removesuffix("-unet")
        g = g.sort_values("stem")
        matches = []
        for mode in MODES:
            other = by_group[mode]
            o = other[other["method"] == f"member:{mode}-{backbone}"].sort_values("stem")
            if len(o) == len(g) and np.allclose(o["dice"].to_numpy(), g["dice"].to_numpy()):
                matches.append(mode)
        check[label] = matches
    substitute = pd.concat([by_group[m][by_group[m]["method"].str.startswith("member:")] for m in MODES])
    substitute = substitute.assign(ensemble=group)
    rest = per_case[~is_member]
    return pd.concat([substitute, rest], ignore_index=True), {
        "segx_rows_kept_per_label": int(kept.groupby("method").size().iloc[0]) if len(kept) else 0,
        "segx_member_rows_equal_mode": check,
    }


def test_table(per_case: pd.DataFrame) -> list[dict]:
    """Per method, over all test cases and per appearance: Dice/IoU/HD95 mean and median."""
    rows = []
    for method, g in per_case.groupby("method", sort=False):
        for appearance, ga in [("all", g), *g.groupby("appearance")]:
            row = {
                "method": method,
                "threshold": float(ga["threshold"].iloc[0]),
                "appearance": appearance,
                "cases": len(ga),
            }
            for metric in ("dice", "iou", "hd95"):
                row[f"{metric}_mean"] = ga[metric].mean()
                row[f"{metric}_median"] = ga[metric].median()
            rows.append(row)
    return rows


# --- the run ---------------------------------------------------------------------------------------
def run(args) -> None:
    from segx import tracking
    from segx.benchmark.study import machine

    os.chdir(REPO)  # the experiment's data.root and paths.output_dir are relative to the repo
    out = Path(args.results_dir)
    work = REPO / "outputs" / "bench" / ("native-quick" if args.quick else "native")
    work.mkdir(parents=True, exist_ok=True)
    data_root = DATASET
    if args.quick:
        data_root = str(subset_folder(REPO / DATASET, args.max_cases, work, min_per_group=4))
    settings = {
        "quick": args.quick,
        "backbones": args.backbones,
        "size": SIZE,
        "data_root": data_root,
        "epochs": args.epochs or "experiment=dsb2018 (30)",
        "experiment_name": args.experiment_name,
    }
    results = read_results(out, required=False)
    if results.get("settings") != settings:
        results = {"settings": settings}
    results["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["machine"] = machine()
    results["previous_96px"] = previous_study()
    results.setdefault("members", {})
    results.setdefault("ensembles", {})
    results["ceiling"] = ceiling(None)
    write_results(out, results, report, stamp="updated")

    client = tracking.connect("sqlite:///outputs/mlflow.db")
    experiment = tracking.experiment_id(client, args.experiment_name, "outputs/mlartifacts")
    for backbone in args.backbones.split(","):
        for mode in MODES:
            entry = member(args, client, experiment, data_root, backbone, mode)
            results["members"][entry["name"]] = entry
            write_results(out, results, report, stamp="updated")
            status = entry.get("error") or (
                f"val Dice (original size) {entry['val_dice_original']:.4f}, "
                f"{entry['epochs_run']} epochs, {entry['train_seconds'] or 0:.0f} s"
            )
            print(f"native: member {entry['name']}: {status}", flush=True)

    per_cases: dict[str, pd.DataFrame] = {}
    for group in GROUPS:
        names = [f"{m}-{b}" for m in (MODES if group == "all" else (group,)) for b in args.backbones.split(",")]
        chosen = [results["members"].get(n, {}) for n in names]
        if any("run_id" not in m for m in chosen):
            missing = [n for n, m in zip(names, chosen, strict=True) if "run_id" not in m]
            results["ensembles"][group] = {"error": f"members missing or failed: {', '.join(missing)}"}
            write_results(out, results, report, stamp="updated")
            continue
        entry, per_case = ensemble(args, client, experiment, group, chosen, data_root, work)
        per_case, check = relabel_members(per_case, group, chosen, per_cases)
        per_cases[group] = per_case
        entry["test_table"] = test_table(per_case)
        if check:
            entry["label_check"] = check
        results["ensembles"][group] = entry
        results["ceiling"] = ceiling(sorted(per_case["stem"].unique()))
        pd.concat(per_cases.values(), ignore_index=True).to_csv(out / "test_per_case.csv", index=False)
        write_results(out, results, report, stamp="updated")
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_results(out, results, report, stamp="updated")
    print((out / "RESULTS.md").read_text())


# --- RESULTS.md ------------------------------------------------------------------------------------
def _f(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _row(table: list[dict], method: str, appearance: str = "all") -> dict | None:
    return next((r for r in table if r["method"] == method and r["appearance"] == appearance), None)


def summary(results: dict) -> list[dict]:
    """Best member against the ensemble, per group (best = highest mean test Dice of the group's members)."""
    rows = []
    for group in GROUPS:
        e = results.get("ensembles", {}).get(group)
        if not e or "test_table" not in e:
            continue
        table = e["test_table"]
        member_rows = [
            r
            for r in table
            if r["method"].startswith("member:")
            and r["appearance"] == "all"
            and r["method"].removeprefix("member:") in e["members"]
        ]
        best = max(member_rows, key=lambda r: r["dice_mean"])
        ens = _row(table, "ensemble")
        rows.append(
            {
                "group": group,
                "members": len(e["members"]),
                "best_member": best["method"].removeprefix("member:"),
                "best_member_dice": best["dice_mean"],
                "best_member_hd95": best["hd95_mean"],
                "ensemble_dice": ens["dice_mean"],
                "ensemble_dice_median": ens["dice_median"],
                "ensemble_hd95": ens["hd95_mean"],
                "gain": ens["dice_mean"] - best["dice_mean"],
                "equal_weights_dice": _row(table, "equal-weights")["dice_mean"],
                "majority_vote_dice": _row(table, "majority-vote")["dice_mean"],
                "chosen": e["chosen"],
                "threshold": e["threshold"],
                "val_dice": e["val_dice"],
            }
        )
    return rows


def report(results: dict) -> str:
    s = results.get("settings", {})
    env = results.get("machine", {})
    quick = s.get("quick")
    lines = [
        "# DSB2018 at native resolution: resize mode vs patch mode" + (" (--quick smoke test)" if quick else ""),
        "",
        f"Reproduce: `python experiments/native_resolution.py{' --quick' if quick else ''}` "
        f"(rewrite this file: `--report-only`). Started {results.get('started', '?')}, "
        + (
            f"finished {results['finished']}."
            if results.get("finished")
            else f"not finished (last update {results.get('updated', '?')})."
        ),
        "",
        f"Data `{s.get('data_root')}`, `experiment=dsb2018` (its split 70/15/15 stratified by appearance, "
        f"`augment=strong`, epochs {s.get('epochs')}, early stopping patience 8, batch 8), Unet, random "
        f"init. Resize mode: `data.mode=resize data.image_size={s.get('size')}`. Patch mode: "
        f"`data.mode=patch data.patch_size={s.get('size')}` (one random patch per training image per "
        "epoch, a third of each batch forced onto foreground; whole images predicted with a "
        "Gaussian-weighted sliding window, overlap 0.5). Both modes take the same number of gradient "
        "steps on batches of the same shape. **Every Dice, IoU and HD95 below is at each image's own "
        "size against the original masks** (HD95 in pixels of the original image). MLflow experiment "
        f"`{s.get('experiment_name')}` in `outputs/mlflow.db`.",
        "",
    ]
    if env:
        lines += [
            f"Machine: {env.get('cpu')}, {env.get('cores')} cores (shared with other work); TensorFlow "
            f"{env.get('tensorflow')}, segmentation-models {env.get('segmentation-models')}, Python {env.get('python')}.",
            "",
        ]

    rows = summary(results)
    if rows:
        lines += [
            "## Summary (test split)",
            "",
            "Best member = the group's member with the highest mean test Dice (at threshold 0.5); gain = ensemble minus best member.",
            "",
            "| ensemble | members | best member | its Dice | ensemble Dice (mean) | median | gain | equal weights | "
            "majority vote | chosen on validation | threshold | HD95 best member / ensemble (px) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['group']} | {r['members']} | {r['best_member']} | {_f(r['best_member_dice'])} | "
                f"{_f(r['ensemble_dice'])} | {_f(r['ensemble_dice_median'])} | {r['gain']:+.4f} | "
                f"{_f(r['equal_weights_dice'])} | {_f(r['majority_vote_dice'])} | {r['chosen']} | "
                f"{r['threshold']} | {_f(r['best_member_hd95'], 2)} / {_f(r['ensemble_hd95'], 2)} |"
            )
        patch = next((r for r in rows if r["group"] == "patch"), None)
        if patch:
            reaches, beats = patch["ensemble_dice"] >= TARGET_DICE, patch["gain"] > 0
            verdict = (
                "reaches" if reaches else "does **not** reach"
            ) + f" the target test Dice >= {TARGET_DICE:.2f} at the original size ({_f(patch['ensemble_dice'])})"
            verdict += (
                " and beats" if beats else ", and does **not** beat"
            ) + f" its best member ({patch['best_member']}, {_f(patch['best_member_dice'])}; {patch['gain']:+.4f})."
            lines += ["", f"**Issue 10 target.** The patch-mode ensemble {verdict}"]
            resize = next((r for r in rows if r["group"] == "resize"), None)
            if resize:
                lines.append(
                    f"Against resize mode at the same budget: patch ensemble {_f(patch['ensemble_dice'])} vs "
                    f"resize ensemble {_f(resize['ensemble_dice'])} ({patch['ensemble_dice'] - resize['ensemble_dice']:+.4f}); "
                    f"best patch member {_f(patch['best_member_dice'])} vs best resize member "
                    f"{_f(resize['best_member_dice'])} ({patch['best_member_dice'] - resize['best_member_dice']:+.4f})."
                )
        lines.append("")

    members = results.get("members", {})
    if members:
        lines += [
            "## Members and training time",
            "",
            "Best val Dice (model input) is what early stopping watched: resize mode, the 96 px images against "
            "resized masks; patch mode, one fixed 96 px patch per validation case (so not comparable between "
            "modes). Val/test Dice (original size) are the whole images at their own size, threshold 0.5, no TTA. "
            "Train time is the whole `python -m segx.train` process; fit is run start to the last epoch "
            "(data, model, epochs); after fit is saving the model and predicting validation and test at "
            "each image's own size (plain and flip TTA) with figures and uploads.",
            "",
            "| member | run | epochs (best) | steps | best val Dice (model input) | val Dice (original) | test Dice "
            "(original) | train time (s) | fit (s) | s/epoch (median) | after fit (s) | load at start |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in members.items():
            if "error" in m:
                lines.append(f"| {name} | failed: {m['error']} |||||||||||")
                continue
            lines.append(
                f"| {name} | `{m['run_id'][:8]}`{' (reused)' if m.get('reused') else ''} | {m['epochs_run']} ({m['best_epoch']}) | "
                f"{m['steps']} ({m['steps_per_epoch']}/epoch) | {_f(m['best_val_dice_model_input'])} | "
                f"{_f(m['val_dice_original'])} | {_f(m['test_dice_original'])} | {_f(m['train_seconds'], 0)} | "
                f"{_f(m['fit_seconds'], 0)} | {_f(m['epoch_seconds_median'], 1)} | {_f(m['after_fit_seconds'], 0)} | "
                f"{m['load_average_at_start']:.2f} |"
            )
        lines += [
            "",
            "Per mode (sums over its members):",
            "",
            "| mode | members | epochs | gradient steps | train time (s) | fit (s) | after fit (s) | s/step (median "
            "epoch / its steps, mean over members) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode in MODES:
            ms = [m for m in members.values() if m["mode"] == mode and "error" not in m]
            if not ms:
                continue

            def total(key: str, ms: list[dict] = ms) -> float:
                return sum(m[key] or 0 for m in ms)

            timed = [m["epoch_seconds_median"] / m["steps_per_epoch"] for m in ms if m["epoch_seconds_median"]]
            per_step = statistics.mean(timed) if timed else None
            lines.append(
                f"| {mode} | {len(ms)} | {total('epochs_run')} | {total('steps')} | {_f(total('train_seconds'), 0)} | "
                f"{_f(total('fit_seconds'), 0)} | {_f(total('after_fit_seconds'), 0)} | "
                f"{_f(per_step, 3)} |"
            )
        lines.append("")

    for group in GROUPS:
        e = results.get("ensembles", {}).get(group)
        if not e:
            continue
        n = len(e.get("members", [])) or "?"
        title = {
            "resize": f"Resize-mode ensemble ({n} members)",
            "patch": f"Patch-mode ensemble ({n} members)",
            "all": f"All {n} members (both modes)",
        }[group]
        lines += [f"## {title}", ""]
        if "error" in e:
            lines += [f"Not built: {e['error']}.", ""]
            continue
        weights = ", ".join(f"{k} {v:.3f}" for k, v in e["weights"].items())
        lines += [
            f"Ensemble run `{e['run_id']}`; search {e['search']}, chosen '{e['chosen']}' (weights {weights}), "
            f"threshold {e['threshold']}, post-processing {e['postprocess']}, validation Dice {_f(e['val_dice'])}. "
            "Test rows: members, equal weights and majority vote at threshold 0.5, the ensemble at the validation-chosen threshold.",
            "",
        ]
        apps = sorted({r["appearance"] for r in e["test_table"]} - {"all"})
        lines += [
            "| method | threshold | Dice mean | Dice median | IoU mean | IoU median | HD95 mean | HD95 median | "
            + " | ".join(f"Dice {a}" for a in apps)
            + " |",
            "|---|---|---|---|---|---|---|---|" + "---|" * len(apps),
        ]
        for r in (r for r in e["test_table"] if r["appearance"] == "all"):
            per_app = [_row(e["test_table"], r["method"], a) for a in apps]
            lines.append(
                f"| {r['method']} | {r['threshold']} | {_f(r['dice_mean'])} | {_f(r['dice_median'])} | "
                f"{_f(r['iou_mean'])} | {_f(r['iou_median'])} | {_f(r['hd95_mean'], 2)} | {_f(r['hd95_median'], 2)} | "
                + " | ".join(f"{_f(p['dice_mean'])} (n={p['cases']})" if p else "n/a" for p in per_app)
                + " |"
            )
        lines += [
            "",
            "By appearance (mean / median):",
            "",
            "| method | appearance | cases | Dice | IoU | HD95 (px) |",
            "|---|---|---|---|---|---|",
        ]
        for r in (r for r in e["test_table"] if r["appearance"] != "all"):
            lines.append(
                f"| {r['method']} | {r['appearance']} | {r['cases']} | {_f(r['dice_mean'])} / {_f(r['dice_median'])} | "
                f"{_f(r['iou_mean'])} / {_f(r['iou_median'])} | {_f(r['hd95_mean'], 2)} / {_f(r['hd95_median'], 2)} |"
            )
        lines += [
            "",
            "Validation (where weights, threshold and post-processing were chosen):",
            "",
            "| method | val Dice | threshold |",
            "|---|---|---|",
        ]
        lines += [f"| {r['method']} | {_f(r['val_dice'])} | {r['threshold']} |" for r in e["val_table"]]
        if e.get("label_check"):
            lines += [
                "",
                "segx labels this ensemble's member test rows by backbone only, so two members share each "
                "label and its `test_per_case.csv` keeps one of them (rows that equal the "
                + ", ".join(
                    f"{k}: {'/'.join(v) or 'neither'}"
                    for k, v in e["label_check"]["segx_member_rows_equal_mode"].items()
                )
                + " member); the member rows above are the per-mode ensembles' rows of the same runs.",
            ]
        lines.append("")

    c = results.get("ceiling")
    if c:
        test = any("test_dice_mean" in r for r in c["rows"])
        apps = sorted({k.removeprefix("dice_mean_") for r in c["rows"] for k in r if k.startswith("dice_mean_")})
        lines += [
            "## What resizing alone costs (perfect prediction, resize mode)",
            "",
            f"From `{c['source']}` (`experiments/resize_ceiling.py`): each true mask brought to the square and "
            "back through segx's resize path, scored against the original. `nearest`: the nearest-neighbour mask "
            "resize mode trains on; `area`: the area-averaged mask, the best any prediction at that size can do.",
            "",
            "| target | size | cases | mean Dice | median | below 0.9 | "
            + " | ".join(f"mean {a}" for a in apps)
            + (" | test split: cases | mean | median |" if test else " |"),
            "|---|---|---|---|---|---|" + "---|" * len(apps) + ("---|---|---|" if test else ""),
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['target']} | {r['size']} | {r['cases']} | {_f(r['dice_mean'])} | {_f(r['dice_median'])} | "
                f"{r['below_0.9']} | "
                + " | ".join(_f(r.get(f"dice_mean_{a}")) for a in apps)
                + (
                    f" | {r['test_cases']} | {_f(r['test_dice_mean'])} | {_f(r['test_dice_median'])} |"
                    if test
                    else " |"
                )
            )
        lines.append("")
    p = results.get("previous_96px")
    if p:
        lines += [
            "## The earlier resize-only study, scored at 96 px (not comparable)",
            "",
            f"From `{p['source']}` (ensemble run `{p['ensemble_run_id']}`, another MLflow store): the same "
            "recipe at 96 px, scored at the 96 px square against nearest-neighbour-resized masks.",
            "",
            "| method | test Dice mean (96 px) | median |",
            "|---|---|---|",
        ]
        lines += [f"| {r['method']} | {_f(r['dice_mean'])} | {_f(r['dice_median'])} |" for r in p["rows"]]
        lines.append("")
    notes = results.get("notes")
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small subset and 2 epochs: a smoke test of every stage",
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--epochs", type=int, default=None, help="default: experiment=dsb2018's (30); --quick: 2")
    parser.add_argument("--max-cases", type=int, default=48, help="--quick: cases in the subset")
    parser.add_argument(
        "--results-dir",
        default=None,
        help=f"default: {OUT.relative_to(REPO)} ({QUICK_OUT.relative_to(REPO)} with --quick)",
    )
    parser.add_argument(
        "--experiment-name",
        default=None,
        help="MLflow experiment (default: dsb2018-native[-quick])",
    )
    args = parser.parse_args()
    args.results_dir = args.results_dir or str(QUICK_OUT if args.quick else OUT)
    args.experiment_name = args.experiment_name or ("dsb2018-native-quick" if args.quick else "dsb2018-native")
    if args.quick and args.epochs is None:
        args.epochs = 2
    if args.report_only:
        out = Path(args.results_dir)
        results = read_results(out, required=False)
        if not results:
            sys.exit(f"native: error: {out / 'results.json'} does not exist; run the study first")
        write_results(out, report=report(results))
        print((out / "RESULTS.md").read_text())
        return
    run(args)


if __name__ == "__main__":
    main()
