"""DSB2018 cross-validation benchmark (issue 11): does a cross-validated ensemble earn its keep?

    python experiments/cv_ensemble.py                # the full study (about 45-60 min on 2 busy cores)
    python experiments/cv_ensemble.py --quick        # every stage on a small subset, 1 epoch
    python experiments/cv_ensemble.py --report-only  # rewrite RESULTS.md from results.json

Two diverse configurations (resnet18 Unet, mobilenetv2 FPN) are trained on
``../shared/datasets/dsb2018_nuclei`` with ``experiment=dsb2018`` in resize mode at 64 px for a
fixed number of epochs (a budget that fits beside another long study on this 2-core machine),
each in two ways:

- single split: once on the plain 70/15/15 split (today's method);
- cross-validated: ``data.folds=3 fold=0,1,2``, the same test set plus three folds of the other
  85% (each fold model trains on two folds and validates on the third; the fold runs nest under a
  parent run with role ``cv``).

Two ensembles are then built with ``segx.ensemble.build_ensemble``: the single-split members
(weights, threshold and post-processing searched on the 15% validation split) and the
cross-validated members (searched on the out-of-fold probabilities of every non-test case; on test
each member is the integer-rounded mean of its three fold models). Each ensemble run logs the
paired bootstrap of test Dice against its best single member (best on validation) and the
selection optimism (``tables/gain.csv``). All four rows of the summary are scored on the same test
cases at each image's own size: the plain split and the fold layout are checked to share their
test list (if they did not, the single-split members would be trained on a split written from the
fold file's test list, ``data.split_file``), so the script also bootstraps the cross-validated
ensemble against the best single-split member and the single-split ensemble, with the same
function and seed segx uses.

Every member is trained by ``python -m segx.train`` in its own process (with ``resume=auto``, so
an interrupted member continues from its checkpoint); a FINISHED member run with the same
``segx.config_hash`` is reused, and so is a FINISHED ensemble run of the same member runs, so a
rerun resumes. Writes ``experiments/cv_ensemble/results.json``, ``test_per_case.csv`` and
``RESULTS.md`` after each stage. ``--quick`` writes to ``outputs/cv_ensemble-quick/`` and its own
MLflow experiment instead.
"""

from __future__ import annotations

import argparse
import hashlib
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
OUT = REPO / "experiments" / "cv_ensemble"
QUICK_OUT = REPO / "outputs" / "cv_ensemble-quick"
DATASET = "../shared/datasets/dsb2018_nuclei"  # as conf/experiment/dsb2018.yaml reads it
CONFIGS = (("resnet18", "unet"), ("mobilenetv2", "fpn"))  # two diverse encoders and decoders
FOLDS = 3
SIZE = 64
EPOCHS = 10
PATIENCE = 0  # early stopping off: every member runs the same epochs (the best epoch is kept)
SETTINGS = ("single", "cv")
AT_VAL = "member@val-threshold:"  # a member at the threshold of its validation Dice


# --- bookkeeping ---------------------------------------------------------------------------------
def label(backbone: str, arch: str) -> str:
    return f"{backbone}-{arch}"


PINNED: Path | None = None  # --pin: a copy of segx/ and conf/ at one commit, used by every stage


def pin_segx(commit: str) -> str:
    """Run the study on segx/ and conf/ as committed at ``commit`` (``git archive``, read only,
    into outputs/bench/segx-pinned/<sha>): other work that edits this tree during an hour-long
    study (a new config key changes every config hash, so later folds would get a new parent
    run) cannot change the study halfway. Must run before the first ``segx`` import."""
    global PINNED
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    snap = REPO / "outputs" / "bench" / "segx-pinned" / sha[:12]
    if not (snap / "segx" / "__init__.py").exists():
        tmp = snap.with_name(f"{snap.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", sha, "segx", "conf"], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        os.replace(tmp, snap)
    sys.path.insert(0, str(snap))
    PINNED = snap
    return sha


def train_command(overrides: list[str]) -> list[str]:
    """``python -m segx.train ...``, or the same module of the pinned copy (run as -m runs it)."""
    if PINNED is None:
        return [sys.executable, "-m", "segx.train", *overrides]
    boot = f"import runpy, sys; sys.path.insert(0, {str(PINNED)!r}); runpy.run_module('segx.train', run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", boot, *overrides]


# --- stage 0: one test set for both settings -----------------------------------------------------
def base_overrides(args, data_root: str, backbone: str, arch: str) -> list[str]:
    overrides = [
        "experiment=dsb2018",
        f"backbone={backbone}",
        f"arch={arch}",
        f"data.image_size={SIZE}",
        f"trainer.epochs={args.epochs}",
        f"trainer.early_stopping.patience={PATIENCE}",
        f"mlflow.experiment_name={args.experiment_name}",
    ]
    if data_root != DATASET:
        overrides.append(f"data.root={data_root}")
    return overrides


def single_overrides(args, data_root: str, backbone: str, arch: str, split_file: str | None) -> list[str]:
    extra = [f"data.split_file={split_file}"] if split_file else []
    return [*base_overrides(args, data_root, backbone, arch), *extra]


def fold_overrides(args, data_root: str, backbone: str, arch: str, fold: int) -> list[str]:
    return [*base_overrides(args, data_root, backbone, arch), f"data.folds={FOLDS}", f"fold={fold}"]


def test_sets(args, data_root: str, split_file: str | None = None) -> dict:
    """The plain split's and the fold layout's test lists, as ``segx.train`` reads them (each file
    is written here if it does not exist yet, exactly as the first member would write it)."""
    from segx.config import compose
    from segx.workflows.prepare import prepare

    backbone, arch = CONFIGS[0]
    plain = compose("train", single_overrides(args, data_root, backbone, arch, split_file))
    folded = compose("train", fold_overrides(args, data_root, backbone, arch, 0))
    p = prepare(plain.data, plain.paths.output_dir)
    f = prepare(folded.data, folded.paths.output_dir, fold=0)
    layout = json.loads(Path(f.split_path).read_text())
    return {
        "plain_split_file": str(p.split_path),
        "fold_file": str(f.split_path),
        "plain_test": p.split["test"],
        "fold_test": list(layout["test"]),
        "same": sorted(p.split["test"]) == sorted(layout["test"]),
        "n_train_plain": len(p.split["train"]),
        "n_val_plain": len(p.split["val"]),
        "n_test": len(layout["test"]),
        "fold_sizes": [len(x) for x in layout["folds"]],
    }


def shared_split(args, data_root: str, sets: dict) -> str:
    """A plain split whose test list is the fold layout's (written once, never rewritten): the
    other cases split into train/val with data.val_fraction, stratified as the experiment is."""
    from segx.config import compose
    from segx.data.folder import discover_cases
    from segx.data.split import load_or_create_split
    from segx.workflows.prepare import read_groups

    cfg = compose("train", base_overrides(args, data_root, *CONFIGS[0]))
    stems = [c.stem for c in discover_cases(Path(str(cfg.data.root)))]
    test = sorted(sets["fold_test"])
    rest = [s for s in stems if s not in set(test)]
    groups = read_groups(cfg.data.stratify_csv, cfg.data.stratify_column) if cfg.data.stratify_csv else None
    digest = hashlib.sha256(json.dumps([sets["fold_file"], test]).encode()).hexdigest()[:10]
    path = Path(cfg.paths.output_dir) / "splits" / f"{cfg.data.name}-cv{FOLDS}-shared-test-{digest}.json"
    load_or_create_split(path, rest, float(cfg.data.val_fraction), 0.0, int(cfg.data.split_seed), test, groups)
    return str(path)


# --- stage 1: members ----------------------------------------------------------------------------
def train(args, client, experiment: str, name: str, overrides: list[str]) -> dict:
    """Train one member in a fresh process (or reuse a FINISHED run of the same config)."""
    from segx import tracking
    from segx.config import compose
    from segx.workflows.member import config_identity

    identity = config_identity(compose("train", overrides))
    entry = {"name": name, "config_hash": identity, "overrides": overrides, "load_average_at_start": os.getloadavg()[0]}
    done = tracking.find_runs(client, experiment, "member", "FINISHED", {"segx.config_hash": identity})
    if done:
        run = done[0]
        entry["reused"] = True
        print(f"cv: reusing {name} member {run.info.run_id}", flush=True)
    else:
        entry["reused"] = False
        print(
            f"cv: training {name}: python -m segx.train {' '.join(overrides)} resume=auto",
            flush=True,
        )
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        started = time.perf_counter()
        run_id = None
        with subprocess.Popen(
            train_command([*overrides, "resume=auto"]),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            for line in proc.stdout:  # echoed to run.log; the run ID is read from segx's own line
                sys.stdout.write(line)
                sys.stdout.flush()
                if line.startswith("segx: member run "):
                    run_id = line.split()[3]
        rc = proc.returncode
        seconds = time.perf_counter() - started
        if rc != 0:
            return {
                **entry,
                "error": f"python -m segx.train exited {rc} after {seconds:.0f} s (see run.log)",
            }
        done = tracking.find_runs(client, experiment, "member", "FINISHED", {"segx.config_hash": identity})
        if not done and run_id:
            # The hash the run recorded differs from the one computed before it started: conf/
            # changed in between (other work edits this tree). The run it printed is this member.
            run = client.get_run(run_id)
            if run.info.status == "FINISHED":
                done = [run]
                entry["config_hash_at_start"] = run.data.tags.get("segx.config_hash")
        if not done:
            return {
                **entry,
                "error": f"training ended but no FINISHED run has segx.config_hash={identity}",
            }
        run = done[0]
        tracking.log_metrics(client, run.info.run_id, {"bench/train_seconds": seconds})
    return {**entry, **member_numbers(client, run.info.run_id)}


def member_numbers(client, run_id: str) -> dict:
    """Per-member facts from its MLflow run: Dice at each image's own size, epochs, time."""
    run = client.get_run(run_id)
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    history = sorted(client.get_metric_history(run_id, "curves/val_dice"), key=lambda m: m.step)
    stamps = [m.timestamp / 1000 for m in history]
    return {
        "run_id": run_id,
        "n_train": int(params["data.n_train"]),
        "n_val": int(params["data.n_val"]),
        "n_test": int(params["data.n_test"]),
        "epochs_run": len(history),
        "best_epoch": int(metrics.get("curves/best_epoch", 0)),
        "parent_run_id": tags.get("segx.cv_parent"),
        "fold": int(tags["segx.fold"]) if "segx.fold" in tags else None,
        # After training, whole images at their own size against the original masks, threshold 0.5.
        "val_dice": metrics.get("val/dice"),
        "test_dice": metrics.get("test/dice"),
        "train_seconds": metrics.get("bench/train_seconds"),
        "run_seconds": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
        "epoch_seconds_median": float(statistics.median(np.diff(stamps))) if len(stamps) >= 2 else None,
    }


def cv_parent(client, parent_id: str) -> dict:
    """The cross-validation summary segx logged on the parent run."""
    run = client.get_run(parent_id)
    m, tags = run.data.metrics, run.data.tags
    folds = int(tags.get("segx.folds", FOLDS))
    return {
        "run_id": parent_id,
        "name": run.info.run_name,
        "complete": tags.get("segx.cv_complete") == "true",
        "missing": tags.get("segx.cv_missing", ""),
        "fold_val_dice": [m.get(f"cv/fold{i}/val_dice") for i in range(folds)],
        "mean_val_dice": m.get("cv/mean_val_dice"),
        "oof_dice": m.get("cv/oof_dice"),
    }


# --- stage 2: ensembles ----------------------------------------------------------------------------
def ensemble(args, client, experiment: str, setting: str, ids: list[str], work: Path) -> tuple[dict, pd.DataFrame]:
    """Build (or reuse) the ensemble of ``ids``; its record, bootstrap row and per-case test table."""
    from segx import tracking
    from segx.config import compose
    from segx.workflows.ensemble import build_ensemble

    name = f"cvbench-{setting}-{len(ids)}m"
    found = [
        r
        for r in tracking.find_runs(client, experiment, "ensemble", "FINISHED", {"segx.members": ",".join(ids)})
        if r.info.run_name == name
    ]
    folder = Path(tempfile.mkdtemp(prefix=f"cv-{setting}-", dir=work))
    started = time.perf_counter()
    if found:
        run_id = found[0].info.run_id
        print(f"cv: reusing ensemble '{setting}' {run_id}", flush=True)
        record = json.loads(tracking.download(client, run_id, "ensemble.json", folder).read_text())
        record["run_id"] = run_id
    else:
        cfg = compose(
            "ensemble",
            [
                f"mlflow.experiment_name={args.experiment_name}",
                f"mlflow.run_name={name}",
                f"ensemble.bootstrap={args.bootstrap}",
                "ensemble.run_ids=[" + ",".join(ids) + "]",
            ],
        )
        record = build_ensemble(cfg).to_json()  # the record as JSON (with run_id), as read back above
    seconds = time.perf_counter() - started
    run_id = record["run_id"]
    gain = pd.read_csv(tracking.download(client, run_id, "tables/gain.csv", folder)).iloc[0].to_dict()
    per_case = pd.read_csv(tracking.download(client, run_id, "tables/test_per_case.csv", folder))
    val = pd.read_csv(tracking.download(client, run_id, "tables/val_summary.csv", folder))
    per_case = pd.concat([per_case, members_at_val_threshold(client, ids, val)], ignore_index=True)
    metrics = client.get_run(run_id).data.metrics
    weights = {f"{m['backbone']}-{m['arch']}": m.get("weight") for m in record["members"]}
    out = {
        "run_id": run_id,
        "member_run_ids": ids,
        "reused": bool(found),
        "seconds": None if found else seconds,
        "weights": weights,
        "threshold": record["threshold"],
        "postprocess": record["postprocess"],
        "chosen": record["search"]["chosen"],
        "search": record["search"]["method"],
        "val_dice": record["val_dice"],
        "folds_per_member": [len(m.get("folds") or []) for m in record["members"]],
        "gain": {k: (v.item() if hasattr(v, "item") else v) for k, v in gain.items()},
        "logged": {
            k: metrics.get(k)
            for k in (
                "test/gain_vs_best_member",
                "test/gain_ci_low",
                "test/gain_ci_high",
                "selection/optimism",
                "selection/best_member_optimism",
            )
        },
        "val_table": val.to_dict(orient="records"),
        "test_table": test_table(per_case),
    }
    # gain.csv's bootstrap again, against the same best member at its validation threshold.
    from segx.evaluation.report import paired_bootstrap

    dice = per_case.pivot_table(index="stem", columns="method", values="dice")
    best_at_t = AT_VAL + out["gain"]["best_member"].removeprefix("member:")
    out["gain_at_val_threshold"] = {
        **paired_bootstrap(dice["ensemble"].to_numpy(), dice[best_at_t].to_numpy(), args.bootstrap, 0),
        "best_member": best_at_t,
        "best_member_test_dice": float(dice[best_at_t].mean()),
        "best_member_optimism": out["gain"]["best_member_val_dice"] - float(dice[best_at_t].mean()),
    }
    return out, per_case.assign(setting=setting)


def members_at_val_threshold(client, ids: list[str], val: pd.DataFrame) -> pd.DataFrame:
    """Each member's per-case test metrics at the threshold its validation Dice was taken at (the
    search's baselines pick each member's best threshold; segx's test rows and gain.csv score
    members at 0.5), through segx's own combine/binarize arithmetic."""
    from segx import tracking
    from segx.ensembling.probs import Weights, binarize, combine
    from segx.scoring.metrics import case_metrics
    from segx.workflows.members import load_member

    thresholds = dict(zip(val["method"], val["threshold"], strict=True))
    rows = []
    for run_id in ids:
        m = load_member(client, tracking.get_run(client, run_id), REPO / "outputs" / "cache" / "probs")
        t = float(thresholds[f"member:{m.label}"])
        pred = binarize(combine([m.test.probs], Weights((1,), 1)), t)
        scores = case_metrics(pred, m.test.masks, spacing=m.pixel_spacing)
        for i, stem in enumerate(m.test.stems):
            rows.append(
                {
                    "method": f"{AT_VAL}{m.label}",
                    "threshold": t,
                    "stem": stem,
                    **{k: float(v[i]) for k, v in scores.items()},
                }
            )
    return pd.DataFrame(rows)


def test_table(per_case: pd.DataFrame) -> list[dict]:
    rows = []
    for method, g in per_case.groupby("method", sort=False):
        rows.append(
            {
                "method": method,
                "threshold": float(g["threshold"].iloc[0]),
                "cases": len(g),
                "dice_mean": g["dice"].mean(),
                "dice_median": g["dice"].median(),
                "iou_mean": g["iou"].mean(),
                "hd95_mean": g["hd95"].mean(),
            }
        )
    return rows


# --- stage 3: the four rows and the cross-setting comparisons --------------------------------------
def compare(results: dict, per_case: dict[str, pd.DataFrame], resamples: int) -> dict:
    """(a) best single-split member, (b) single-split ensemble, (c) each cross-validated member,
    (d) the cross-validated ensemble, and paired bootstraps of (d) against (a) and (b) on the
    shared test cases (segx's own ``paired_bootstrap``, the seed its ensemble runs use)."""
    from segx.evaluation.report import paired_bootstrap

    single, cv = results["ensembles"]["single"], results["ensembles"]["cv"]
    dice = {s: per_case[s].pivot_table(index="stem", columns="method", values="dice") for s in SETTINGS}
    if sorted(dice["single"].index) != sorted(dice["cv"].index):
        return {"error": "the two ensembles were scored on different test cases; compare only within each setting"}
    best_single = single["gain"]["best_member"]  # best on validation, as the ensemble run picked it
    best_cv = cv["gain"]["best_member"]
    stems = dice["single"].index
    series = {
        "a": dice["single"][best_single],
        "a_t": dice["single"][AT_VAL + best_single.removeprefix("member:")],
        "b": dice["single"]["ensemble"],
        "c_best": dice["cv"][best_cv],
        "c_best_t": dice["cv"][AT_VAL + best_cv.removeprefix("member:")],
        "d": dice["cv"]["ensemble"],
    }
    series = {k: v.loc[stems] for k, v in series.items()}
    pairs = {
        "d_minus_a": ("d", "a"),
        "d_minus_a_t": ("d", "a_t"),
        "d_minus_b": ("d", "b"),
        "b_minus_a": ("b", "a"),
        "c_best_minus_a": ("c_best", "a"),
        "c_best_t_minus_a_t": ("c_best_t", "a_t"),
    }
    boot = {}
    for key, (x, y) in pairs.items():
        boot[key] = paired_bootstrap(series[x].to_numpy(), series[y].to_numpy(), resamples, 0)
    return {
        "best_single_member": best_single,
        "best_cv_member": best_cv,
        "cases": len(stems),
        "bootstrap": boot,
    }


# --- the run ---------------------------------------------------------------------------------------
def run(args) -> None:
    from segx import tracking
    from segx.benchmark.study import machine

    os.chdir(REPO)  # the experiment's data.root and paths.output_dir are relative to the repo
    out = Path(args.results_dir)
    work = REPO / "outputs" / "bench" / ("cv-quick" if args.quick else "cv")
    work.mkdir(parents=True, exist_ok=True)
    data_root = DATASET
    if args.quick:
        # 3 folds need >= 3 non-test cases per stratum
        data_root = str(subset_folder(REPO / DATASET, args.max_cases, work, min_per_group=6))
    settings = {
        "quick": args.quick,
        "configs": [label(*c) for c in CONFIGS],
        "size": SIZE,
        "folds": FOLDS,
        "epochs": args.epochs,
        "patience": PATIENCE,
        "data_root": data_root,
        "experiment_name": args.experiment_name,
        "bootstrap": args.bootstrap,
        "segx_pinned_at": args.pin,
    }
    results = read_results(out, required=False)
    if results.get("settings") != settings:
        results = {"settings": settings}
    results["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    for stale in ("finished", "comparison", "total_seconds"):  # recomputed by this run
        results.pop(stale, None)
    results["machine"] = machine()
    results.setdefault("members", {})
    results.setdefault("cv_parents", {})
    results.setdefault("ensembles", {})
    t0 = time.perf_counter()

    sets = test_sets(args, data_root)
    split_file = None
    if not sets["same"]:
        split_file = shared_split(args, data_root, sets)
        print(
            f"cv: the plain split's test list differs from the fold layout's; single-split members use {split_file}",
            flush=True,
        )
        sets = {
            **test_sets(args, data_root, split_file),
            "shared_split_file": split_file,
            "default_split_differed": True,
        }
    results["test_sets"] = {k: v for k, v in sets.items() if k not in ("plain_test", "fold_test")}
    write_results(out, results, report, stamp="updated")
    print(
        f"cv: test set: {sets['n_test']} cases, the same in the plain split and the fold layout: {sets['same']}",
        flush=True,
    )

    client = tracking.connect("sqlite:///outputs/mlflow.db")
    experiment = tracking.experiment_id(client, args.experiment_name, "outputs/mlartifacts")
    per_case: dict[str, pd.DataFrame] = {}

    def build(setting: str, ids: list[str]) -> None:
        entry, table = ensemble(args, client, experiment, setting, ids, work)
        results["ensembles"][setting] = entry
        per_case[setting] = table
        pd.concat(per_case.values(), ignore_index=True).to_csv(out / "test_per_case.csv", index=False)
        write_results(out, results, report, stamp="updated")
        g = entry["gain"]
        print(
            f"cv: {setting} ensemble {entry['run_id']}: test Dice {g['ensemble_test_dice']:.4f} vs best member "
            f"{g['best_member']} {g['best_member_test_dice']:.4f}: {g['diff']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}], "
            f"optimism {g['ensemble_optimism']:+.4f}",
            flush=True,
        )

    # Stage 1: single-split members, then today's ensemble of them.
    for backbone, arch in CONFIGS:
        name = f"single:{label(backbone, arch)}"
        entry = train(
            args,
            client,
            experiment,
            name,
            single_overrides(args, data_root, backbone, arch, split_file),
        )
        results["members"][name] = entry
        results["stage_seconds"] = {
            **results.get("stage_seconds", {}),
            name: time.perf_counter() - t0,
        }
        write_results(out, results, report, stamp="updated")
        status = entry.get("error") or f"test Dice {entry['test_dice']:.4f}"
        print(f"cv: member {name}: {status}", flush=True)
    singles = [results["members"][f"single:{label(*c)}"] for c in CONFIGS]
    if all("run_id" in m for m in singles):
        build("single", [m["run_id"] for m in singles])
    else:
        results["ensembles"]["single"] = {
            "error": "members missing or failed: " + ", ".join(m["name"] for m in singles if "run_id" not in m)
        }
        write_results(out, results, report, stamp="updated")

    # Stage 2: the cross-validated members (K fold runs each), then their ensemble.
    parents = []
    for backbone, arch in CONFIGS:
        lab = label(backbone, arch)
        folds = []
        for fold in range(FOLDS):
            name = f"cv:{lab}:fold{fold}"
            entry = train(
                args,
                client,
                experiment,
                name,
                fold_overrides(args, data_root, backbone, arch, fold),
            )
            results["members"][name] = entry
            results["stage_seconds"] = {
                **results.get("stage_seconds", {}),
                name: time.perf_counter() - t0,
            }
            write_results(out, results, report, stamp="updated")
            status = entry.get("error") or f"val Dice {entry['val_dice']:.4f}, test Dice {entry['test_dice']:.4f}"
            print(f"cv: member {name}: {status}", flush=True)
            folds.append(entry)
        ids = {m.get("parent_run_id") for m in folds if "run_id" in m}
        if len(ids) == 1 and all("run_id" in m for m in folds):
            parent = cv_parent(client, ids.pop())
            results["cv_parents"][lab] = parent
            parents.append(parent)
            print(
                f"cv: {lab} cross-validated: fold val Dice {parent['fold_val_dice']}, out-of-fold Dice {parent['oof_dice']}",
                flush=True,
            )
        else:
            results["cv_parents"][lab] = {"error": f"folds failed or under different parents ({sorted(map(str, ids))})"}
        write_results(out, results, report, stamp="updated")
    if len(parents) == len(CONFIGS) and all(p["complete"] for p in parents):
        build("cv", [p["run_id"] for p in parents])
    else:
        results["ensembles"]["cv"] = {"error": "a cross-validated member is incomplete (see cv_parents)"}
        write_results(out, results, report, stamp="updated")

    if set(per_case) == set(SETTINGS):
        results["comparison"] = compare(results, per_case, args.bootstrap)
    results["total_seconds"] = time.perf_counter() - t0
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_results(out, results, report, stamp="updated")
    print((out / "RESULTS.md").read_text())


# --- RESULTS.md ------------------------------------------------------------------------------------
def _f(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _s(v, digits=4) -> str:
    return "n/a" if v is None else f"{v:+.{digits}f}"


def _ci(b: dict | None) -> str:
    if not b:
        return "n/a"
    return f"{b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]"


def _row(table: list[dict], method: str) -> dict | None:
    return next((r for r in table if r["method"] == method), None)


def _val(e: dict, method: str) -> float | None:
    row = next((r for r in e.get("val_table", []) if r["method"] == method), None)
    return row["val_dice"] if row else None


def _val_threshold(e: dict, method: str) -> float | None:
    row = next((r for r in e.get("val_table", []) if r["method"] == method), None)
    return row["threshold"] if row else None


def summary_rows(results: dict) -> list[dict]:
    """The four rows of the issue: (a) best single-split member, (b) single-split ensemble,
    (c) each cross-validated member, (d) cross-validated ensemble."""
    rows = []
    single, cv = results["ensembles"].get("single", {}), results["ensembles"].get("cv", {})

    def member_rows(e: dict, tag: str, which: str) -> list[dict]:
        out = []
        best = e["gain"]["best_member"]
        for r in e["test_table"]:
            if not r["method"].startswith("member:"):
                continue
            name = r["method"].removeprefix("member:")
            if tag == "(a)" and r["method"] != best:
                continue
            at_t = _row(e["test_table"], AT_VAL + name)
            val = _val(e, r["method"])
            what = (
                f"best single-split member: {name} (best on validation)"
                if tag == "(a)"
                else f"cross-validated member {name}, mean of {FOLDS} folds"
                + (f" (best on {which})" if r["method"] == best else "")
            )
            out.append(
                {
                    "row": tag,
                    "what": what,
                    "networks": 1 if tag == "(a)" else FOLDS,
                    "val": val,
                    "val_threshold": _val_threshold(e, r["method"]),
                    "test_05": r["dice_mean"],
                    "test_t": at_t["dice_mean"] if at_t else None,
                    "optimism": val - at_t["dice_mean"] if at_t and val is not None else None,
                }
            )
        return out

    def ensemble_row(e: dict, tag: str, what: str) -> dict:
        g = e["gain"]
        return {
            "row": tag,
            "what": f"{what} (chosen: {e['chosen']}, post-processing {_post(e['postprocess'])})",
            "networks": len(e["member_run_ids"]) * (FOLDS if tag == "(d)" else 1),
            "val": g["ensemble_val_dice"],
            "val_threshold": e["threshold"],
            "test_05": None,
            "test_t": g["ensemble_test_dice"],
            "optimism": g["ensemble_optimism"],
        }

    if "gain" in single:
        rows += member_rows(single, "(a)", "validation")
        rows.append(ensemble_row(single, "(b)", "single-split ensemble"))
    if "gain" in cv:
        rows += member_rows(cv, "(c)", "out-of-fold validation")
        rows.append(ensemble_row(cv, "(d)", "cross-validated ensemble"))
    return rows


def _post(post: dict | None) -> str:
    if not post:
        return "none"
    parts = [
        f"remove < {post['min_size']} px" if post.get("min_size") else "",
        "fill holes" if post.get("fill_holes") else "",
        "keep largest" if post.get("keep_largest") else "",
    ]
    return ", ".join(p for p in parts if p) or "none"


def gain_rows(results: dict) -> list[tuple[str, dict | None, dict | None]]:
    """(comparison, bootstrap with members at 0.5 as segx logs it, with members at their validation threshold)."""
    single, cv = results["ensembles"].get("single", {}), results["ensembles"].get("cv", {})
    comp = results.get("comparison", {}).get("bootstrap", {})
    rows = []
    if "gain" in single:
        rows.append(
            (
                "(b) single-split ensemble minus (a), its best member (`tables/gain.csv`)",
                single["gain"],
                single.get("gain_at_val_threshold"),
            )
        )
    if "gain" in cv:
        rows.append(
            (
                "(d) cross-validated ensemble minus its best member (c) (`tables/gain.csv`)",
                cv["gain"],
                cv.get("gain_at_val_threshold"),
            )
        )
    if comp:
        rows += [
            (
                "(d) cross-validated ensemble minus (a), the best single-split member",
                comp.get("d_minus_a"),
                comp.get("d_minus_a_t"),
            ),
            (
                "(d) cross-validated ensemble minus (b), the single-split ensemble",
                comp.get("d_minus_b"),
                comp.get("d_minus_b"),
            ),
            ("best (c) cross-validated member minus (a)", comp.get("c_best_minus_a"), comp.get("c_best_t_minus_a_t")),
        ]
    return rows


def _sign(b: dict) -> str:
    return "above zero" if b["low"] > 0 else "below zero: a loss" if b["high"] < 0 else "includes zero"


def verdict(results: dict) -> list[str]:
    single, cv = results["ensembles"].get("single", {}), results["ensembles"].get("cv", {})
    if "gain" not in single or "gain" not in cv:
        return []
    gs, gc = single["gain"], cv["gain"]
    gct = cv.get("gain_at_val_threshold")
    comp = results.get("comparison", {}).get("bootstrap", {})
    lines = []
    beats = gc["low"] > 0
    lines.append(
        f"- **Target 1 (the cross-validated ensemble beats the best single member with the lower end of the 95% interval above "
        f"zero): {'met' if beats else 'not met'} as segx logs it** (`tables/gain.csv`: {_ci(gc)} against "
        f"{gc['best_member'].removeprefix('member:')} at threshold 0.5 over {gc['cases']} cases, {_sign(gc)})"
        + (
            f"; against the same member at the threshold its out-of-fold Dice was taken at: {_ci(gct)} ({_sign(gct)})."
            if gct
            else "."
        )
    )
    if comp.get("d_minus_a") and comp.get("d_minus_a_t"):
        lines.append(
            f"  Against the best single-split member (a), on the same test cases: {_ci(comp['d_minus_a'])} ({_sign(comp['d_minus_a'])}); "
            f"with (a) at its validation threshold {_ci(comp['d_minus_a_t'])} ({_sign(comp['d_minus_a_t'])}). Against the "
            f"single-split ensemble (b): {_ci(comp['d_minus_b'])} ({_sign(comp['d_minus_b'])})."
        )
    smaller = abs(gc["ensemble_optimism"]) < abs(gs["ensemble_optimism"])
    lines.append(
        f"- **Target 2 (its selection optimism is smaller than the single-split ensemble's): {'met' if smaller else 'not met'}.** "
        f"Validation minus test Dice of the chosen ensemble: cross-validated {_s(gc['ensemble_optimism'])} "
        f"(chosen on {int(sum(results['test_sets']['fold_sizes']))} out-of-fold cases) vs single-split "
        f"{_s(gs['ensemble_optimism'])} (chosen on {results['test_sets']['n_val_plain']} validation cases), compared by "
        "absolute value. This is one draw of each (one test set of this size), not an interval."
    )
    if gc["ensemble_optimism"] < 0:
        parts = []
        for lab, p in results.get("cv_parents", {}).items():
            tests = [
                results["members"].get(f"cv:{lab}:fold{i}", {}).get("test_dice")
                for i in range(len(p.get("fold_val_dice", [])))
            ]
            mean_row = _row(cv.get("test_table", []), f"member:{lab}")
            if mean_row and tests and None not in tests:
                parts.append(
                    f"{lab} {_f(statistics.mean(tests))} for its single fold models vs {_f(mean_row['dice_mean'])} for their mean"
                )
        lines.append(
            "  The cross-validated optimism is negative: its validation Dice is out-of-fold, from single fold models each "
            "trained on two thirds of the non-test cases, while on test a member is the mean of its fold models, which "
            "scores higher (test Dice at 0.5: " + "; ".join(parts) + "). So this number mixes selection optimism with "
            "a pessimistic bias of the out-of-fold estimate, and its smaller magnitude is not by itself evidence of "
            "less selection optimism."
        )
    gst = single.get("gain_at_val_threshold")
    lines.append(
        f"- Today's single-split ensemble against its best member: {_ci(gs)} ({_sign(gs)})"
        + (f"; with the member at its validation threshold {_ci(gst)} ({_sign(gst)})." if gst else ".")
    )
    return lines


def report(results: dict) -> str:
    s = results.get("settings", {})
    env = results.get("machine", {})
    quick = s.get("quick")
    t = results.get("test_sets", {})
    lines = [
        "# DSB2018: does a cross-validated ensemble earn its keep? (issue 11)"
        + (" (--quick smoke test)" if quick else ""),
        "",
        f"Reproduce: `python experiments/cv_ensemble.py{' --quick' if quick else ''}"
        + (f" --pin {s['segx_pinned_at'][:12]}" if s.get("segx_pinned_at") else "")
        + "` (rewrite this file: `--report-only`). "
        f"Started {results.get('started', '?')}, "
        + (
            f"finished {results['finished']} ({_f(results.get('total_seconds', 0) / 60, 1)} min)."
            if results.get("finished")
            else f"not finished (last update {results.get('updated', '?')})."
        ),
        "",
        f"**Settings, chosen to fit about 45-60 min of training on 2 CPU cores shared with another long study:** data "
        f"`{s.get('data_root')}`, `experiment=dsb2018` (stratified by appearance, `augment=strong`, batch 8), resize mode "
        f"`data.image_size={s.get('size')}`, `trainer.epochs={s.get('epochs')}`, `trainer.early_stopping.patience={s.get('patience')}` "
        "(off: every member runs every epoch; the best epoch on its own validation cases is kept), random init. Two diverse "
        f"configurations: {', '.join(f'`{c}`' for c in s.get('configs', []))}. Single split: the plain 70/15/15 split. "
        f"Cross-validated: `data.folds={s.get('folds')} fold=0..{(s.get('folds') or 1) - 1}` (the same test set, the other "
        "85% in folds; each fold model trains on the other folds). Ensembles: `segx.ensemble` defaults (greedy search, "
        f"thresholds 0.3-0.7, post-processing chosen on validation, {s.get('bootstrap')} paired bootstrap resamples). "
        "**Every Dice is at each image's own size against the original masks.** These are short trainings at a small "
        "size, so absolute Dice is below what `experiments/native_resolution` reaches; the comparison between rows is "
        f"the point. MLflow experiment `{s.get('experiment_name')}` in `outputs/mlflow.db`.",
        "",
    ]
    if s.get("segx_pinned_at"):
        lines += [
            f"segx code and configs: commit `{s['segx_pinned_at'][:12]}` (`--pin`: a read-only `git archive` copy of "
            "`segx/` and `conf/`, run by every stage), because other work edited and committed to this tree during "
            "the study: a config key added between two folds changes the config hash, so the later folds land under a "
            "new cross-validation parent run and neither parent is complete.",
            "",
        ]
    if env:
        lines += [
            f"Machine: {env.get('cpu')}, {env.get('cores')} cores (shared with other work); TensorFlow "
            f"{env.get('tensorflow')}, segmentation-models {env.get('segmentation-models')}, Python {env.get('python')}.",
            "",
        ]
    if t:
        same = t.get("same")
        lines += [
            f"**Test set.** {t.get('n_test')} cases. The plain split (`{t.get('plain_split_file')}`) and the fold layout "
            f"(`{t.get('fold_file')}`) "
            + (
                "list the same test cases (both draw the same stratified permutation from `data.split_seed`), "
                if same and not t.get("default_split_differed")
                else ""
            )
            + (
                "differed, so the single-split members use a split written from the fold file's test list "
                f"(`{t.get('shared_split_file')}`); "
                if t.get("default_split_differed")
                else ""
            )
            + (
                "so all four rows below are scored on the same test cases. "
                if same
                else "**the test lists differ: compare only within each setting.** "
            )
            + f"Single split: {t.get('n_train_plain')} train / {t.get('n_val_plain')} validation; folds: "
            + " / ".join(map(str, t.get("fold_sizes", [])))
            + " cases (each fold model trains on the other two).",
            "",
        ]

    rows = summary_rows(results)
    if rows:
        lines += [
            "## Summary (test split)",
            "",
            "Val Dice: what each choice was made on, at the threshold shown (a member: its best threshold on "
            "validation, as the search's baselines take it; an ensemble: the chosen weights, threshold and "
            "post-processing). For (c) and (d) validation is out-of-fold: every non-test case, predicted by the fold "
            "model that did not see it. Test Dice at 0.5: a member as segx's test table and `tables/gain.csv` score it; "
            "test Dice at the val threshold: the same member at the threshold of its val Dice (for an ensemble, its "
            "test Dice). Optimism: val Dice minus test Dice at the same threshold.",
            "",
            "| row | what | networks | val Dice | val threshold | test Dice at 0.5 | test Dice at the val threshold | optimism |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['row']} | {r['what']} | {r['networks']} | {_f(r['val'])} | {r['val_threshold']} | "
                f"{_f(r['test_05'])} | **{_f(r['test_t'])}** | {_s(r['optimism'])} |"
            )
        gains = gain_rows(results)
        if gains:
            lines += [
                "",
                "Gains in mean test Dice, paired bootstrap over test cases (95% percentile interval, "
                f"{s.get('bootstrap')} resamples, seed 0: `segx.evaluation.report.paired_bootstrap` as the ensemble "
                "runs use it). segx's `tables/gain.csv` scores the best member at threshold 0.5; the last column "
                "repeats the bootstrap with each member at the threshold of its validation Dice.",
                "",
                "| comparison | members at 0.5 (segx) | members at their val threshold |",
                "|---|---|---|",
            ]
            for name, b05, bt in gains:
                lines.append(f"| {name} | {_ci(b05)} | {_ci(bt)} |")
        v = verdict(results)
        if v:
            lines += ["", "### What the numbers show", "", *v]
        lines.append("")
    notes = results.get("notes")  # written by hand into results.json after a run: the reading of it
    if notes:
        lines += ["## Notes", "", *notes, ""]

    for setting, title in (
        ("single", "Single-split ensemble (today's method)"),
        ("cv", "Cross-validated ensemble"),
    ):
        e = results.get("ensembles", {}).get(setting)
        if not e:
            continue
        lines += [f"## {title}", ""]
        if "error" in e:
            lines += [f"Not built: {e['error']}.", ""]
            continue
        g = e["gain"]
        weights = ", ".join(f"{k} {v:.3f}" for k, v in e["weights"].items())
        lines += [
            f"Ensemble run `{e['run_id']}`{' (reused)' if e.get('reused') else ''}; search {e['search']}, chosen "
            f"'{e['chosen']}' (weights {weights}), threshold {e['threshold']}, post-processing {e['postprocess']}, "
            f"validation Dice {_f(e['val_dice'])}. `tables/gain.csv`: ensemble minus {g['best_member']} "
            f"{_ci(g)} over {g['cases']} cases ({g['resamples']} resamples, share of resamples not better "
            f"{_f(g['p_not_better'], 3)}); selection optimism ensemble {_s(g['ensemble_optimism'])}, best member "
            f"{_s(g['best_member_optimism'])}.",
            "",
            "| method | threshold | Dice mean | Dice median | IoU mean | HD95 mean (px) |",
            "|---|---|---|---|---|---|",
        ]
        for r in e["test_table"]:
            lines.append(
                f"| {r['method']} | {r['threshold']} | {_f(r['dice_mean'])} | {_f(r['dice_median'])} | "
                f"{_f(r['iou_mean'])} | {_f(r['hd95_mean'], 2)} |"
            )
        lines += [
            "",
            "Validation" + (" (out-of-fold)" if setting == "cv" else "") + ":",
            "",
            "| method | val Dice | threshold |",
            "|---|---|---|",
        ]
        lines += [f"| {r['method']} | {_f(r['val_dice'])} | {r['threshold']} |" for r in e["val_table"]]
        lines.append("")

    parents = results.get("cv_parents", {})
    if parents:
        k = s.get("folds") or FOLDS
        lines += [
            "## Cross-validation per fold (parent runs)",
            "",
            "Fold val Dice: `cv/fold<i>/val_dice` (each fold model on its own held-out fold, threshold 0.5); out-of-fold: "
            "`cv/oof_dice` (the case-weighted mean over every non-test case). Fold test Dice: each fold model alone on "
            "the test set (its `test/dice`); fold mean on test: the cross-validated member as the ensemble scores it.",
            "",
            "| configuration | parent run | "
            + " | ".join(f"fold {i} val" for i in range(k))
            + " | mean | out-of-fold | "
            + " | ".join(f"fold {i} test" for i in range(k))
            + " | fold mean on test |",
            "|---|---|" + "---|" * (2 * k + 3),
        ]
        cv = results.get("ensembles", {}).get("cv", {})
        for lab, p in parents.items():
            if "error" in p:
                lines.append(f"| {lab} | failed: {p['error']} |" + " |" * (2 * k + 2))
                continue
            tests = [results["members"].get(f"cv:{lab}:fold{i}", {}).get("test_dice") for i in range(k)]
            mean_row = _row(cv.get("test_table", []), f"member:{lab}")
            lines.append(
                f"| {lab} | `{p['run_id'][:8]}` | "
                + " | ".join(_f(v) for v in p["fold_val_dice"])
                + f" | {_f(p['mean_val_dice'])} | {_f(p['oof_dice'])} | "
                + " | ".join(_f(v) for v in tests)
                + f" | {_f(mean_row['dice_mean']) if mean_row else 'n/a'} |"
            )
        lines.append("")

    members = results.get("members", {})
    if members:
        lines += [
            "## Members and training time",
            "",
            "Val/test Dice: whole images at their own size, threshold 0.5, no TTA. Run time: the MLflow run's start to "
            "end (reading data, model, epochs, predicting validation and test with and without flip TTA, uploads); "
            "process time: the whole `python -m segx.train` process, where this script trained the member and "
            "logged it (`bench/train_seconds`). Timings on a machine shared with other work: treat with suspicion.",
            "",
            "| member | run | train / val / test cases | epochs (best) | val Dice | test Dice | run time (s) | "
            "process time (s) | s/epoch (median) | load at start |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in members.items():
            if "error" in m:
                lines.append(f"| {name} | failed: {m['error']} |||||||||")
                continue
            lines.append(
                f"| {name} | `{m['run_id'][:8]}`{' (reused)' if m.get('reused') else ''} | {m['n_train']} / {m['n_val']} / {m['n_test']} | "
                f"{m['epochs_run']} ({m['best_epoch']}) | {_f(m['val_dice'])} | {_f(m['test_dice'])} | "
                f"{_f(m['run_seconds'], 0)} | {_f(m['train_seconds'], 0)} | {_f(m['epoch_seconds_median'], 1)} | "
                f"{m['load_average_at_start']:.2f} |"
            )
        # MLflow's run start to end (every member has it; the process time only when this script
        # trained it and found the run): data, epochs, predicting validation and test, uploads.
        single_t = sum(m.get("run_seconds") or 0 for n, m in members.items() if n.startswith("single:"))
        cv_t = sum(m.get("run_seconds") or 0 for n, m in members.items() if n.startswith("cv:"))
        lines += [
            "",
            f"Training time: single split {_f(single_t / 60, 1)} min, cross-validated {_f(cv_t / 60, 1)} min "
            f"(x{_f(cv_t / single_t if single_t else None, 2)}); the cross-validated ensemble also runs "
            f"{FOLDS}x the networks at prediction.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small subset and 1 epoch: a smoke test of every stage",
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    parser.add_argument("--epochs", type=int, default=None, help=f"default: {EPOCHS}; --quick: 1")
    parser.add_argument("--max-cases", type=int, default=48, help="--quick: cases in the subset")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (segx's default)")
    parser.add_argument(
        "--results-dir",
        default=None,
        help=f"default: {OUT.relative_to(REPO)} ({QUICK_OUT.relative_to(REPO)} with --quick)",
    )
    parser.add_argument("--experiment-name", default=None, help="MLflow experiment (default: dsb2018-cv[-quick])")
    parser.add_argument(
        "--pin",
        default=None,
        metavar="COMMIT",
        help="run segx/ and conf/ as committed at COMMIT (a read-only copy), not the working tree",
    )
    args = parser.parse_args()
    args.pin = pin_segx(args.pin) if args.pin and not args.report_only else args.pin
    args.results_dir = args.results_dir or str(QUICK_OUT if args.quick else OUT)
    args.experiment_name = args.experiment_name or ("dsb2018-cv-quick" if args.quick else "dsb2018-cv")
    if args.epochs is None:
        args.epochs = 1 if args.quick else EPOCHS
    if args.report_only:
        out = Path(args.results_dir)
        results = read_results(out, required=False)
        if not results:
            sys.exit(f"cv: error: {out / 'results.json'} does not exist; run the study first")
        write_results(out, report=report(results))
        print((out / "RESULTS.md").read_text())
        return
    run(args)


if __name__ == "__main__":
    main()
