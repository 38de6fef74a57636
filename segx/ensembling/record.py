"""The ``ensemble.json`` record: :class:`EnsembleRecord`, read and validated once
(:meth:`EnsembleRecord.from_json`, with the rules of :func:`validate_record`, also for hand-written
records) and written by one :meth:`EnsembleRecord.to_json`; :func:`make_record` builds it for a
chosen ensemble. Every other module reads a record's fields as attributes. No TensorFlow.

Weights. Version 2 (written since segx stores exact weights) gives each member a whole
``weight_count`` over the record's ``weight_denominator`` (the ensemble computes
``sum_m count_m * p_m`` in integers), plus ``weight`` = count / denominator for people to read.
Version 1 records and hand-written records without counts give float ``weight`` only; they are
read with :meth:`segx.ensembling.probs.Weights.from_floats` (0.3 means 3/10, a float 1/3 means 1/3, other
floats are rounded to millionths), so an old record keeps working and a grid, greedy or equal
weighting it recorded is read back exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segx.data.labels import Labels
from segx.data.view import View
from segx.ensembling.probs import MAX_DENOMINATOR, Weights
from segx.ensembling.task import Task, task_for, task_of_record
from segx.errors import SegxError
from segx.scoring.postprocess import PostProcess
from segx.tta import TTA_MODES

if TYPE_CHECKING:  # segx.ensembling.choose reads members and runs searches: the record needs its settings only
    from segx.ensembling.choose import SearchSettings

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


# The keys make_record writes, in its order (a record read from JSON keeps the order it was read in).
_RECORD_KEYS = (
    "format",
    "version",
    "segx_version",
    "git_sha",
    "git_dirty",
    "data_fingerprint",
    "scored_at",
    "image_size",
    "resize_mode",
    "members",
    "weight_denominator",
    "threshold",
    "labels",
    "class_postprocess",
    "region_thresholds",
    "postprocess",
    "tta",
    "search",
    "val_dice",
    "run_id",
)
_MEMBER_KEYS = ("run_id", "backbone", "arch", "weight", "weight_count", "model_artifact", "view", "folds")


@dataclass(frozen=True)
class RecordMember:
    """One member of an ensemble record: its run (a cross-validated member: the parent run, and
    ``folds`` its fold runs in fold order), how it sees an image, and its weight (``weight_count``
    over the record's ``weight_denominator``; None in version 1 and hand-written records)."""

    run_id: str
    backbone: str
    weight: float
    view: View
    arch: str | None = None
    weight_count: int | None = None
    model_artifact: str = "model"
    folds: tuple[str, ...] = ()
    # Keys no segx writes (kept as read), and the JSON it was read from (None: made by segx).
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    source: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def runs(self) -> list[str]:
        """The runs whose models this member predicts with: its fold runs, or its own run."""
        return list(self.folds) or [self.run_id]

    @classmethod
    def from_json(cls, m: Mapping[str, Any], view: View | None = None) -> RecordMember:
        """A validated member entry (``view``: the record's one view, versions 1 and 2)."""
        return cls(
            run_id=str(m["run_id"]),
            backbone=str(m["backbone"]),
            weight=m["weight"],
            view=View.from_dict(m["view"]) if "view" in m else view,
            arch=m.get("arch"),
            weight_count=m.get("weight_count"),
            model_artifact=m.get("model_artifact", "model"),
            folds=tuple(m.get("folds") or ()),
            extra={k: v for k, v in m.items() if k not in _MEMBER_KEYS},
            source=m,
        )

    def to_json(self) -> dict:
        full = {
            "run_id": self.run_id,
            "backbone": self.backbone,
            "arch": self.arch,
            "weight": self.weight,
            "weight_count": self.weight_count,
            "model_artifact": self.model_artifact,
            "view": self.view.to_dict(),
            "folds": list(self.folds) if self.folds else None,
            **self.extra,
        }
        if self.source is not None:  # as read, but for fields changed since
            read = RecordMember.from_json(self.source, self.view)
            return _as_read(self, read, self.source, full, {})
        return {k: v for k, v in full.items() if v is not None or k == "arch"}


@dataclass(frozen=True)
class RecordSearch:
    """How the weighting was chosen: the search ``method``, the ``chosen`` candidate's name, the
    ``tolerance`` and the binary ``thresholds`` searched."""

    method: str
    chosen: str
    tolerance: float
    thresholds: tuple[float, ...]

    @classmethod
    def from_json(cls, search: Any) -> RecordSearch | None:
        """None where the record holds no search in segx's form (hand-written: kept as read)."""
        if not isinstance(search, dict) or set(search) != {"method", "chosen", "tolerance", "thresholds"}:
            return None
        thresholds = search["thresholds"]
        if not isinstance(thresholds, list):
            return None
        return cls(search["method"], search["chosen"], search["tolerance"], tuple(thresholds))

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "chosen": self.chosen,
            "tolerance": self.tolerance,
            "thresholds": list(self.thresholds),
        }


@dataclass(frozen=True)
class EnsembleRecord:
    """An ``ensemble.json``, read and validated once (:meth:`from_json`, :meth:`load`) and written
    by one :meth:`to_json`: a record read and written again is the same JSON, key for key.

    ``labels``: the classes of a several-classes or regions ensemble (None: one structure, binary,
    labelled by ``threshold``); ``flip_swap`` the permutation of the members' outputs that flip TTA's
    mirrored pass needs (None: no swap declared); ``no_flip_tta``: the members' swap maps some
    region onto no region, so flip TTA cannot be undone. Versions 1 and 2 give ``image_size`` and
    ``resize_mode`` for every member (each member's ``view`` then says the same)."""

    members: tuple[RecordMember, ...]
    threshold: float | None
    version: int = RECORD_VERSION
    weight_denominator: int | None = None
    labels: Labels | None = None
    flip_swap: tuple[int, ...] | None = None
    no_flip_tta: bool = False
    class_postprocess: Mapping[str, PostProcess] = field(default_factory=dict)
    region_thresholds: Mapping[str, float] = field(default_factory=dict)
    postprocess: PostProcess = field(default_factory=PostProcess)
    tta: str = "none"
    search: RecordSearch | None = None
    val_dice: float | None = None
    # Provenance: the segx and the code (commit, uncommitted changes) that chose it, the data.
    segx_version: str | None = None
    git_sha: str | None = None
    git_dirty: bool | None = None
    data_fingerprint: str | None = None
    scored_at: str | None = None
    # The ensemble's MLflow run (set once the run is logged; records in MLflow do not hold it).
    run_id: str | None = None
    # Versions 1 and 2: one view for every member.
    image_size: int | None = None
    resize_mode: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    source: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    # -- reading -----------------------------------------------------------------------------

    @classmethod
    def from_json(cls, record: Any, where: str = "ensemble.json") -> EnsembleRecord:
        """A record from its JSON (a dict), validated (:func:`validate_record`: one line naming
        the field and the fix)."""
        validate_record(record, where)
        record = copy.deepcopy(record)  # what to_json gives back, whatever the caller does with its dict
        version = record.get("version", 1)
        if version >= 3:
            views = [View.from_dict(m["view"]) for m in record["members"]]
        else:
            old = View("resize", int(record["image_size"]), str(record.get("resize_mode", "resize")))
            views = [old] * len(record["members"])
        named = record.get("labels") if version >= 4 else None
        labels = None if named is None else Labels.from_record(named)
        swap = None if named is None else named.get("flip_swap")
        search = RecordSearch.from_json(record.get("search"))
        known = set(_RECORD_KEYS) - ({"search"} if search is None else set())
        return cls(
            members=tuple(RecordMember.from_json(m, v) for m, v in zip(record["members"], views, strict=True)),
            threshold=record["threshold"],
            version=version,
            weight_denominator=record.get("weight_denominator"),
            labels=labels,
            flip_swap=None if swap is None else tuple(int(i) for i in swap),
            no_flip_tta=bool(named is not None and named.get("no_flip_tta")),
            class_postprocess=_postprocess_by_name(record.get("class_postprocess"), where),
            region_thresholds=dict(record.get("region_thresholds") or {}),
            postprocess=_postprocess(record.get("postprocess", {}), f"{where}: postprocess"),
            tta=record.get("tta", "none"),
            search=search,
            val_dice=record.get("val_dice"),
            segx_version=record.get("segx_version"),
            git_sha=record.get("git_sha"),
            git_dirty=record.get("git_dirty"),
            data_fingerprint=record.get("data_fingerprint"),
            scored_at=record.get("scored_at"),
            run_id=record.get("run_id"),
            image_size=record.get("image_size"),
            resize_mode=record.get("resize_mode"),
            extra={k: v for k, v in record.items() if k not in known},
            source=record,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, where: str | None = None) -> EnsembleRecord:
        """The record in the JSON file ``path`` (one line if it is missing, not JSON or not valid)."""
        where = where or str(path)
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            raise SegxError(
                f"{where} is missing or not JSON; rebuild the ensemble with python -m segx.ensemble"
            ) from None
        return cls.from_json(record, where)

    # -- writing -----------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The record as JSON: what :func:`make_record` writes, or the JSON it was read from."""
        named = self.task.labels_record(self.flip_swap, self.no_flip_tta)
        full = {
            "format": "segx-ensemble",
            "version": self.version,
            "segx_version": self.segx_version,
            "git_sha": self.git_sha,
            "git_dirty": self.git_dirty,
            "data_fingerprint": self.data_fingerprint,
            "scored_at": self.scored_at,
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
            "members": [m.to_json() for m in self.members],
            "weight_denominator": self.weight_denominator,
            "threshold": self.threshold,
            "labels": named,
            "class_postprocess": {name: p.to_dict() for name, p in self.class_postprocess.items()},
            "region_thresholds": dict(self.region_thresholds),
            "postprocess": self.postprocess.to_dict(),
            "tta": self.tta,
            "search": None if self.search is None else self.search.to_json(),
            "val_dice": self.val_dice,
            "run_id": self.run_id,
            **self.extra,
        }
        if self.source is not None:  # read from JSON: as read (key order too), but for fields changed since
            read = EnsembleRecord.from_json(self.source)
            fields = {"labels": ("labels", "flip_swap", "no_flip_tta")}
            out = _as_read(self, read, self.source, full, fields)
            if self.run_id is not None and "run_id" not in out:
                out["run_id"] = self.run_id
            return out
        # Written by segx: make_record's keys (class_postprocess from version 4, the records that name
        # classes; region_thresholds for regions, run_id once logged, versions 1-2's image_size and
        # resize_mode where set).
        if self.version < CLASSES_RECORD_VERSION:
            del full["class_postprocess"]
        if not self.region_thresholds:
            del full["region_thresholds"]
        sometimes = ("labels", "run_id", "image_size", "resize_mode", "search")
        return {k: v for k, v in full.items() if k not in sometimes or v is not None}

    def with_run_id(self, run_id: str) -> EnsembleRecord:
        return replace(self, run_id=run_id)

    # -- what the stages read ----------------------------------------------------------------

    @property
    def weights(self) -> Weights:
        """The exact weights (see the module docstring for version 1)."""
        if self.weight_denominator is not None:
            return Weights(tuple(int(m.weight_count) for m in self.members), int(self.weight_denominator))
        return Weights.from_floats([float(m.weight) for m in self.members])

    @property
    def views(self) -> list[View]:
        """How each member sees an image."""
        return [m.view for m in self.members]

    @property
    def task(self) -> Task:
        """The kind of segmentation the members make (one structure where ``labels`` is None)."""
        return task_for(self.labels)

    @property
    def n_outputs(self) -> int:
        """Output channels per network: 1 (a sigmoid) for one structure, K for K classes, R for R regions."""
        return self.task.n_outputs

    @property
    def chosen_method(self) -> str | None:
        """The name of the weighting the search chose (None in a hand-written record)."""
        return None if self.search is None else self.search.chosen


def _as_read(now, read, source: Mapping[str, Any], full: dict, fields: Mapping[str, tuple[str, ...]]) -> dict:
    """The JSON ``source`` an object was read from, key by key, where its fields (``fields``: the
    attributes a key sets, else the attribute of that name) still equal what was read (``read``);
    ``full[key]`` (written afresh) for those changed since (:func:`dataclasses.replace`)."""
    out = {}
    for key, value in source.items():
        names = fields.get(key, (key,))
        if key == "members":
            same = len(now.members) == len(read.members) and all(
                a == b and a.source is source["members"][i]
                for i, (a, b) in enumerate(zip(now.members, read.members, strict=True))
            )
        elif all(hasattr(now, n) for n in names):
            same = all(getattr(now, n) == getattr(read, n) for n in names)
        else:  # a key segx does not know: kept as it is in ``extra``
            same = now.extra.get(key, value) == value
        out[key] = value if same else full[key]
    return out


def _postprocess(value: Any, where: str) -> PostProcess:
    try:
        return PostProcess(**value)
    except TypeError:
        raise SegxError(
            f"{where}={value!r} must give min_size, keep_largest and fill_holes; rebuild the record with "
            "python -m segx.ensemble"
        ) from None


def _postprocess_by_name(value: Any, where: str) -> dict[str, PostProcess]:
    if not value:
        return {}
    return {str(name): _postprocess(p, f"{where}: class_postprocess.{name}") for name, p in value.items()}


def make_record(
    members: Sequence,
    found,
    tta: str,
    search: SearchSettings,
    git: tuple[str | None, bool | None] = (None, None),
    labels: Mapping | None = None,
) -> EnsembleRecord:
    """The record of a chosen ensemble (``found``: the :class:`~segx.ensembling.choose.SearchOutcome`
    of a search run with ``search``, whose method, tolerance and thresholds the record keeps; ``git``:
    the commit and dirty flag of the code that chose it, ``provenance.git_sha()``; ``labels``: the members'
    classes as their runs recorded them, None for one structure)."""
    import segx

    method, tolerance, thresholds = search.method, search.tolerance, search.thresholds
    sha, dirty = git
    chosen = found.chosen
    weights = found.weights
    task = task_of_record(labels)
    swap = (labels or {}).get("flip_swap")
    return EnsembleRecord(
        members=tuple(
            RecordMember(
                run_id=m.run_id,
                backbone=m.backbone,
                arch=m.arch,
                weight=w,
                weight_count=k,
                view=View.from_dict(m.view),
                folds=tuple(m.folds),
            )
            for m, w, k in zip(members, weights.floats, weights.counts, strict=True)
        ),
        threshold=chosen.threshold if task.one_threshold else None,
        version=task.record_version,
        weight_denominator=weights.denominator,
        labels=task.labels,
        flip_swap=None if swap is None else tuple(swap),
        no_flip_tta=bool((labels or {}).get("no_flip_tta")),
        class_postprocess=dict(found.class_postprocess),  # the task's finish: empty for one structure
        region_thresholds=dict(found.region_thresholds),
        postprocess=found.postprocess,
        tta=str(tta),
        search=RecordSearch(str(method), chosen.name, float(tolerance), tuple(float(t) for t in thresholds)),
        val_dice=found.val_dice,
        segx_version=segx.__version__,
        git_sha=sha,
        git_dirty=dirty,
        data_fingerprint=members[0].fingerprint,
        scored_at="original size",
    )
