"""Which runs are an ensemble's members (selection by backbone or by ID, cross-validated
configurations) and reading each one from MLflow: its cached probabilities, its view, its data
fingerprint. What the search does with them: :mod:`segx.ensembling.members`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from segx.ensembling.members import Member, assemble_out_of_fold, view_of
from segx.errors import SegxError
from segx.tracking import tags as tag_names
from segx.tracking.readers import MemberRun


def load_member(client, run, workdir: Path, tta: str = "none", allow_incomplete_cv: bool = False) -> Member:
    """A single-split member run or a cross-validated configuration (its parent run)."""
    from segx.tracking import cv

    if MemberRun.of(run).role == cv.ROLE_CV:
        return cv_member_from_run(client, run, workdir, tta, allow_incomplete_cv)
    return member_from_run(client, run, workdir, tta)


def cv_member_from_run(client, parent, workdir: Path, tta: str = "none", allow_incomplete: bool = False) -> Member:
    """A cross-validated configuration as one member: out-of-fold validation probabilities
    assembled from its fold runs' cached validation maps, test probabilities the fold mean."""
    from segx.ensembling.probs import fold_mean
    from segx.tracking import cv

    folds = MemberRun.of(parent).folds
    runs = cv.fold_runs(client, parent.info.experiment_id, parent.info.run_id, folds)
    missing = [f for f in range(folds) if f not in runs]
    if missing and (not allow_incomplete or not runs):
        command = (
            next((MemberRun.of(r).command for r in runs.values()), "")
            or MemberRun.of(parent).command
            or "python -m segx.train ..."
        )
        raise cv.missing_folds_error(parent, missing, command)
    if missing:
        import sys

        print(
            f"segx: warning: cross-validated member {parent.info.run_id} uses folds "
            f"{sorted(runs)} only (missing {missing}; ensemble.allow_incomplete_cv=true)",
            file=sys.stderr,
            flush=True,
        )
    singles = [member_from_run(client, runs[f], workdir, tta) for f in sorted(runs)]
    ref = singles[0]
    for f, m in zip(sorted(runs), singles, strict=True):
        if (m.backbone, m.arch, m.view) != (ref.backbone, ref.arch, ref.view):
            raise SegxError(
                f"cross-validated member {parent.info.run_id}: fold run {m.run_id} (fold {f}: {m.label}, {m.view}) "
                f"differs from fold run {ref.run_id} ({ref.label}, {ref.view}); retrain that fold with the others' config"
            )
        if m.test is None or m.test.stems != ref.test.stems:
            raise SegxError(
                f"cross-validated member {parent.info.run_id}: fold run {m.run_id} has other test cases; retrain it on the same fold file"
            )
    val = assemble_out_of_fold([m.val for m in singles], workdir / parent.info.run_id / f"oof_{tta}.npy")
    test = type(ref.test)(
        ref.test.stems,
        fold_mean([m.test.probs for m in singles]),
        ref.test.masks,
        ref.test.previews,
        ref.test.classes,
        ref.test.regions,
    )
    cv_fp = MemberRun.of(runs[sorted(runs)[0]]).cv_fingerprint
    return Member(
        run_id=parent.info.run_id,
        backbone=ref.backbone,
        arch=ref.arch,
        fingerprint=cv_fp,
        view=ref.view,
        val=val,
        test=test,
        pixel_spacing=ref.pixel_spacing,
        fingerprint_parts={**ref.fingerprint_parts, "split": cv_fp, "data": cv_fp},
        folds=[runs[f].info.run_id for f in sorted(runs)],
        labels=ref.labels,
        volumes=ref.volumes,  # every fold sliced the volumes by one plan (the data fingerprint says so)
        nsd_tolerance_mm=ref.nsd_tolerance_mm,
    )


def member_from_run(client, run, workdir: Path, tta: str = "none") -> Member:
    """The member's cached probabilities under ``tta``: the ones the recorded pipeline predicts.

    Each ``predictions/<role>.npz`` is downloaded again and its probabilities are extracted under
    ``workdir/<run>/`` keyed by the downloaded file's size and SHA-256
    (:func:`segx.ensembling.probs.load_cached`): a changed or re-logged artifact is read afresh,
    never answered from an earlier extraction. Cost: one SHA-256 pass over each ``.npz`` (val
    and test) per ensemble build. A corrupt cache is one error naming the run and the artifact.
    """
    from segx import tracking
    from segx.data.split import FINGERPRINT_TAGS
    from segx.ensembling.probs import cache_artifact, load_cached

    if MemberRun.of(run).role != "member":
        raise SegxError(f"run '{run.info.run_id}' is not a segx member (tag {tracking.ROLE}); pick member runs")
    params = run.data.params
    folder = workdir / run.info.run_id
    if tta != "none":  # a TTA the member cannot undo is refused for what it is, before any download
        from segx.inference.tta import check_tagged_tta

        labels_tag = run.data.tags.get(tag_names.LABELS)
        check_tagged_tta(tta, json.loads(labels_tag) if labels_tag else None, key="ensemble.tta")
    try:
        val_path = tracking.download(client, run.info.run_id, cache_artifact("val", tta), folder)
    except SegxError:
        if tta == "none":
            raise
        raise SegxError(
            f"member {run.info.run_id} has no {tta}-TTA cache ({cache_artifact('val', tta)}): it was trained by a "
            "segx that cached no TTA probabilities; retrain it to search with TTA, or use ensemble.tta=none"
        ) from None
    run_id = run.info.run_id
    val = load_cached(val_path, folder, run_id=run_id, artifact=cache_artifact("val", tta))
    # No test artifact: an empty test split (reported by the caller). One that is there but
    # unreadable is an error naming the file, not a member without test cases.
    try:
        test_path = tracking.download(client, run_id, cache_artifact("test", tta), folder)
    except SegxError:
        test_path = None
    test = (
        None
        if test_path is None
        else load_cached(test_path, folder, run_id=run_id, artifact=cache_artifact("test", tta))
    )
    return Member(
        run_id=run.info.run_id,
        backbone=MemberRun.of(run).backbone or params.get("backbone.name", "?"),
        arch=MemberRun.of(run).arch or params.get("arch.name", "?"),
        fingerprint=MemberRun.of(run).data_fingerprint,
        view=view_of(params),
        pixel_spacing=_spacing_of(params.get("data.pixel_spacing", "None")),
        val=val,
        test=test,
        fingerprint_parts={k: run.data.tags.get(tag, "") for k, tag in FINGERPRINT_TAGS.items()},
        labels=json.loads(run.data.tags[tag_names.LABELS]) if tag_names.LABELS in run.data.tags else None,
        volumes=_volumes_of(client, run, folder),
        nsd_tolerance_mm=float(params.get("data.nsd_tolerance_mm", "1.0")),
    )


def _volumes_of(client, run, folder: Path) -> dict | None:
    """A member trained on volumes: its slice plan and case grids (model/volumes.json)."""
    from segx import tracking

    if tag_names.VOLUMES not in run.data.tags:
        return None
    path = tracking.download(client, run.info.run_id, "model/volumes.json", folder / "volumes")
    return json.loads(Path(path).read_text())


def _spacing_of(text: str):
    import json

    if text in ("None", "null", ""):
        return None
    value = json.loads(text)
    return tuple(float(v) for v in value) if isinstance(value, list) else float(value)


def _configuration(client, run, named: bool = False):
    """The run an ensemble member stands for: a fold run stands for its cross-validated
    configuration (the parent run); a run named by ID must be that parent, not one fold."""

    parent = MemberRun.of(run).cv_parent
    if not parent:
        return run
    if named:
        raise SegxError(
            f"run '{run.info.run_id}' is fold {MemberRun.of(run).fold} of the cross-validated configuration "
            f"{parent}; give the parent run ID {parent} (the ensemble uses all its folds)"
        )
    return client.get_run(parent)


def _skip_reason(run, fingerprint: str | None) -> str | None:
    """Why ``run`` cannot be a member now (None: it can); one of a few kinds, for the report."""
    if run.info.lifecycle_stage == "deleted":
        return "deleted"
    if run.info.status != "FINISHED":
        return f"not FINISHED: {run.info.status}"
    if fingerprint and fingerprint not in (MemberRun.of(run).data_fingerprint, MemberRun.of(run).cv_fingerprint):
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
    trained = sorted({MemberRun.of(r).backbone for r in runs if _skip_reason(r, None) is None})
    if backbone in configs:
        return None
    # A trained backbone is the likelier intent, so it is suggested before one never trained.
    hint = suggest(backbone, trained) or suggest(backbone, configs)
    return SegxError(
        f"ensemble.members: unknown backbone '{backbone}' (no member run in experiment "
        f"'{experiment_name}' and no conf/backbone/{backbone}.yaml);"
        + (hint or f" trained here: {', '.join(trained) or 'none'}; fix the name")
    )


def select_runs(
    client,
    experiment: str,
    experiment_name: str,
    select: str = "list",
    run_ids: Sequence[str] | None = None,
    backbones: Sequence[str] = (),
    data_fingerprint: str | None = None,
) -> list:
    """Member runs: exactly ``run_ids``; else the newest usable run of each of ``backbones``
    (``select='list'``) or of every configuration (config hash: members may differ in backbone,
    arch, loss, seed, sizes) on one data fingerprint or fold layout (``'auto'``). A fold run
    stands for its cross-validated configuration (the parent run).

    Runs passed over (deleted, not FINISHED, another data fingerprint) are reported, one line per
    kind. Runs named in ``run_ids`` are used exactly: a deleted or unfinished one is an error,
    not a skip.
    """
    from segx import tracking

    name = experiment_name
    if select == "list" and run_ids:
        return [_configuration(client, tracking.get_run(client, str(r)), named=True) for r in run_ids]
    runs = tracking.find_runs(client, experiment, "member", status=None, deleted=True)
    usable = [r for r in runs if _skip_reason(r, None) is None]
    fingerprint = data_fingerprint
    skipped: dict[str, list[str]] = {}
    if select == "auto":
        if not usable:
            raise SegxError(f"no finished member runs in experiment '{name}'; train some first")
        # Fold runs compare by their fold layout: each fold has its own split, hence data fingerprint.
        first = usable[0].data.tags
        fingerprint = fingerprint or first.get("segx.cv_fingerprint") or first.get("segx.data_fingerprint")
        chosen, seen = [], set()
        for run in runs:  # newest first: one run per (backbone, arch)
            reason = _skip_reason(run, fingerprint)
            if reason:
                skipped.setdefault(reason, []).append(run.info.run_id)
                continue
            # One per configuration (backbone, arch, loss, seed, sizes...: its config hash), the
            # newest run of each; the fold runs of a cross-validated configuration are one member.
            conf = _configuration(client, run)
            key = MemberRun.of(conf).cv_config_hash or MemberRun.of(conf).config_hash or conf.info.run_id
            if key not in seen:
                chosen.append(conf)
                seen.add(key)
        if not chosen:
            raise SegxError(
                f"no finished member run in experiment '{name}' has data fingerprint "
                f"{fingerprint}; fix ensemble.data_fingerprint or set it to null"
            )
        _report_skipped(skipped)
        return chosen
    chosen = []
    for backbone in map(str, backbones):
        mine = [r for r in runs if MemberRun.of(r).backbone == backbone]
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
        chosen.append(_configuration(client, pick))
    _report_skipped(skipped)
    return chosen
