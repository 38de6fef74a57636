"""Build, evaluate and record an ensemble of trained members.

    python -m segx.ensemble                            # members by backbone (conf/ensemble.yaml)
    python -m segx.ensemble ensemble.search=grid ensemble.run_ids='[id1,id2,id3]'

Reads only the members' cached probabilities (never reruns a network), searches weights and
threshold on validation Dice, chooses post-processing on validation, reports on the test split
no search saw, and logs one MLflow run whose ``ensemble.json`` rebuilds the exact ensemble.
This module and everything it imports for the search are free of TensorFlow.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

import segx
from segx.config import (
    exit_on_error,
    preflight,
    require_choice,
    require_float,
    require_int,
)
from segx.errors import SegxError

log = logging.getLogger("segx.ensemble")
RECORD_VERSION = 1


@dataclass
class Member:
    run_id: str
    backbone: str
    arch: str
    fingerprint: str
    image_size: int
    resize_mode: str
    val: object  # segx.probs.Cached
    test: object | None

    @property
    def label(self) -> str:
        return f"{self.backbone}-{self.arch}"


def validate_config(cfg: DictConfig) -> None:
    e = cfg.ensemble
    require_choice(cfg, "ensemble.select", ["list", "auto"])
    require_choice(cfg, "ensemble.search", ["grid", "greedy", "optimize"])
    require_choice(cfg, "ensemble.tta", ["none", "flip"])
    require_float(cfg, "ensemble.tolerance", 0.0, 1.0)
    require_float(cfg, "ensemble.grid_step", 0.0, 1.0, high_open=False)
    require_int(cfg, "ensemble.greedy_steps", 1)
    if e.threshold is not None:
        require_float(cfg, "ensemble.threshold", 0.0, 1.0, high_open=False)
    else:
        require_float(cfg, "ensemble.thresholds.start", 0.0, 1.0, high_open=False)
        require_float(cfg, "ensemble.thresholds.stop", 0.0, 1.0, high_open=False)
        require_float(cfg, "ensemble.thresholds.step", 0.0, 1.0, high_open=False)
        if e.thresholds.stop < e.thresholds.start or e.thresholds.step <= 0:
            raise SegxError("ensemble.thresholds needs start <= stop and step > 0")
    if e.select == "list" and not e.run_ids and not e.members:
        raise SegxError("no members given: set ensemble.members=[resnet18,...] or ensemble.run_ids=[...]")


def threshold_list(cfg: DictConfig) -> list[float]:
    e = cfg.ensemble
    if e.threshold is not None:
        return [float(e.threshold)]
    t = e.thresholds
    values = np.arange(t.start, t.stop + t.step / 2, t.step)
    return sorted({round(float(v), 4) for v in values})


def _member_from_run(client, run, workdir: Path) -> Member:
    from segx import tracking
    from segx.probs import load_cached

    if run.data.tags.get(tracking.ROLE) != "member":
        raise SegxError(f"run '{run.info.run_id}' is not a segx member (tag {tracking.ROLE}); pick member runs")
    params = run.data.params
    folder = workdir / run.info.run_id
    val = load_cached(tracking.download(client, run.info.run_id, "predictions/val.npz", folder), folder)
    try:
        test_path = tracking.download(client, run.info.run_id, "predictions/test.npz", folder)
        test = load_cached(test_path, folder)
    except SegxError:
        test = None
    return Member(
        run_id=run.info.run_id,
        backbone=run.data.tags.get("segx.backbone", params.get("backbone.name", "?")),
        arch=run.data.tags.get("segx.arch", params.get("arch.name", "?")),
        fingerprint=run.data.tags.get("segx.data_fingerprint", ""),
        image_size=int(params.get("data.image_size", val.probs.shape[-1])),
        resize_mode=params.get("data.resize_mode", "resize"),
        val=val,
        test=test,
    )


def select_runs(cfg: DictConfig, client, experiment: str) -> list:
    """The member runs named by the config, newest first where a backbone is named."""
    from segx import tracking

    e = cfg.ensemble
    if e.select == "list" and e.run_ids:
        return [tracking.get_run(client, str(r)) for r in e.run_ids]
    runs = tracking.find_runs(client, experiment, "member")
    fingerprint = e.data_fingerprint
    if e.select == "auto":
        if not runs:
            raise SegxError(f"no finished member runs in experiment '{cfg.mlflow.experiment_name}'; train some first")
        fingerprint = fingerprint or runs[0].data.tags.get("segx.data_fingerprint")
        chosen, seen = [], set()
        for run in runs:  # newest first: one run per (backbone, arch)
            key = (run.data.tags.get("segx.backbone"), run.data.tags.get("segx.arch"))
            if run.data.tags.get("segx.data_fingerprint") == fingerprint and key not in seen:
                chosen.append(run)
                seen.add(key)
        return chosen
    chosen = []
    for backbone in e.members:
        matches = [r for r in runs if r.data.tags.get("segx.backbone") == str(backbone)]
        if fingerprint:
            matches = [r for r in matches if r.data.tags.get("segx.data_fingerprint") == fingerprint]
        if not matches:
            raise SegxError(
                f"no FINISHED member run with backbone '{backbone}' in experiment "
                f"'{cfg.mlflow.experiment_name}'; train it: python -m segx.train backbone={backbone}"
            )
        chosen.append(matches[0])
    return chosen


def check_compatible(members: list[Member]) -> None:
    """Members must share validation/test cases, sizes and ground truth."""
    if len(members) < 1:
        raise SegxError("the ensemble has no members; train some or fix ensemble.members")
    ids = [m.run_id for m in members]
    if len(set(ids)) != len(ids):
        raise SegxError(f"member run '{next(i for i in ids if ids.count(i) > 1)}' is listed twice; list each run once")
    ref = members[0]
    for m in members[1:]:
        if m.fingerprint != ref.fingerprint:
            raise SegxError(
                f"members {ref.run_id} ({ref.label}) and {m.run_id} ({m.label}) were trained on "
                f"different splits or data (fingerprints {ref.fingerprint} vs {m.fingerprint}); "
                "retrain one on the same data/split"
            )
        if m.val.stems != ref.val.stems:
            raise SegxError(f"members {ref.run_id} and {m.run_id} have different validation cases; retrain on one split")
        if m.val.probs.shape != ref.val.probs.shape:
            raise SegxError(
                f"members {ref.run_id} and {m.run_id} predict at different sizes "
                f"{ref.val.probs.shape[1:]} vs {m.val.probs.shape[1:]}; use one data.image_size"
            )
        if not np.array_equal(m.val.masks, ref.val.masks):
            raise SegxError(f"members {ref.run_id} and {m.run_id} disagree on validation ground truth; retrain on one dataset")
        if (m.test is None) != (ref.test is None) or (m.test is not None and m.test.stems != ref.test.stems):
            raise SegxError(f"members {ref.run_id} and {m.run_id} have different test cases; retrain on one split")


def _test_table(members: list[Member], weights, threshold, post):
    """Per-case test metrics for each method: a long DataFrame."""
    from segx.metrics import case_metrics
    from segx.postprocess import PostProcess, apply
    from segx.probs import binarize, combine
    from segx.search import majority_vote

    test = members[0].test
    truth = test.masks
    probs = [m.test.probs for m in members]
    methods = {f"member:{m.label}": (lambda i=i: probs[i][:] >= 128) for i, m in enumerate(members)}
    equal = [1.0 / len(members)] * len(members)
    methods["equal-weights"] = lambda: binarize(combine(probs, equal), 0.5)
    methods["majority-vote"] = lambda: majority_vote(probs)
    methods["ensemble (no post-processing)"] = lambda: binarize(combine(probs, weights), threshold)
    methods["ensemble"] = lambda: apply(binarize(combine(probs, weights), threshold), post)
    rows, preds = [], {}
    for name, make in methods.items():
        if name == "ensemble (no post-processing)" and post == PostProcess():
            continue
        pred = make()
        preds[name] = pred
        scores = case_metrics(pred, truth)
        for i, stem in enumerate(test.stems):
            rows.append({"method": name, "stem": stem, **{k: float(v[i]) for k, v in scores.items()}})
    return pd.DataFrame(rows), preds


def summarise(per_case: pd.DataFrame) -> pd.DataFrame:
    order = list(dict.fromkeys(per_case["method"]))
    g = per_case.groupby("method", sort=False)
    table = pd.DataFrame({
        "dice_mean": g["dice"].mean(), "dice_median": g["dice"].median(), "dice_std": g["dice"].std(ddof=0),
        "iou_mean": g["iou"].mean(), "hd95_mean": g["hd95"].mean(), "hd95_median": g["hd95"].median(),
        "cases": g["dice"].size(),
    })  # fmt: skip
    return table.loc[order]


def choose_postprocess(members, weights, threshold, min_sizes, tolerance):
    """Post-processing picked on validation only; identity unless a gain exceeds ``tolerance``."""
    from segx.metrics import dice_per_case
    from segx.postprocess import apply, candidates
    from segx.probs import binarize, combine

    probs = [m.val.probs for m in members]
    pred = binarize(combine(probs, weights), threshold)
    truth = members[0].val.masks
    results = [(p, float(dice_per_case(apply(pred, p), truth).mean())) for p in candidates([0, *min_sizes])]
    base = results[0][1]
    best = max(results, key=lambda r: r[1])
    chosen = best if best[1] > base + tolerance else results[0]
    return chosen[0], results


def run_search(cfg: DictConfig, members: list[Member]) -> dict:
    """Search on validation; returns everything the record and the report need."""
    from segx import search

    e = cfg.ensemble
    probs = [m.val.probs for m in members]
    truth = members[0].val.masks
    t0 = time.perf_counter()
    data = search.compact(probs, truth, threshold_list(cfg))
    if e.search == "grid":
        result = search.search_grid(data, float(e.grid_step))
    elif e.search == "greedy":
        result = search.search_greedy(data, int(e.greedy_steps), int(e.greedy_patience), float(e.greedy_min_gain))
    else:
        result = search.search_optimize(data, max_evals=int(e.optimize_evals), tolerance=float(e.tolerance))
    seconds = time.perf_counter() - t0
    base = search.baselines(data)
    for b, m in zip(base, members, strict=False):
        b.name = f"member:{m.label}"
    chosen = search.choose([*base, result.best], float(e.tolerance))
    weights = [float(w) for w in chosen.weights]
    # The reported validation Dice goes through the prediction path, bit for bit.
    val_dice = float(search.exact_dice(probs, truth, weights, chosen.threshold).mean())
    post, post_results = (
        choose_postprocess(members, weights, chosen.threshold, list(e.postprocess_min_sizes), float(e.tolerance))
        if e.postprocess else (None, [])
    )
    from segx.postprocess import PostProcess

    post = post or PostProcess()
    majority = float(search.dice_per_case(search.majority_vote(probs), truth).mean())
    return {
        "chosen": chosen, "searched": result, "baselines": base, "weights": weights,
        "val_dice": val_dice, "postprocess": post, "postprocess_results": post_results,
        "majority_val_dice": majority, "search_seconds": seconds, "kept_fraction": data.kept_fraction,
    }  # fmt: skip


def make_record(cfg: DictConfig, members: list[Member], found: dict) -> dict:
    from segx.provenance import git_sha

    sha, dirty = git_sha()
    chosen = found["chosen"]
    return {
        "format": "segx-ensemble",
        "version": RECORD_VERSION,
        "segx_version": segx.__version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "data_fingerprint": members[0].fingerprint,
        "image_size": members[0].image_size,
        "resize_mode": members[0].resize_mode,
        "members": [
            {"run_id": m.run_id, "backbone": m.backbone, "arch": m.arch, "weight": w,
             "model_artifact": "model"}
            for m, w in zip(members, found["weights"], strict=True)
        ],  # fmt: skip
        "threshold": chosen.threshold,
        "postprocess": found["postprocess"].to_dict(),
        "tta": str(cfg.ensemble.tta),
        "search": {
            "method": str(cfg.ensemble.search),
            "chosen": chosen.name,
            "tolerance": float(cfg.ensemble.tolerance),
            "thresholds": threshold_list(cfg),
        },
        "val_dice": found["val_dice"],
    }


def _val_table(members: list[Member], found: dict) -> pd.DataFrame:
    rows = [{"method": b.name, "val_dice": b.val_dice, "threshold": b.threshold} for b in found["baselines"]]
    rows[-1]["method"] = "equal-weights"
    rows.append({"method": "majority-vote", "val_dice": found["majority_val_dice"], "threshold": 0.5})
    s = found["searched"].best
    rows.append({"method": f"searched ({s.name})", "val_dice": s.val_dice, "threshold": s.threshold})
    rows.append({"method": f"chosen ({found['chosen'].name})", "val_dice": found["val_dice"], "threshold": found["chosen"].threshold})
    return pd.DataFrame(rows)


def _plots(tmp: Path, members: list[Member], found: dict, preds: dict, per_case: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segx.plots import plot_cases

    history = found["searched"].history
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["val_dice"] for h in history], marker=".", lw=1)
    for b in found["baselines"]:
        ax.axhline(b.val_dice, ls=":", lw=0.8)
    ax.set_xlabel("search step / candidate")
    ax.set_ylabel("validation Dice")
    ax.set_title(f"{found['searched'].best.name} search (dotted: members and equal weights)")
    fig.tight_layout()
    (tmp / "plots").mkdir(exist_ok=True)
    fig.savefig(tmp / "plots" / "search.png", dpi=100)
    plt.close(fig)
    test = members[0].test
    k = min(len(test.previews), 4)
    if k:
        names = [n for n in preds if n.startswith("member:")] + ["ensemble"]
        scores = {n: per_case[per_case.method == n]["dice"].to_numpy()[:k] for n in names}
        plot_cases(test.previews[:k], test.masks[:k], {n: preds[n][:k] for n in names}, test.stems[:k],
                   tmp / "plots" / "test_cases.png", scores, n=k)


def build_ensemble(cfg: DictConfig) -> dict:
    """The whole ensemble stage; returns the record (with ``run_id``)."""
    validate_config(cfg)
    from segx import tracking

    client = tracking.connect(str(cfg.mlflow.tracking_uri))
    experiment = tracking.experiment_id(client, str(cfg.mlflow.experiment_name), cfg.mlflow.artifact_root)
    if cfg.ensemble.train_missing:
        train_missing_members(cfg, client, experiment)
    runs = select_runs(cfg, client, experiment)
    cache = Path(cfg.paths.output_dir) / "cache" / "probs"
    members = [_member_from_run(client, run, cache) for run in runs]
    check_compatible(members)
    if any(m.test is None for m in members):
        raise SegxError(f"member {members[0].run_id} has no test predictions (empty test split?); set data.test_fraction > 0 and retrain")
    print(f"segx: ensembling {len(members)} members: " + ", ".join(f"{m.label} ({m.run_id[:8]})" for m in members), flush=True)
    found = run_search(cfg, members)
    record = make_record(cfg, members, found)
    per_case, preds = _test_table(members, found["weights"], record["threshold"], found["postprocess"])
    summary = summarise(per_case)
    val_table = _val_table(members, found)

    run_name = cfg.mlflow.run_name or f"ensemble-{cfg.ensemble.search}-{len(members)}m"
    from segx.provenance import command_line, provenance_tags

    tags = {
        tracking.ROLE: "ensemble",
        "segx.members": ",".join(m.run_id for m in members),
        "segx.data_fingerprint": members[0].fingerprint,
        "segx.command": command_line(),
        **provenance_tags(),
    }
    run_id = tracking.start_run(client, experiment, run_name, tags)
    with tracking.run_scope(client, run_id), tempfile.TemporaryDirectory(prefix="segx-") as tmp:
        tmp = Path(tmp)
        tracking.log_params(client, run_id, tracking.flatten({"ensemble": OmegaConf.to_container(cfg.ensemble, resolve=True)}))
        tracking.log_params(client, run_id, {f"member.{i}.run_id": m.run_id for i, m in enumerate(members)})
        (tmp / "ensemble.json").write_text(json.dumps(record, indent=2))
        (tmp / "tables").mkdir()
        per_case.to_csv(tmp / "tables" / "test_per_case.csv", index=False)
        summary.to_csv(tmp / "tables" / "test_summary.csv")
        val_table.to_csv(tmp / "tables" / "val_summary.csv", index=False)
        pd.DataFrame(found["searched"].history).to_csv(tmp / "tables" / "search_history.csv", index=False)
        if found["postprocess_results"]:
            pd.DataFrame([{"postprocess": p.describe(), "val_dice": d} for p, d in found["postprocess_results"]]).to_csv(
                tmp / "tables" / "val_postprocess.csv", index=False)
        _plots(tmp, members, found, preds, per_case)
        for name in ("ensemble.json", "tables", "plots"):
            tracking.log_artifact(client, run_id, tmp / name, None if name == "ensemble.json" else name)
        metrics = {"val/dice": found["val_dice"], "search/seconds": found["search_seconds"],
                   "search/kept_pixel_fraction": found["kept_fraction"]}  # fmt: skip
        for method, row in summary.iterrows():
            key = method.replace(":", "_").replace(" ", "_").replace("(", "").replace(")", "")
            metrics[f"test/{key}/dice"] = row["dice_mean"]
            metrics[f"test/{key}/iou"] = row["iou_mean"]
            metrics[f"test/{key}/hd95"] = row["hd95_mean"]
        metrics["test/dice"] = summary.loc["ensemble", "dice_mean"]
        tracking.log_metrics(client, run_id, metrics)
        from segx.pyfunc_model import log_pyfunc

        log_pyfunc(client, run_id, record, cfg.ensemble.register_name)
    record["run_id"] = run_id
    _print_report(record, members, val_table, summary, found)
    return record


def _print_report(record, members, val_table, summary, found) -> None:
    pd.set_option("display.width", 140)
    weights = ", ".join(f"{m.label}={w:.3f}" for m, w in zip(members, found["weights"], strict=True))
    print("\nValidation (weights, threshold and post-processing chosen here)")
    print(val_table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nchosen: {found['chosen'].name}  weights: {weights}  threshold: {record['threshold']}  "
          f"post-processing: {found['postprocess'].describe()}  (search {found['search_seconds']:.2f}s)")
    print("\nTest split (never seen by the search): Dice/IoU per case, HD95 in pixels")
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\nsegx: ensemble run {record['run_id']}  (rebuild: python -m segx.predict ensemble_run_id={record['run_id']} input_dir=... output_dir=...)", flush=True)


def train_missing_members(cfg: DictConfig, client, experiment: str) -> None:
    """Train each backbone of ``ensemble.members`` that has no finished run yet (first use)."""
    from segx import tracking
    from segx.config import compose

    runs = tracking.find_runs(client, experiment, "member")
    have = {r.data.tags.get("segx.backbone") for r in runs}
    missing = [b for b in cfg.ensemble.members if b not in have]
    if not missing:
        return
    from segx.models import clear_session
    from segx.train import train_member

    overrides = [
        f"paths.output_dir={cfg.paths.output_dir}",
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
        f"mlflow.artifact_root={cfg.mlflow.artifact_root}",
        f"mlflow.experiment_name={cfg.mlflow.experiment_name}",
        *map(str, cfg.ensemble.train_overrides),
    ]
    print(f"segx: no finished runs yet for {', '.join(missing)}: training them first", flush=True)
    for backbone in missing:
        train_cfg = compose("train", overrides=[*overrides, f"backbone={backbone}"])
        try:
            train_member(train_cfg)
        finally:
            clear_session()


@hydra.main(version_base="1.3", config_path="../conf", config_name="ensemble")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        return float(build_ensemble(cfg)["val_dice"])
    except SegxError as exc:
        exit_on_error(exc)
    return float("nan")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    preflight("ensemble")
    _hydra_main()


if __name__ == "__main__":
    main()
