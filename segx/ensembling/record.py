"""The ``ensemble.json`` record: written (:func:`make_record`) and validated (:func:`validate_record`,
also for hand-written records) here, in one place. No heavy imports.

Weights. Version 2 (written since segx stores exact weights) gives each member a whole
``weight_count`` over the record's ``weight_denominator`` (the ensemble computes
``sum_m count_m * p_m`` in integers), plus ``weight`` = count / denominator for people to read.
Version 1 records and hand-written records without counts give float ``weight`` only; they are
read with :meth:`segx.ensembling.probs.Weights.from_floats` (0.3 means 3/10, a float 1/3 means 1/3, other
floats are rounded to millionths), so an old record keeps working and a grid, greedy or equal
weighting it recorded is read back exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from segx.data.view import View
from segx.ensembling.probs import MAX_DENOMINATOR, Weights
from segx.errors import SegxError
from segx.tta import TTA_MODES

REQUIRED = ("members", "threshold")
# Version 3: each member says how it sees an image (``view``: mode, size, scale, overlap), and
# the record's Dice is scored at each image's own size. Versions 1 and 2 had one top-level
# ``image_size``/``resize_mode`` shared by every member (resize mode).
RECORD_VERSION = 3
# Version 4: several classes. The record names them (``labels``: names, mask values, palette,
# ignore, the flip swap) and has no threshold (argmax). A binary ensemble keeps writing version 3,
# which every segx since 0.2 reads.
CLASSES_RECORD_VERSION = 4
_VERSIONS = (1, 2, 3, 4)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def validate_record(record: Any, where: str = "ensemble.json") -> dict:
    """Check a record's structure; raise a one-line error naming the field and the fix."""
    if not isinstance(record, dict) or record.get("format") != "segx-ensemble":
        raise SegxError(f"{where}: not a segx ensemble record (format must be 'segx-ensemble')")
    version = record.get("version", 1)
    if version not in _VERSIONS:
        raise SegxError(f"{where}: record version {version!r} is not one this segx reads ({_VERSIONS}); upgrade segx")
    for key in REQUIRED:
        if key not in record:
            raise SegxError(f"{where}: missing '{key}'; rebuild the record with python -m segx.ensemble")
    members = record["members"]
    if not isinstance(members, list) or not members:
        raise SegxError(f"{where}: 'members' is empty; an ensemble needs at least one member run")
    if version < 3 and "image_size" not in record:
        raise SegxError(f"{where}: missing 'image_size'; rebuild the record with python -m segx.ensemble")
    weights = []
    for i, m in enumerate(members):
        if not isinstance(m, dict) or not m.get("run_id") or not m.get("backbone"):
            raise SegxError(f"{where}: members[{i}] needs 'run_id', 'backbone' and 'weight'")
        if version >= 3:
            View.validate(m.get("view"), f"{where}: members[{i}].view")
        folds = m.get("folds")
        if folds is not None and (
            not isinstance(folds, list) or not folds or not all(isinstance(f, str) and f for f in folds)
        ):
            raise SegxError(
                f"{where}: members[{i}].folds={folds!r} must list the fold run IDs of a cross-validated member"
            )
        w = m.get("weight")
        if not _is_number(w) or w < 0:
            raise SegxError(f"{where}: members[{i}].weight={w!r} must be a non-negative number")
        weights.append(float(w))
    if "weight_denominator" in record:
        _validate_counts(record, where)
    elif version >= 2:
        raise SegxError(
            f"{where}: version {version} record without 'weight_denominator'; rebuild it with python -m segx.ensemble"
        )
    elif abs(sum(weights) - 1.0) > 1e-6:
        raise SegxError(f"{where}: member weights sum to {sum(weights):.6f}, not 1; divide each by their sum")
    t = record["threshold"]
    if version >= 4 and record.get("labels") is not None:
        from segx.data.labels import Labels

        try:
            Labels.from_record(record["labels"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SegxError(
                f"{where}: 'labels' is not a segx class list ({exc}); rebuild it with python -m segx.ensemble"
            ) from None
        if t is not None:
            raise SegxError(
                f"{where}: threshold={t!r} in a multi-class record (labels are chosen by argmax); set it to null"
            )
    elif not _is_number(t) or not 0 <= t <= 1:
        raise SegxError(f"{where}: threshold={t!r} must be a number in [0, 1]")
    if record.get("tta", "none") not in TTA_MODES:
        raise SegxError(f"{where}: tta={record.get('tta')!r} must be 'none' or 'flip'")
    return record


def member_views(record: dict) -> list[dict]:
    """How each member of a validated record sees an image (a view dict per member)."""
    if record.get("version", 1) >= 3:
        return [dict(m["view"]) for m in record["members"]]
    old = {"mode": "resize", "size": int(record["image_size"]), "resize_mode": record.get("resize_mode", "resize")}
    return [dict(old) for _ in record["members"]]


def _validate_counts(record: dict, where: str) -> None:
    denominator = record["weight_denominator"]
    if not _is_count(denominator) or not 1 <= denominator <= MAX_DENOMINATOR:
        raise SegxError(f"{where}: weight_denominator={denominator!r} must be a whole number in 1..{MAX_DENOMINATOR}")
    counts = []
    for i, m in enumerate(record["members"]):
        k = m.get("weight_count")
        if not _is_count(k) or k < 0:
            raise SegxError(
                f"{where}: members[{i}].weight_count={k!r} must be a whole number >= 0 (its weight times weight_denominator)"
            )
        if abs(float(m["weight"]) - k / denominator) > 1e-6:
            # The count is what the ensemble computes with; a weight edited alone would be ignored.
            raise SegxError(
                f"{where}: members[{i}].weight={m['weight']!r} disagrees with weight_count/weight_denominator="
                f"{k}/{denominator}; edit both (or drop weight_count and weight_denominator to give float weights)"
            )
        counts.append(k)
    if sum(counts) != denominator:
        raise SegxError(
            f"{where}: weight_count values sum to {sum(counts)}, not weight_denominator={denominator}; make them add up"
        )


def record_weights(record: dict) -> Weights:
    """The exact weights of a validated record (see the module docstring for version 1)."""
    members = record["members"]
    if "weight_denominator" in record:
        return Weights(tuple(int(m["weight_count"]) for m in members), int(record["weight_denominator"]))
    return Weights.from_floats([float(m["weight"]) for m in members])


def weight_fields(weights: Weights) -> tuple[list[dict], dict]:
    """Per-member and top-level record fields for ``weights`` (what make_record writes)."""
    per_member = [{"weight": w, "weight_count": k} for w, k in zip(weights.floats, weights.counts, strict=True)]
    return per_member, {"weight_denominator": weights.denominator}


def make_record(
    members: Sequence,
    found,
    tta: str,
    method: str,
    tolerance: float,
    thresholds: Sequence[float],
    git: tuple[str | None, bool | None] = (None, None),
    labels: dict | None = None,
) -> dict:
    """The ``ensemble.json`` of a chosen ensemble (``found``: the :class:`~segx.ensembling.choose.SearchOutcome`; ``git``:
    the commit and dirty flag of the code that chose it, ``provenance.git_sha()``)."""
    import segx

    sha, dirty = git
    chosen = found.chosen
    per_member, weight_total = weight_fields(found.weights)
    return {
        "format": "segx-ensemble",
        "version": RECORD_VERSION if labels is None else CLASSES_RECORD_VERSION,
        "segx_version": segx.__version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "data_fingerprint": members[0].fingerprint,
        "scored_at": "original size",
        "members": [
            {
                "run_id": m.run_id,
                "backbone": m.backbone,
                "arch": m.arch,
                **w,
                "model_artifact": "model",
                "view": dict(m.view),
                **({"folds": list(m.folds)} if m.folds else {}),
            }
            for m, w in zip(members, per_member, strict=True)
        ],
        **weight_total,
        "threshold": None if labels is not None else chosen.threshold,
        **({"labels": labels} if labels is not None else {}),
        **(
            {"class_postprocess": {name: p.to_dict() for name, p in found.class_postprocess.items()}}
            if labels is not None
            else {}
        ),
        **({"region_thresholds": dict(found.region_thresholds)} if found.region_thresholds else {}),
        "postprocess": found.postprocess.to_dict(),
        "tta": str(tta),
        "search": {
            "method": str(method),
            "chosen": chosen.name,
            "tolerance": float(tolerance),
            "thresholds": [float(t) for t in thresholds],
        },
        "val_dice": found.val_dice,
    }
