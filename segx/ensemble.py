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
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

import segx
from segx import cli
from segx.config import (
    require_choice,
    require_float,
    require_int,
)
from segx.errors import SegxError

log = logging.getLogger("segx.ensemble")


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
    # split / images / masks / settings parts of the fingerprint (empty for runs of older segx)
    fingerprint_parts: dict[str, str] = field(default_factory=dict)

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
    require_int(cfg, "ensemble.greedy_patience", 0)
    require_float(cfg, "ensemble.greedy_min_gain", 0.0, 1.0)
    require_int(cfg, "ensemble.optimize_evals", 1)
    if e.postprocess:
        for i, size in enumerate(e.postprocess_min_sizes or []):
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise SegxError(f"ensemble.postprocess_min_sizes[{i}]={size!r} must be a whole number of pixels >= 0")
    if e.select == "list" and not e.run_ids and not e.members:
        raise SegxError("no members given: set ensemble.members=[resnet18,...] or ensemble.run_ids=[...]")
    if e.train_missing:
        # Members trained first are checked now, before the store is opened or anything created.
        from segx.config import check_group_choices, compose
        from segx.train import validate_config as validate_train_config

        for backbone in e.members or []:
            overrides = [*map(str, e.train_overrides), f"backbone={backbone}"]
            check_group_choices(overrides)
            try:
                train_cfg = compose("train", overrides)
            except Exception as exc:  # noqa: BLE001 - Hydra's override errors span several lines
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SegxError(f"ensemble.train_overrides={list(overrides[:-1])}: {first}") from None
            try:
                validate_train_config(train_cfg)
            except SegxError as exc:
                raise SegxError(f"ensemble.train_overrides (backbone={backbone}): {exc}") from None


def threshold_list(cfg: DictConfig) -> list[float]:
    e = cfg.ensemble
    if e.threshold is not None:
        return [float(e.threshold)]
    t = e.thresholds
    values = np.arange(t.start, t.stop + t.step / 2, t.step)
    return sorted({round(float(v), 4) for v in values})


def _member_from_run(client, run, workdir: Path, tta: str = "none") -> Member:
    """The member's cached probabilities under ``tta``: the ones the recorded pipeline predicts."""
    from segx import tracking
    from segx.data.split import FINGERPRINT_TAGS
    from segx.probs import cache_artifact, load_cached

    if run.data.tags.get(tracking.ROLE) != "member":
        raise SegxError(f"run '{run.info.run_id}' is not a segx member (tag {tracking.ROLE}); pick member runs")
    params = run.data.params
    folder = workdir / run.info.run_id
    try:
        val_path = tracking.download(client, run.info.run_id, cache_artifact("val", tta), folder)
    except SegxError:
        if tta == "none":
            raise
        raise SegxError(
            f"member {run.info.run_id} has no {tta}-TTA cache ({cache_artifact('val', tta)}; trained "
            "before segx cached TTA probabilities); retrain it or use ensemble.tta=none"
        ) from None
    val = load_cached(val_path, folder)
    try:
        test_path = tracking.download(client, run.info.run_id, cache_artifact("test", tta), folder)
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
        fingerprint_parts={k: run.data.tags.get(tag, "") for k, tag in FINGERPRINT_TAGS.items()},
    )


def _skip_reason(run, fingerprint: str | None) -> str | None:
    """Why ``run`` cannot be a member now (None: it can); one of a few kinds, for the report."""
    if run.info.lifecycle_stage == "deleted":
        return "deleted"
    if run.info.status != "FINISHED":
        return f"not FINISHED: {run.info.status}"
    if fingerprint and run.data.tags.get("segx.data_fingerprint") != fingerprint:
        return f"data fingerprint is not {fingerprint}"
    return None


def _id_list(ids: list[str], most: int = 5) -> str:
    more = f" and {len(ids) - most} more" if len(ids) > most else ""
    return ", ".join(ids[:most]) + more


def _report_skipped(skipped: dict[str, list[str]]) -> None:
    """One line per kind of run passed over, so that a smaller ensemble is never silent."""
    import sys

    for reason, ids in skipped.items():
        runs = "run" if len(ids) == 1 else "runs"
        print(f"segx: skipped {len(ids)} member {runs} ({reason}): {_id_list(ids)}", file=sys.stderr, flush=True)


def _unknown_backbone(backbone: str, runs: list, experiment_name: str) -> SegxError | None:
    """An error for a backbone that is neither trained here nor a conf/backbone file, else None."""
    from segx.config import group_options
    from segx.errors import suggest

    configs = group_options("backbone")
    trained = sorted({str(r.data.tags.get("segx.backbone")) for r in runs if _skip_reason(r, None) is None})
    if backbone in configs:
        return None
    # A trained backbone is the likelier intent, so it is suggested before one never trained.
    hint = suggest(backbone, trained) or suggest(backbone, configs)
    return SegxError(
        f"ensemble.members: unknown backbone '{backbone}' (no member run in experiment "
        f"'{experiment_name}' and no conf/backbone/{backbone}.yaml);"
        + (hint or f" trained here: {', '.join(trained) or 'none'}; fix the name")
    )


def select_runs(cfg: DictConfig, client, experiment: str) -> list:
    """The member runs named by the config, newest first where a backbone is named.

    Runs passed over (deleted, not FINISHED, another data fingerprint) are reported, one line per
    kind. Runs named in ``ensemble.run_ids`` are used exactly: a deleted or unfinished one is
    an error, not a skip.
    """
    from segx import tracking

    e = cfg.ensemble
    name = cfg.mlflow.experiment_name
    if e.select == "list" and e.run_ids:
        return [tracking.get_run(client, str(r)) for r in e.run_ids]
    runs = tracking.find_runs(client, experiment, "member", status=None, deleted=True)
    usable = [r for r in runs if _skip_reason(r, None) is None]
    fingerprint = e.data_fingerprint
    skipped: dict[str, list[str]] = {}
    if e.select == "auto":
        if not usable:
            raise SegxError(f"no finished member runs in experiment '{name}'; train some first")
        fingerprint = fingerprint or usable[0].data.tags.get("segx.data_fingerprint")
        chosen, seen = [], set()
        for run in runs:  # newest first: one run per (backbone, arch)
            reason = _skip_reason(run, fingerprint)
            if reason:
                skipped.setdefault(reason, []).append(run.info.run_id)
                continue
            key = (run.data.tags.get("segx.backbone"), run.data.tags.get("segx.arch"))
            if key not in seen:
                chosen.append(run)
                seen.add(key)
        if not chosen:
            raise SegxError(
                f"no finished member run in experiment '{name}' has data fingerprint "
                f"{fingerprint}; fix ensemble.data_fingerprint or set it to null"
            )
        _report_skipped(skipped)
        return chosen
    chosen = []
    for backbone in map(str, e.members):
        mine = [r for r in runs if r.data.tags.get("segx.backbone") == backbone]
        if not mine:
            unknown = _unknown_backbone(backbone, runs, name)
            if unknown:
                raise unknown
        passed: dict[str, list[str]] = {}
        pick = None
        for run in mine:  # newest first; report only the newer runs passed over
            reason = _skip_reason(run, fingerprint)
            if reason is None:
                pick = run
                break
            passed.setdefault(reason, []).append(run.info.run_id)
        if pick is None:
            why = "; ".join(f"{len(ids)} {reason}: {_id_list(ids)}" for reason, ids in passed.items())
            raise SegxError(
                f"no FINISHED member run with backbone '{backbone}' in experiment '{name}'"
                + (f" ({why})" if why else "")
                + f"; train it: python -m segx.train backbone={backbone}"
            )
        for reason, ids in passed.items():
            skipped.setdefault(reason, []).extend(ids)
        chosen.append(pick)
    _report_skipped(skipped)
    return chosen


def _settings_difference(a: str, b: str) -> str:
    """'data.mask_threshold 0 vs 127' from two 'key=value ...' settings strings."""
    da = dict(item.split("=", 1) for item in a.split())
    db = dict(item.split("=", 1) for item in b.split())
    keys = [k for k in dict.fromkeys([*da, *db]) if da.get(k) != db.get(k)]
    return ", ".join(f"data.{k} {da.get(k, '?')} vs {db.get(k, '?')}" for k in keys) or f"{a} vs {b}"


def _fingerprint_difference(a: Member, b: Member) -> str:
    """Which part of the data differs between two members, and what to do about it."""
    pa, pb = a.fingerprint_parts, b.fingerprint_parts
    if not pa.get("split") or not pb.get("split"):
        old = a if not pa.get("split") else b
        return (
            f"fingerprints {a.fingerprint} vs {b.fingerprint}; {old.run_id} was trained by an older "
            "segx that did not record which part of the data differs: retrain it"
        )
    if pa["split"] != pb["split"]:
        return (
            f"different splits (split fingerprints {pa['split']} vs {pb['split']}); retrain one "
            "with the other's data.split_file"
        )
    changed = [k for k in ("images", "masks") if pa.get(k) != pb.get(k)]
    if changed:
        return (
            f"same split, different file contents: the {' and '.join(changed)} changed between "
            "the trainings; retrain the older member on the current files"
        )
    if pa.get("settings") != pb.get("settings"):
        return (
            f"same files, read differently ({_settings_difference(pa['settings'], pb['settings'])}); "
            "retrain one with the other's data settings"
        )
    return f"fingerprints {a.fingerprint} vs {b.fingerprint}; retrain one on the same data"


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
                f"different data: {_fingerprint_difference(ref, m)}"
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
    from segx.probs import Weights, binarize, combine
    from segx.search import majority_vote

    test = members[0].test
    truth = test.masks
    probs = [m.test.probs for m in members]
    weights = Weights.of(weights)  # exact counts; floats (an old record's) are read as decimals
    methods = {f"member:{m.label}": (lambda i=i: probs[i][:] >= 128) for i, m in enumerate(members)}
    equal = Weights((1,) * len(members), len(members))
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
    from segx.probs import Weights, binarize, combine

    probs = [m.val.probs for m in members]
    pred = binarize(combine(probs, Weights.of(weights)), threshold)
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
    weights = chosen.weights  # segx.probs.Weights: exact counts, what the record stores
    # The search scored the candidate in prediction's arithmetic; the prediction path itself
    # must give the same number to the last bit.
    val_dice = float(search.exact_dice(probs, truth, weights, chosen.threshold).mean())
    if val_dice != chosen.val_dice:
        raise RuntimeError(f"internal: search scored {chosen.val_dice!r}, prediction gives {val_dice!r}; please report")
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
    from segx.record import RECORD_VERSION, weight_fields

    sha, dirty = git_sha()
    chosen = found["chosen"]
    per_member, weight_total = weight_fields(found["weights"])
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
            {"run_id": m.run_id, "backbone": m.backbone, "arch": m.arch, **w, "model_artifact": "model"}
            for m, w in zip(members, per_member, strict=True)
        ],
        **weight_total,
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
    members = [_member_from_run(client, run, cache, str(cfg.ensemble.tta)) for run in runs]
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
@cli.task
def _hydra_main(cfg: DictConfig) -> float:
    """The ensemble's validation Dice, for sweepers."""
    return float(build_ensemble(cfg)["val_dice"])


def main() -> None:
    cli.run(_hydra_main, "ensemble")


if __name__ == "__main__":
    main()
