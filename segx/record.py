"""The ``ensemble.json`` record: validation of a (possibly hand-written) record. No heavy imports."""

from __future__ import annotations

import math
from typing import Any

from segx.errors import SegxError

REQUIRED = ("members", "threshold", "image_size")


def validate_record(record: Any, where: str = "ensemble.json") -> dict:
    """Check a record's structure; raise a one-line error naming the field and the fix."""
    if not isinstance(record, dict) or record.get("format") != "segx-ensemble":
        raise SegxError(f"{where}: not a segx ensemble record (format must be 'segx-ensemble')")
    for key in REQUIRED:
        if key not in record:
            raise SegxError(f"{where}: missing '{key}'; rebuild the record with python -m segx.ensemble")
    members = record["members"]
    if not isinstance(members, list) or not members:
        raise SegxError(f"{where}: 'members' is empty; an ensemble needs at least one member run")
    weights = []
    for i, m in enumerate(members):
        if not isinstance(m, dict) or not m.get("run_id") or not m.get("backbone"):
            raise SegxError(f"{where}: members[{i}] needs 'run_id', 'backbone' and 'weight'")
        w = m.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise SegxError(f"{where}: members[{i}].weight={w!r} must be a non-negative number")
        weights.append(float(w))
    if abs(sum(weights) - 1.0) > 1e-6:
        raise SegxError(f"{where}: member weights sum to {sum(weights):.6f}, not 1; divide each by their sum")
    t = record["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
        raise SegxError(f"{where}: threshold={t!r} must be a number in [0, 1]")
    if record.get("tta", "none") not in ("none", "flip"):
        raise SegxError(f"{where}: tta={record.get('tta')!r} must be 'none' or 'flip'")
    return record
