"""The members of an ensemble as the search sees them (their cached probabilities on validation
and test), and whether they may be combined at all (same split, same file contents, same size).
Which runs they are, and reading them from MLflow: :mod:`segx.workflows.members`."""

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
    # Several classes: data.labels as the member's run recorded it (segx.data.labels.Labels.to_record,
    # plus "flip_swap" when declared); None for one structure.
    labels: dict | None = None
    # Trained on volumes: the slice plan and each case's grid (model/volumes.json); None for 2D.
    volumes: dict | None = None
    nsd_tolerance_mm: float = 1.0  # data.nsd_tolerance_mm: the surface Dice's tolerance

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


def assemble_out_of_fold(fold_vals: Sequence, path: Path):
    """Every fold's validation cases as one cache in stem order, written to ``path`` and
    memory-mapped (the whole training set can be larger than memory)."""
    from segx.data.ragged import Ragged
    from segx.ensembling.probs import Cached

    where = {}
    for k, cached in enumerate(fold_vals):
        for i, stem in enumerate(cached.stems):
            if stem in where:
                raise SegxError(
                    f"case '{stem}' is in the validation fold of two fold runs; the fold layouts differ: retrain on one fold file"
                )
            where[stem] = (k, i)
    stems = sorted(where)
    shapes = np.array([fold_vals[where[s][0]].probs.shapes[where[s][1]] for s in stems], np.int64).reshape(-1, 2)
    n_pixels = int((shapes[:, 0] * shapes[:, 1]).sum())
    path.parent.mkdir(parents=True, exist_ok=True)
    # The folds' own layout: (pixels,) probabilities and bool masks for one structure, (pixels, K)
    # or (pixels, R) probabilities and label maps for classes or regions.
    first = fold_vals[0]
    probs = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_pixels, *first.probs.flat.shape[1:]))
    masks = np.zeros(n_pixels, first.masks.flat.dtype)
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
    return Cached(stems, out_probs, out_masks, previews, first.classes, first.regions)


def view_of(params: dict) -> dict:
    """A member run's view (how it sees an image) from its logged ``data.*`` params."""
    from segx.data.view import View

    return View.from_params(params).to_dict()


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
    labels_a, labels_b = (None if m.labels is None else {**m.labels, "flip_swap": None} for m in (a, b))
    if labels_a != labels_b:  # the settings then show two hashes of data.labels: say what differs
        from segx.data.labels import difference

        return (
            f"same files, read as other classes ({difference(a.labels, b.labels)}); retrain one with the "
            "other's data.labels (and data.regions, data.palette, data.ignore)"
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
            raise SegxError(
                f"members {ref.run_id} and {m.run_id} have different validation cases; retrain on one split"
            )
        if not m.val.probs.same_shapes(ref.val.probs):
            # Every member is scored at each image's own size, whatever its input size or mode.
            raise SegxError(
                f"members {ref.run_id} and {m.run_id} cached validation maps of different sizes; "
                "retrain both on the same files"
            )
        if not np.array_equal(m.val.masks.flat, ref.val.masks.flat):
            raise SegxError(
                f"members {ref.run_id} and {m.run_id} disagree on validation ground truth; retrain on one dataset"
            )
        if (m.test is None) != (ref.test is None) or (m.test is not None and m.test.stems != ref.test.stems):
            raise SegxError(f"members {ref.run_id} and {m.run_id} have different test cases; retrain on one split")
