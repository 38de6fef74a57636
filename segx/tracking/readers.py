"""Typed views of segx's MLflow runs: what a member or an ensemble run says about itself, read
from its tags in one place (the tag names: :mod:`segx.tracking.tags`), so callers never spell a
tag or guess its default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segx.tracking import tags


def _tag(run: Any, name: str, default: str = "") -> str:
    return run.data.tags.get(name, default)


@dataclass(frozen=True)
class MemberRun:
    """A member run (``segx.role=member``), a fold of a cross-validated member, or its parent
    (``segx.role=cv``)."""

    run_id: str
    status: str
    role: str
    backbone: str
    arch: str
    config_hash: str
    data_fingerprint: str
    cv_fingerprint: str
    cv_config_hash: str
    command: str
    fold: int | None  # this fold's number; None for a single-split member or a parent
    folds: int  # a parent's number of folds (0 otherwise)
    cv_parent: str  # a fold run's parent run ID ("" otherwise)
    logged_model_id: str
    ensembles: tuple[str, ...]  # the ensemble runs that use it
    disk_full: bool  # it stopped on a full disk (resumable once there is room)

    @classmethod
    def of(cls, run: Any) -> MemberRun:
        fold = _tag(run, tags.FOLD)
        return cls(
            run_id=run.info.run_id,
            status=run.info.status,
            role=_tag(run, tags.ROLE),
            backbone=_tag(run, tags.BACKBONE),
            arch=_tag(run, tags.ARCH),
            config_hash=_tag(run, tags.CONFIG_HASH),
            data_fingerprint=_tag(run, tags.DATA_FINGERPRINT),
            cv_fingerprint=_tag(run, tags.CV_FINGERPRINT),
            cv_config_hash=_tag(run, tags.CV_CONFIG_HASH),
            command=_tag(run, tags.COMMAND),
            fold=int(fold) if fold.lstrip("-").isdigit() else None,
            folds=int(_tag(run, tags.FOLDS, "0") or 0),
            cv_parent=_tag(run, tags.CV_PARENT),
            logged_model_id=_tag(run, tags.LOGGED_MODEL_ID),
            ensembles=tuple(e for e in _tag(run, tags.ENSEMBLES).split(",") if e),
            disk_full=_tag(run, tags.DISK_FULL) == "true",
        )


@dataclass(frozen=True)
class EnsembleRun:
    """An ensemble run (``segx.role=ensemble``)."""

    run_id: str
    status: str
    role: str
    reproduce: str
    exports: dict[str, str]  # format -> the newest export's child run ID

    @classmethod
    def of(cls, run: Any) -> EnsembleRun:
        exports = {k[len(tags.EXPORT) :]: v for k, v in run.data.tags.items() if k.startswith(tags.EXPORT)}
        return cls(run.info.run_id, run.info.status, _tag(run, tags.ROLE), _tag(run, tags.REPRODUCE), exports)

    @property
    def is_ensemble(self) -> bool:
        return self.role == "ensemble"
