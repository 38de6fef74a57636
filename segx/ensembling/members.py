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

    @property
    def label(self) -> str:
        return f"{self.backbone}-{self.arch}"


def member_from_run(client, run, workdir: Path, tta: str = "none") -> Member:
    """The member's cached probabilities under ``tta``: the ones the recorded pipeline predicts."""
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
    (``select='list'``) or of every (backbone, arch) on one data fingerprint (``'auto'``).

    Runs passed over (deleted, not FINISHED, another data fingerprint) are reported, one line per
    kind. Runs named in ``run_ids`` are used exactly: a deleted or unfinished one is an error,
    not a skip.
    """
    from segx import tracking

    name = experiment_name
    if select == "list" and run_ids:
        return [tracking.get_run(client, str(r)) for r in run_ids]
    runs = tracking.find_runs(client, experiment, "member", status=None, deleted=True)
    usable = [r for r in runs if _skip_reason(r, None) is None]
    fingerprint = data_fingerprint
    skipped: dict[str, list[str]] = {}
    if select == "auto":
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
