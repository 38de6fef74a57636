"""The members of an ensemble: which runs (selection), what of them the ensemble reads (their
cached probabilities on validation and test), and whether they may be combined at all (same
split, same file contents, same size). MLflow is reached through segx.tracking only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segx.errors import SegxError


@dataclass
class Member:
    run_id: str
    backbone: str
    arch: str
    fingerprint: str
    view: dict  # how it sees an image: segx.inference.view.View.to_dict()
    val: object  # segx.ensembling.probs.Cached
    test: object | None
    # split / images / masks / settings parts of the fingerprint (empty for runs of older segx)
    fingerprint_parts: dict[str, str] = field(default_factory=dict)
    pixel_spacing: float | tuple[float, float] | None = None  # data.pixel_spacing: HD95 units
    # A cross-validated member: run_id is the parent run, folds its fold runs (fold order); val is
    # then out-of-fold (every training case from the fold model that did not see it) and test
    # the mean of the fold models. Empty for a single-split member.
    folds: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backbone}-{self.arch}"


def unique_labels(members: Sequence[Member]) -> list[str]:
    """Row names for tables: ``backbone-arch``, plus how the member sees images where two members
    share backbone and arch (resize vs patch, other sizes), plus the run ID if still ambiguous."""
    labels = [m.label for m in members]
    out = []
    for m, label in zip(members, labels, strict=True):
        if labels.count(label) > 1:
            label = f"{label}-{m.view.get('mode', 'resize')}{m.view.get('size', '')}"
        out.append(label)
    return [f"{label}-{m.run_id[:8]}" if out.count(label) > 1 else label for m, label in zip(members, out, strict=True)]


def load_member(client, run, workdir: Path, tta: str = "none", allow_incomplete_cv: bool = False) -> Member:
    """A single-split member run or a cross-validated configuration (its parent run)."""
    from segx import tracking
    from segx.tracking import cv

    if run.data.tags.get(tracking.ROLE) == cv.ROLE_CV:
        return cv_member_from_run(client, run, workdir, tta, allow_incomplete_cv)
    return member_from_run(client, run, workdir, tta)


def cv_member_from_run(client, parent, workdir: Path, tta: str = "none", allow_incomplete: bool = False) -> Member:
    """A cross-validated configuration as one member: out-of-fold validation probabilities
    assembled from its fold runs' cached validation maps, test probabilities the fold mean."""
    from segx.ensembling.probs import fold_mean
    from segx.tracking import cv

    folds = int(parent.data.tags.get("segx.folds", 0))
    runs = cv.fold_runs(client, parent.info.experiment_id, parent.info.run_id, folds)
    missing = [f for f in range(folds) if f not in runs]
    if missing and (not allow_incomplete or not runs):
        command = next((r.data.tags.get("segx.command", "") for r in runs.values()), "") or parent.data.tags.get("segx.command", "python -m segx.train ...")
        raise cv.missing_folds_error(parent, missing, command)
    if missing:
        import sys

        print(f"segx: warning: cross-validated member {parent.info.run_id} uses folds "
              f"{sorted(runs)} only (missing {missing}; ensemble.allow_incomplete_cv=true)", file=sys.stderr, flush=True)  # fmt: skip
    singles = [member_from_run(client, runs[f], workdir, tta) for f in sorted(runs)]
    ref = singles[0]
    for f, m in zip(sorted(runs), singles, strict=True):
        if (m.backbone, m.arch, m.view) != (ref.backbone, ref.arch, ref.view):
            raise SegxError(
                f"cross-validated member {parent.info.run_id}: fold run {m.run_id} (fold {f}: {m.label}, {m.view}) "
                f"differs from fold run {ref.run_id} ({ref.label}, {ref.view}); retrain that fold with the others' config"
            )
        if m.test is None or m.test.stems != ref.test.stems:
            raise SegxError(f"cross-validated member {parent.info.run_id}: fold run {m.run_id} has other test cases; retrain it on the same fold file")
    val = assemble_out_of_fold([m.val for m in singles], workdir / parent.info.run_id / f"oof_{tta}.npy")
    test = type(ref.test)(ref.test.stems, fold_mean([m.test.probs for m in singles]), ref.test.masks, ref.test.previews)
    cv_fp = runs[sorted(runs)[0]].data.tags.get("segx.cv_fingerprint", "")
    return Member(
        run_id=parent.info.run_id, backbone=ref.backbone, arch=ref.arch, fingerprint=cv_fp, view=ref.view,
        val=val, test=test, pixel_spacing=ref.pixel_spacing,
        fingerprint_parts={**ref.fingerprint_parts, "split": cv_fp, "data": cv_fp},
        folds=[runs[f].info.run_id for f in sorted(runs)],
    )  # fmt: skip


def assemble_out_of_fold(fold_vals: Sequence, path: Path):
    """Every fold's validation cases as one cache in stem order, written to ``path`` and
    memory-mapped (the whole training set can be larger than memory)."""
    from segx.data.ragged import Ragged
    from segx.ensembling.probs import Cached

    where = {}
    for k, cached in enumerate(fold_vals):
        for i, stem in enumerate(cached.stems):
            if stem in where:
                raise SegxError(f"case '{stem}' is in the validation fold of two fold runs; the fold layouts differ: retrain on one fold file")
            where[stem] = (k, i)
    stems = sorted(where)
    shapes = np.array([fold_vals[where[s][0]].probs.shapes[where[s][1]] for s in stems], np.int64).reshape(-1, 2)
    n_pixels = int((shapes[:, 0] * shapes[:, 1]).sum())
    path.parent.mkdir(parents=True, exist_ok=True)
    probs = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_pixels,))
    masks = np.zeros(n_pixels, bool)
    out_probs, out_masks = Ragged(probs, shapes), Ragged(masks, shapes)
    for j, stem in enumerate(stems):
        k, i = where[stem]
        out_probs[j][...] = fold_vals[k].probs[i]
        out_masks[j][...] = fold_vals[k].masks[i]
    probs.flush()
    # Thumbnails of every case (segx >= 0.3) follow their cases; older caches held only a few.
    if all(len(c.previews) == len(c.stems) for c in fold_vals):
        previews = Ragged.from_list([fold_vals[where[s][0]].previews[where[s][1]] for s in stems], np.uint8)
    else:
        previews = Ragged(np.zeros((0, 3), np.uint8), np.zeros((0, 2), np.int64))
    return Cached(stems, out_probs, out_masks, previews)


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
    run_id = run.info.run_id
    val = load_cached(val_path, folder, run_id=run_id, artifact=cache_artifact("val", tta))
    # No test artifact: an empty test split (reported by the caller). One that is there but
    # unreadable is an error naming the file, not a member without test cases.
    try:
        test_path = tracking.download(client, run_id, cache_artifact("test", tta), folder)
    except SegxError:
        test_path = None
    test = None if test_path is None else load_cached(test_path, folder, run_id=run_id, artifact=cache_artifact("test", tta))
    return Member(
        run_id=run.info.run_id,
        backbone=run.data.tags.get("segx.backbone", params.get("backbone.name", "?")),
        arch=run.data.tags.get("segx.arch", params.get("arch.name", "?")),
        fingerprint=run.data.tags.get("segx.data_fingerprint", ""),
        view=view_of(params),
        pixel_spacing=_spacing_of(params.get("data.pixel_spacing", "None")),
        val=val,
        test=test,
        fingerprint_parts={k: run.data.tags.get(tag, "") for k, tag in FINGERPRINT_TAGS.items()},
    )


def _spacing_of(text: str):
    import json

    if text in ("None", "null", ""):
        return None
    value = json.loads(text)
    return tuple(float(v) for v in value) if isinstance(value, list) else float(value)


def view_of(params: dict) -> dict:
    """A member run's view (how it sees an image) from its logged ``data.*`` params."""
    if params.get("data.mode", "resize") == "patch":
        return {"mode": "patch", "size": int(params["data.patch_size"]), "resize_mode": "resize",
                "scale": float(params.get("data.scale", 1.0)), "overlap": float(params.get("data.overlap", 0.5))}  # fmt: skip
    return {"mode": "resize", "size": int(params.get("data.image_size", 128)),
            "resize_mode": params.get("data.resize_mode", "resize"), "scale": 1.0, "overlap": 0.5}  # fmt: skip


def _configuration(client, run, named: bool = False):
    """The run an ensemble member stands for: a fold run stands for its cross-validated
    configuration (the parent run); a run named by ID must be that parent, not one fold."""
    from segx.tracking import cv

    parent = run.data.tags.get(cv.PARENT_TAG)
    if not parent:
        return run
    if named:
        raise SegxError(
            f"run '{run.info.run_id}' is fold {run.data.tags.get('segx.fold')} of the cross-validated configuration "
            f"{parent}; give the parent run ID {parent} (the ensemble uses all its folds)"
        )
    return client.get_run(parent)


def _skip_reason(run, fingerprint: str | None) -> str | None:
    """Why ``run`` cannot be a member now (None: it can); one of a few kinds, for the report."""
    if run.info.lifecycle_stage == "deleted":
        return "deleted"
    if run.info.status != "FINISHED":
        return f"not FINISHED: {run.info.status}"
    if fingerprint and fingerprint not in (run.data.tags.get("segx.data_fingerprint"), run.data.tags.get("segx.cv_fingerprint")):
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
            key = conf.data.tags.get("segx.cv_config_hash") or conf.data.tags.get("segx.config_hash") or conf.info.run_id
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
        chosen.append(_configuration(client, pick))
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
        if bool(m.folds) != bool(ref.folds):
            cvm, single = (m, ref) if m.folds else (ref, m)
            raise SegxError(
                f"member {cvm.run_id} ({cvm.label}) is cross-validated and {single.run_id} ({single.label}) is not: "
                "their validation cases differ (out-of-fold vs one split); train every member with the same "
                "data.folds, or give only single-split members"
            )
        if m.fingerprint != ref.fingerprint:
            raise SegxError(
                f"members {ref.run_id} ({ref.label}) and {m.run_id} ({m.label}) were trained on "
                f"different data: {_fingerprint_difference(ref, m)}"
            )
        if m.val.stems != ref.val.stems:
            raise SegxError(f"members {ref.run_id} and {m.run_id} have different validation cases; retrain on one split")
        if not m.val.probs.same_shapes(ref.val.probs):
            # Every member is scored at each image's own size, whatever its input size or mode.
            raise SegxError(
                f"members {ref.run_id} and {m.run_id} cached validation maps of different sizes; "
                "retrain both on the same files"
            )
        if not np.array_equal(m.val.masks.flat, ref.val.masks.flat):
            raise SegxError(f"members {ref.run_id} and {m.run_id} disagree on validation ground truth; retrain on one dataset")
        if (m.test is None) != (ref.test is None) or (m.test is not None and m.test.stems != ref.test.stems):
            raise SegxError(f"members {ref.run_id} and {m.run_id} have different test cases; retrain on one split")
