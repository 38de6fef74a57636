"""The export workflow: a recorded ensemble fetched from its run, written as one SavedModel or
ONNX model (:mod:`segx.inference.export_plan`), and logged as a child run of the ensemble.
Usage: :mod:`segx.export` (``python -m segx.export``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from segx.config import TTA_MODES
from segx.errors import SegxError
from segx.inference.export_plan import MANIFEST, ExportSettings, check_format, graph_plans
from segx.tracking import tags as tag_names
from segx.tracking.ensembles import ensemble_run, fetch_ensemble
from segx.tracking.readers import EnsembleRun

EXPORT_TAG = tag_names.EXPORT  # + format, on the ensemble run: the export's child run ID


def log_export(client, ensemble_run_id: str, folder: Path, manifest: dict) -> str:
    """The export as a child run of the ensemble run: its files under the artifact ``export/``,
    one MLflow logged model per graph with the tensor signature, and the ensemble run's tag
    ``segx.export.<format>`` = the child's ID. Returns the child run ID."""
    from segx import tracking
    from segx.tracking.provenance import command_line, provenance_tags

    run = client.get_run(ensemble_run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    tracking.experiment_id(client, experiment.name, None)  # its artifact folder must be writable
    fmt = manifest["runtime"]
    graphs = graph_plans(manifest, folder / MANIFEST)
    tags = {
        tracking.ROLE: "export",
        "mlflow.parentRunId": ensemble_run_id,
        "segx.ensemble_run_id": ensemble_run_id,
        "segx.export_format": fmt,
        "segx.command": command_line(),
        **provenance_tags(),
    }
    note = (
        f"segx export ({fmt}) of ensemble {ensemble_run_id}: every member network, weights, threshold and "
        f"tta={manifest['tta']} in one graph taking uint8 (B, S, S, 3). Predict with: python -m segx.predict "
        f"ensemble_run_id={ensemble_run_id} backend={fmt} input_dir=... output_dir=..."
    )
    child = tracking.start_run(client, run.info.experiment_id, f"export-{fmt}", tags, note)
    with tracking.run_scope(client, child):
        tracking.log_params(
            client,
            child,
            {
                "format": fmt,
                "opset": str(manifest["opset"]),
                "tta": manifest["tta"],
                "ensemble_run_id": ensemble_run_id,
                "graphs": json.dumps(
                    [{"name": g.name, "view": g.view.to_dict(), "networks": len(g.networks)} for g in graphs]
                ),
            },
        )
        tracking.log_metrics(
            client,
            child,
            {
                "export/seconds": manifest["export_seconds"],
                "export/size_mb": sum(manifest["sizes_bytes"].values()) / 1e6,
                "export/check_max_abs_diff": manifest["check"]["member_probabilities_max_abs_diff"],
            },
        )
        tracking.log_artifact(client, child, folder, "export")
        for graph in graphs:
            tracking.log_export_model(
                client,
                child,
                run.info.experiment_id,
                f"export-{fmt}-{graph.name}",
                tracking.TensorSignature(graph.inputs or {}, graph.outputs or {}),
                {"format": fmt, "graph": graph.name, **{f"view.{k}": v for k, v in graph.view.to_dict().items()}},
                "export",
            )
    tracking.set_tags(client, ensemble_run_id, {EXPORT_TAG + fmt: child})
    return child


def export_run(
    client, run_id: str, output_dir: Path, workdir: Path, settings: ExportSettings, log: bool = True
) -> tuple[dict, str | None]:
    """Export ensemble ``run_id`` into ``output_dir`` as ``settings`` say (and log it); (manifest,
    child run ID)."""
    from segx.inference.export_graph import export_ensemble
    from segx.inference.export_plan import check_opset, check_output_dir
    from segx.inference.tta import check_record_tta

    check_format(settings.fmt)
    check_output_dir(output_dir, settings.overwrite)  # before anything is imported, downloaded or built
    if settings.fmt == "onnx":
        check_opset(settings.opset)  # imports tf2onnx and so TensorFlow
    record, paths = fetch_ensemble(client, run_id, workdir)
    # The rule segx.ensemble and segx.predict apply: refused where wrong, warned where untuned.
    warning = check_record_tta(record, settings.tta, paths)
    if warning:
        print(f"segx: warning: ensemble {run_id}: {warning}", file=sys.stderr, flush=True)
    source = {"ensemble_run_id": run_id}
    manifest = export_ensemble(record, paths, output_dir, settings, source)
    child = log_export(client, run_id, output_dir, manifest) if log else None
    return manifest, child


def export_predictor(client, run_id: str, fmt: str, workdir: Path, tta: str | None = None):
    """(record, :class:`~segx.inference.export_runtime.ExportedPredictor`) for the ``fmt`` export of
    ensemble ``run_id`` (the newest one, named by the run's ``segx.export.<fmt>`` tag)."""
    from segx import tracking
    from segx.inference.export_runtime import load_exported

    run = ensemble_run(client, run_id)
    child = EnsembleRun.of(run).exports.get(fmt)
    if not child:
        raise SegxError(
            f"ensemble '{run_id}' has no {fmt} export; make one with python -m segx.export "
            f"ensemble_run_id={run_id} format={fmt} (or predict with backend=keras)"
        )
    try:
        tracking.get_run(client, child)
    except SegxError as exc:
        raise SegxError(
            f"the {fmt} export of ensemble '{run_id}' (run {child}) cannot be used: {exc}; export "
            f"again with python -m segx.export ensemble_run_id={run_id} format={fmt}"
        ) from None
    folder = tracking.download(client, child, "export", workdir / "exports" / child)
    predictor = load_exported(folder, tta)
    return predictor.record, predictor


def run_export(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ensemble_run_id") or cfg.ensemble_run_id in (None, ""):
        raise SegxError("ensemble_run_id is not set; pass ensemble_run_id=...")
    fmt = check_format(cfg.format)
    for key in ("overwrite", "log"):
        if not isinstance(cfg[key], bool):
            raise SegxError(f"{key}={cfg[key]!r} must be true or false")
    if cfg.tta is not None and cfg.tta not in TTA_MODES:
        raise SegxError(f"tta={cfg.tta} is not valid; use one of {', '.join(TTA_MODES)} (or null: as recorded)")
    run_id = str(cfg.ensemble_run_id)
    output_dir = Path(str(cfg.output_dir)) if cfg.output_dir else Path(cfg.paths.output_dir) / "exports" / run_id / fmt
    from segx import tracking

    # Export writes to the store (a child run) only when logging; it never creates a store.
    client = tracking.connect(str(cfg.mlflow.tracking_uri), create=False)
    if cfg.log:
        client = tracking.connect(str(cfg.mlflow.tracking_uri), create=True)  # and it takes a write
    workdir = Path(cfg.paths.output_dir) / "cache" / "ensembles" / run_id
    settings = ExportSettings(fmt, cfg.opset, cfg.tta, cfg.overwrite)
    manifest, child = export_run(client, run_id, output_dir, workdir, settings, cfg.log)
    size = sum(manifest["sizes_bytes"].values()) / 1e6
    logged = f"; logged as run {child} (child of {run_id})" if child else ""
    print(
        f"segx: exported ensemble {run_id} as {fmt} ({size:.1f} MB, {len(manifest['graphs'])} graph(s), "
        f"largest difference from TensorFlow on a check batch "
        f"{manifest['check']['member_probabilities_max_abs_diff']:.2g}) to {output_dir}{logged}",
        flush=True,
    )
    return manifest
