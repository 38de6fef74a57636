"""The ensemble workflow: the members' cached probabilities in, weights, threshold and
post-processing chosen on validation, the test split reported, one MLflow run whose
``ensemble.json`` rebuilds the exact ensemble. Free of TensorFlow, as everything the search
imports. Usage: :mod:`segx.ensemble` (``python -m segx.ensemble``)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from segx.config import (
    SEARCH_METHODS,
    TTA_MODES,
    check_key_names,
    recorded_container,
    require_choice,
    require_float,
    require_int,
)
from segx.ensembling.choose import SearchOutcome, SearchSettings, run_search
from segx.ensembling.members import check_compatible, unique_labels
from segx.ensembling.record import EnsembleRecord, make_record
from segx.errors import SegxError
from segx.evaluation.report import (
    Gain,
    honest_gain,
    plot_ensemble,
    print_report,
    score_test_split,
    summarise_test,
    val_table,
)
from segx.progress import stage
from segx.tracking import tags as tag_names
from segx.tracking.readers import MemberRun
from segx.workflows.members import load_member, select_runs


def validate_config(cfg: DictConfig) -> None:
    e = cfg.ensemble
    check_key_names(cfg)
    require_choice(cfg, "ensemble.select", ["list", "auto"])
    require_choice(cfg, "ensemble.search", SEARCH_METHODS)
    require_choice(cfg, "ensemble.tta", TTA_MODES)
    require_float(cfg, "ensemble.tolerance", 0.0, 1.0)
    require_float(cfg, "ensemble.grid_step", 0.0, 1.0, high_open=False)
    if e.grid_step <= 0:
        raise SegxError(f"ensemble.grid_step={e.grid_step} must be > 0 and divide 1 (e.g. 0.1, 0.05, 0.25)")
    if e.search == "grid":
        from segx.ensembling.search import grid_parts

        grid_parts(1, float(e.grid_step))  # a step that does not divide 1, before anything is read
    for key in ("postprocess", "train_missing", "allow_incomplete_cv"):
        if not isinstance(e.get(key), bool):
            raise SegxError(f"ensemble.{key}={e.get(key)!r} must be true or false")
    require_int(cfg, "ensemble.preview_cases", 0, 64)
    if e.register_name is not None:  # MLflow's own rule, checked before the search (not after it)
        from segx.tracking import check_model_name

        check_model_name(str(e.register_name), "ensemble.register_name")
    require_int(cfg, "ensemble.greedy_steps", 1)
    require_int(cfg, "ensemble.bootstrap", 100)
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
        from segx.workflows.member import validate_config as validate_train_config

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


def search_settings(cfg: DictConfig) -> SearchSettings:
    e = cfg.ensemble
    return SearchSettings(
        method=str(e.search),
        thresholds=tuple(threshold_list(cfg)),
        grid_step=float(e.grid_step),
        greedy_steps=int(e.greedy_steps),
        greedy_patience=int(e.greedy_patience),
        greedy_min_gain=float(e.greedy_min_gain),
        optimize_evals=int(e.optimize_evals),
        tolerance=float(e.tolerance),
        postprocess=bool(e.postprocess),
        postprocess_min_sizes=tuple(int(v) for v in e.postprocess_min_sizes),
    )


@dataclass(frozen=True)
class Evaluation:
    """The ensemble chosen on validation and reported on test: what its run logs."""

    found: SearchOutcome
    record: EnsembleRecord
    per_case: pd.DataFrame  # one row per method and test case
    preds: dict  # method -> its test label maps (the figures draw them)
    summary: pd.DataFrame  # per method
    per_class: pd.DataFrame | None  # per method and class (several classes, regions)
    validation: pd.DataFrame
    gain: Gain  # the ensemble against its best member
    # In physical units with the surface Dice (volumes: per patient in 3D; 2D: with data.pixel_spacing)
    per_volume: pd.DataFrame | None = None  # one row per method and test case
    volume_summary: pd.DataFrame | None = None  # per method, means over cases
    surface_prefix: str = "test3d/"  # their metrics: every score in 3D, or test/nsd beside the 2D scores


def build_ensemble(cfg: DictConfig) -> EnsembleRecord:
    """The whole ensemble stage; returns the record (with ``run_id``)."""
    validate_config(cfg)
    from segx import tracking

    client = tracking.connect(str(cfg.mlflow.tracking_uri))
    experiment = tracking.experiment_id(client, str(cfg.mlflow.experiment_name), cfg.mlflow.artifact_root)
    members = _load_members(cfg, client, experiment)
    result = evaluate(cfg, members)
    run_name, tags = _run_identity(cfg, members, result.found)
    note = _description(members, result, experiment, str(cfg.ensemble.search), tags.get("segx.reproduce"))
    run_id = tracking.start_run(client, experiment, run_name, tags, note)
    with tracking.run_scope(client, run_id), tempfile.TemporaryDirectory(prefix="segx-") as tmp:
        stage(f"ensemble run {run_id}: logging its record, tables and figures")
        _log_ensemble(client, run_id, cfg, members, result, Path(tmp))
    _name_in_members(client, members, run_id)
    record = result.record.with_run_id(run_id)
    cases = "volume" if members[0].volumes is not None else "case"
    print_report(record, members, result.validation, result.summary, result.found, result.gain, cases)
    if result.volume_summary is not None:
        shown = [c for c in ("cases", "dice", "iou", "hd95", "nsd") if c in result.volume_summary.columns]
        where = "per volume" if members[0].volumes is not None else "per case, in data.pixel_spacing units,"
        tolerance = members[0].nsd_tolerance_mm
        unit = "mm" if members[0].volumes is not None else "(data.pixel_spacing units)"
        print(f"\nTest split {where} with the normalised surface Dice (NSD) at {tolerance:g} {unit}")
        print(result.volume_summary[shown].to_string(float_format=lambda v: f"{v:.4f}"))
    return record


def _load_members(cfg: DictConfig, client, experiment: str) -> list:
    """The members named or selected, trained first where ``train_missing`` says so, their
    cached probabilities read, and checked to be of one split, data and size."""
    e = cfg.ensemble
    fingerprint, named = e.data_fingerprint, None
    if e.select == "list" and not e.run_ids and e.members:
        named = named_data(cfg)  # data on this command line: members are of that data, or none
    if named is not None:
        if fingerprint and str(fingerprint) != named["fingerprint"]:
            raise SegxError(
                f"ensemble.data_fingerprint={fingerprint} is not the fingerprint of the data this command "
                f"names ({named['fingerprint']}); drop one of the two"
            )
        fingerprint = named["fingerprint"]
    if cfg.ensemble.train_missing:
        train_missing_members(cfg, client, experiment, fingerprint if named is not None else None)
    elif named is not None:
        refuse_other_data(client, experiment, [str(b) for b in e.members], named)
    runs = select_runs(
        client,
        experiment,
        str(cfg.mlflow.experiment_name),
        str(e.select),
        [str(r) for r in e.run_ids or []],
        [str(b) for b in e.members or []],
        fingerprint,
    )
    cache = Path(cfg.paths.output_dir) / "cache" / "probs"
    for folder in (cache.parent, cache):
        if folder.exists() and not folder.is_dir():
            raise SegxError(
                f"{folder} (the members' extracted probabilities) is a file, not a folder; remove it "
                "(segx rebuilds it) or set paths.output_dir=..."
            )
    members = [load_member(client, run, cache, str(e.tta), bool(e.get("allow_incomplete_cv", False))) for run in runs]
    check_compatible(members)
    if any(m.test is None for m in members):
        raise SegxError(
            f"member {members[0].run_id} has no test predictions (empty test split?); set data.test_fraction > 0 and retrain"
        )
    print(
        f"segx: ensembling {len(members)} members: " + ", ".join(f"{m.label} ({m.run_id[:8]})" for m in members),
        flush=True,
    )
    return members


def evaluate(cfg: DictConfig, members: list) -> Evaluation:
    """The search on validation, the record of its choice, and the test split scored."""
    e = cfg.ensemble
    labels = _common_labels(members, str(e.tta))
    found = run_search(members, search_settings(cfg))
    from segx.tracking.provenance import git_sha

    record = make_record(members, found, str(e.tta), search_settings(cfg), git_sha(), labels)
    from segx.scoring.stacked import PlanarCases, StackedVolumes

    volumes, spacing = members[0].volumes, members[0].pixel_spacing
    # How a case is measured in physical units: a patient's scan (its slices stacked, HD95 in 3D
    # in mm), a 2D image of a given pixel spacing, or pixels (no surface Dice then).
    geometry = (
        StackedVolumes.of(volumes, members[0].test.stems)
        if volumes is not None
        else None
        if spacing is None
        else PlanarCases.of(spacing)
    )
    per_case, preds = score_test_split(members, record, geometry if volumes is not None else spacing)
    summary, per_class = summarise_test(per_case)
    validation = val_table(members, found)
    gain = honest_gain(per_case, members, found, int(e.get("bootstrap", 2000)))
    per_volume = volume_summary = None
    if geometry is not None:  # the surface Dice beside them, and (volumes) every score per class in 3D
        from segx.evaluation.volumes import score_volumes, summarise_volumes

        stage(f"scoring the test split {geometry.words}")
        test = members[0].test
        tolerance = members[0].nsd_tolerance_mm
        per_volume = score_volumes(preds, test.masks, test.stems, geometry, record.task.label_names, tolerance)
        volume_summary = summarise_volumes(per_volume)
    prefix = "test3d/" if geometry is None else geometry.prefix
    return Evaluation(
        found, record, per_case, preds, summary, per_class, validation, gain, per_volume, volume_summary, prefix
    )


def _run_identity(cfg: DictConfig, members: list, found: SearchOutcome) -> tuple[str, dict]:
    """The run's name (what won, not what was searched: "ensemble-equal-3m" when equal weights
    won) and its tags (members, data, command, and how to reproduce it)."""
    from segx import tracking
    from segx.tracking import provenance

    chosen = found.chosen.name
    chosen = "single-" + chosen.split(":", 1)[1] if chosen.startswith("member:") else chosen
    run_name = cfg.mlflow.run_name or f"ensemble-{chosen}-{len(members)}m"
    tags = {
        tracking.ROLE: "ensemble",
        "segx.members": ",".join(m.run_id for m in members),
        "segx.data_fingerprint": members[0].fingerprint,
        "segx.command": provenance.command_line(),
        **provenance.provenance_tags(),
    }
    own = provenance.job_overrides("ensemble")
    if own is not None:  # the same search over the same member runs, whatever selected them
        tags["segx.overrides"] = json.dumps(own)
        tags["segx.reproduce"] = provenance.ensemble_reproduce(own, [m.run_id for m in members])
    return run_name, tags


def _log_ensemble(client, run_id: str, cfg: DictConfig, members: list, result: Evaluation, tmp: Path) -> None:
    """Params, the record, tables, figures, metrics and the pyfunc model of the ensemble run."""
    from segx import tracking

    found, record = result.found, result.record
    tracking.log_params(client, run_id, tracking.flatten({"ensemble": recorded_container(cfg)["ensemble"]}))
    tracking.log_params(client, run_id, {f"member.{i}.run_id": m.run_id for i, m in enumerate(members)})
    tracking.log_params(client, run_id, _chosen_params(unique_labels(members), found, record))
    (tmp / "ensemble.json").write_text(json.dumps(record.to_json(), indent=2))
    _write_tables(tmp / "tables", result)
    plot_ensemble(tmp / "plots", members, found, result.preds, result.per_case, int(cfg.ensemble.preview_cases))
    # The members' logged models (a cross-validated member: each fold's) as this run's inputs.
    member_runs = [f for m in members for f in (m.folds or [m.run_id])]
    tracking.link_models(client, run_id, [MemberRun.of(client.get_run(r)).logged_model_id for r in member_runs])
    for name in ("ensemble.json", "tables", "plots"):
        if (tmp / name).exists():
            tracking.log_artifact(client, run_id, tmp / name, None if name == "ensemble.json" else name)
    tracking.log_metrics(client, run_id, _metrics(result))
    from segx.tracking.pyfunc_model import log_pyfunc

    stage("logging the pyfunc model (a copy of every member's weights travels with it)")
    log_pyfunc(client, run_id, record, cfg.ensemble.register_name)


def _chosen_params(names: list[str], found: SearchOutcome, record: EnsembleRecord) -> dict[str, str]:
    """What was chosen, as params (searchable, comparable across ensembles in the UI)."""
    return {
        **{
            f"chosen.weight.{i}.{label}": f"{w:.6g}"
            for i, (label, w) in enumerate(zip(names, found.weights, strict=True))
        },
        "chosen.threshold": str(record.threshold),
        "chosen.method": found.chosen.name,
        "chosen.postprocess": found.postprocess.describe(),
        **{f"chosen.postprocess.{name}": p.describe() for name, p in found.class_postprocess.items()},
        **{f"chosen.threshold.{name}": str(t) for name, t in found.region_thresholds.items()},
        **record.task.run_params(),
    }


def _write_tables(tables: Path, result: Evaluation) -> None:
    found = result.found
    tables.mkdir()
    result.per_case.to_csv(tables / "test_per_case.csv", index=False)
    result.summary.to_csv(tables / "test_summary.csv")
    result.validation.to_csv(tables / "val_summary.csv", index=False)
    pd.DataFrame(found.searched.history).to_csv(tables / "search_history.csv", index=False)
    if found.class_postprocess_results:
        pd.DataFrame(found.class_postprocess_results, columns=["class", "postprocess", "val_dice"]).to_csv(
            tables / "val_postprocess.csv", index=False
        )
    if found.postprocess_results:
        pd.DataFrame([{"postprocess": p.describe(), "val_dice": d} for p, d in found.postprocess_results]).to_csv(
            tables / "val_postprocess.csv", index=False
        )
    if result.per_class is not None:
        result.per_class.to_csv(tables / "test_per_class.csv")
    pd.DataFrame([result.gain.to_row()]).to_csv(tables / "gain.csv", index=False)
    if result.per_volume is not None:  # volumes: per patient in 3D; 2D: with the surface Dice
        name = "volume" if result.surface_prefix == "test3d/" else "case_surface"
        result.per_volume.to_csv(tables / f"test_per_{name}.csv", index=False)
        result.volume_summary.to_csv(tables / f"test_{name}_summary.csv")


def _metrics(result: Evaluation) -> dict[str, float]:
    """The members' keys (segx/metric_keys.py): val/dice, test/dice, test/iou, test/hd95 on one
    chart for members and ensembles; every method of the test table under methods/ (the UI
    sorts sections by name: curves/ then methods/, search/, test/, time/, val/)."""
    found, summary, gain = result.found, result.summary, result.gain
    ours = summary.loc["ensemble"]
    metrics = {
        "val/dice": found.val_dice,
        "test/dice": ours["dice_mean"],
        "test/iou": ours["iou_mean"],
        "test/hd95": ours["hd95_mean"],
        "search/seconds": found.search_seconds,
        "search/kept_pixel_fraction": found.kept_fraction,
    }
    for method, row in summary.iterrows():
        key = method.replace(":", "_").replace(" ", "_").replace("(", "").replace(")", "")
        metrics.update({f"methods/{key}/test_{score}": row[f"{score}_mean"] for score in ("dice", "iou", "hd95")})
    metrics.update(
        {
            "test/gain_vs_best_member": gain.diff,
            "test/gain_ci_low": gain.low,
            "test/gain_ci_high": gain.high,
            "selection/optimism": gain.ensemble_optimism,
            "selection/best_member_optimism": gain.best_member_optimism,
        }
    )
    if result.per_class is not None:  # test/dice/<class> beside test/dice (one chart per class)
        for column in result.per_class.columns:
            if "/" in column and np.isfinite(result.per_class.loc["ensemble", column]):
                metrics[f"test/{column}"] = float(result.per_class.loc["ensemble", column])
    if result.volume_summary is not None:  # test3d/: per patient's scan in mm; 2D: test/nsd
        ours = result.volume_summary.loc["ensemble"]
        scores = ("dice", "iou", "hd95", "nsd") if result.surface_prefix == "test3d/" else ("nsd",)
        metrics.update({f"{result.surface_prefix}{k}": float(v) for k, v in ours.items() if k.split("/")[0] in scores})
    return {k: v for k, v in metrics.items() if v is not None and np.isfinite(v)}


def _name_in_members(client, members, run_id: str) -> None:
    """Each member names the FINISHED ensembles that use it (tag ``segx.ensembles``): written once
    this run has ended FINISHED (a signal is held until the tags are written), and dropping
    ensembles that did not finish (KILLED, FAILED, deleted: listed by an older segx)."""
    from segx import signals, tracking

    def finished(ensemble: str) -> bool:
        try:
            run = client.get_run(ensemble)
        except Exception:  # noqa: BLE001 - a run deleted for good
            return False
        return run.info.status == "FINISHED" and run.info.lifecycle_stage != "deleted"

    with signals.signals_deferred():
        for m in members:
            for member_run in [m.run_id, *m.folds]:
                used = [e for e in MemberRun.of(client.get_run(member_run)).ensembles if e != run_id and finished(e)]
                tracking.set_tags(client, member_run, {tag_names.ENSEMBLES: ",".join([*used, run_id])})


def _common_labels(members, tta: str) -> dict | None:
    """The members' classes, which must be the same for all (one line naming the two members
    otherwise); None for one structure."""
    first = members[0].labels
    for m in members[1:]:
        if m.labels != first:
            what = lambda x: "one structure" if x is None else ", ".join(x["names"])  # noqa: E731
            raise SegxError(
                f"members {members[0].run_id} ({what(first)}) and {m.run_id} ({what(m.labels)}) name different "
                "classes (data.labels); ensemble members trained with the same data.labels"
            )
    from segx.inference.tta import check_tagged_tta

    check_tagged_tta(tta, first, key="ensemble.tta")  # the rule segx.predict and segx.export apply too
    return first


def _g(value: float) -> str:
    """Four significant digits, as the run's description shows every score."""
    return f"{value:.4g}"


def _description(members, result: Evaluation, experiment: str, search: str, reproduce: str | None) -> str:
    """The ensemble run's description (Markdown, as MLflow renders it): each member linked to its
    run, with its weight and its validation and test Dice beside the ensemble's; the gain over the
    best member with its interval; how to predict with it and how to reproduce it."""
    from segx.ensembling.task import task_for

    found, record, summary, gain = result.found, result.record, result.summary, result.gain
    val = dict(zip(result.validation["method"], result.validation["val_dice"], strict=True))
    rows = ["| member | run | weight | val Dice | test Dice |", "|---|---|---|---|---|"]
    for m, label, w in zip(members, unique_labels(members), found.weights, strict=True):
        rows.append(
            f"| [{label}](#/experiments/{experiment}/runs/{m.run_id}) | `{m.run_id[:8]}` | {_g(w)} | "
            f"{_g(val[f'member:{label}'])} | {_g(summary.loc[f'member:{label}', 'dice_mean'])} |"
        )
    rows.append(
        f"| **ensemble** ({found.chosen.name}) | | | **{_g(found.val_dice)}** | "
        f"**{_g(summary.loc['ensemble', 'dice_mean'])}** |"
    )
    lines = [
        task_for(record.labels).run_summary(record, len(members), search),
        "",
        *rows,
        "",
        f"Ensemble minus best member ({gain.best_member.removeprefix('member:')}) on test Dice: {gain.diff:+.4g} "
        f"[95% CI {gain.low:+.4g}, {gain.high:+.4g}] over {gain.cases} cases: {gain.verdict}.",
        "",
        "Predict: `python -m segx.predict ensemble_run_id=<this run> input_dir=... output_dir=...`",
    ]
    if reproduce:
        lines += ["", f"Reproduce: `{reproduce}`"]
    return "\n".join(lines)


def _experiment_choice() -> str | None:
    """The ``experiment=`` chosen on this command line (None outside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("experiment")
    except Exception:  # noqa: BLE001 - a library call: no command line
        return None
    return None if choice in (None, "null", "None") else str(choice)


def _data_overrides() -> list[str]:
    """The ``data=...`` and ``data.<key>=...`` overrides of this command line (none outside a Hydra
    job): members trained first by ``ensemble.train_missing`` read the data the ensemble was given."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - a library call: no command line
        return []
    return [o for o in task if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "data"]


def _in_hydra_job() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.initialized()
    except Exception:  # noqa: BLE001
        return False


def _member_train_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The ``segx.train`` config a member trained first would have. Outside a Hydra job (a library
    call) the command line is unknown: the ensemble config's own ``data`` is used as it is."""
    from omegaconf import open_dict

    from segx.config import compose

    train_cfg = compose("train", overrides=overrides)
    if cfg.get("data") is not None and not _in_hydra_job():
        with open_dict(train_cfg):
            train_cfg.data = cfg.data
    return train_cfg


def named_data(cfg: DictConfig) -> dict | None:
    """The data this command names (``data=...``, ``data.*=...``, an ``experiment=``, or data
    overrides in ``ensemble.train_overrides``), as a member trained by this command would read it:
    ``fingerprint`` (a cross-validated layout's with ``data.folds``), ``params`` (its ``data.*``
    settings, as a member run logs them) and ``parts`` (the fingerprint's parts). None when the
    command names no data: then the members' own data is taken (and must agree)."""
    from segx import tracking
    from segx.config import recorded_container
    from segx.workflows.prepare import prepare

    own = [str(o) for o in cfg.ensemble.train_overrides] if cfg.ensemble.train_missing else []
    if cfg.get("data") is None and not any(o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "data" for o in own):
        return None
    train_cfg = _member_train_config(cfg, [*_member_overrides(cfg), f"backbone={cfg.ensemble.members[0]}"])
    folds = train_cfg.data.get("folds")
    stage("reading the data this command names, for its fingerprint")
    prepared = prepare(train_cfg.data, str(train_cfg.paths.output_dir), fold=0 if folds else None, images=False)
    params = tracking.flatten({"data": recorded_container(train_cfg)["data"]})
    fingerprint = prepared.cv_tags.get("segx.cv_fingerprint") or prepared.fingerprint
    return {"fingerprint": fingerprint, "params": params, "parts": prepared.fingerprint_parts}


# How a member sees the data (not part of its fingerprint), and where segx caches it.
_VIEW_KEYS = (
    "image_size mode patch_size scale overlap foreground_fraction pad samples_per_epoch pixel_spacing "
    "cache_dir max_pixels resize_mode name"
).split()


def data_difference(run, named: dict) -> str:
    """What differs between the data ``run`` was trained on and the data this command names, in
    the settings' own words (``data.root /a vs /b``), else which part of the files."""
    params = run.data.params
    keys = [
        k
        for k in dict.fromkeys([*named["params"], *(k for k in params if k.startswith("data."))])
        if k.split(".")[1] not in _VIEW_KEYS and not k.startswith("data.n_")
    ]
    changed = [k for k in keys if params.get(k, "?") != named["params"].get(k, "?")]
    if changed:
        return ", ".join(f"{k} {params.get(k, '?')} vs {named['params'].get(k, '?')}" for k in changed)
    from segx.data.split import FINGERPRINT_TAGS

    parts = [p for p in ("split", "images", "masks") if run.data.tags.get(FINGERPRINT_TAGS[p]) != named["parts"].get(p)]
    what = {"split": "the split", "images": "the image files' contents", "masks": "the mask files' contents"}
    return "same settings, but " + (" and ".join(what[p] for p in parts) or "the data") + " differ"


def refuse_other_data(client, experiment: str, backbones: list[str], named: dict) -> None:
    """Members of other data than this command names are never taken silently: a backbone whose
    finished runs are all of other data is refused in one line saying what differs."""
    from segx import tracking

    runs = tracking.find_runs(client, experiment, "member")
    for backbone in backbones:
        mine = [r for r in runs if MemberRun.of(r).backbone == backbone]
        fits = [
            r
            for r in mine
            if named["fingerprint"] in (MemberRun.of(r).data_fingerprint, MemberRun.of(r).cv_fingerprint)
        ]
        if mine and not fits:
            raise SegxError(
                f"ensemble.members: no finished {backbone} member of the data this command names; the newest, "
                f"run {mine[0].info.run_id}, was trained on other data ({data_difference(mine[0], named)}); "
                "train one on this data (ensemble.train_missing=true), or drop the data overrides to use it"
            )


def _member_overrides(cfg: DictConfig) -> list[str]:
    """The ``segx.train`` overrides (without the backbone) of a member this command trains."""
    overrides = [
        f"paths.output_dir={cfg.paths.output_dir}",
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
        f"mlflow.artifact_root={cfg.mlflow.artifact_root}",
        f"mlflow.experiment_name={cfg.mlflow.experiment_name}",
        *_data_overrides(),
        *map(str, cfg.ensemble.train_overrides),
    ]
    experiment_choice = _experiment_choice()
    if experiment_choice:  # `segx.ensemble experiment=dsb2018` trains its members the same way
        overrides.insert(0, f"experiment={experiment_choice}")
    return overrides


def train_missing_members(cfg: DictConfig, client, experiment: str, fingerprint: str | None = None) -> None:
    """Train each backbone of ``ensemble.members`` that has no finished run yet (first use); with
    the ``fingerprint`` of the data this command names, none yet *of that data*."""
    from segx import tracking

    runs = tracking.find_runs(client, experiment, "member")
    if fingerprint:
        runs = [r for r in runs if fingerprint in (MemberRun.of(r).data_fingerprint, MemberRun.of(r).cv_fingerprint)]
    have = {MemberRun.of(r).backbone for r in runs}
    missing = [b for b in cfg.ensemble.members or [] if b not in have]
    if not missing:
        return
    from segx.models import clear_session
    from segx.workflows.member import train_member

    overrides = _member_overrides(cfg)
    what = "of this data " if fingerprint else ""
    print(f"segx: no finished runs {what}yet for {', '.join(missing)}: training them first", flush=True)
    for n, backbone in enumerate(missing, start=1):
        member_overrides = [*overrides, f"backbone={backbone}"]
        train_cfg = _member_train_config(cfg, member_overrides)
        print(f"segx: member {n}/{len(missing)} ({backbone}-{train_cfg.arch.name})", flush=True)
        try:
            train_member(train_cfg, member_overrides)  # its own command, not the ensemble's
        finally:
            clear_session()
