"""Which test-time augmentation an ensemble may predict with: one rule for every command
(``segx.ensemble``, ``segx.predict``, ``segx.export``), so none of them lets a wrong pipeline through.

Flip TTA averages the plain pass with width- and height-mirrored ones. It is wrong, and refused,
where a mirrored pass cannot be mapped back onto the classes:

- classes whose names say left or right (``Labels.sided``) without ``data.flip_swap``: the
  width-flipped pass labels each side as the other;
- a region ensemble whose members were trained with a swap that maps some region onto no region
  (their ``spec.json`` says ``no_flip_tta``): the mirrored pass cannot be undone.

Any other TTA that the ensemble was not searched with (its record's ``tta``) runs, with a warning:
weights, thresholds and post-processing were chosen on the recorded pipeline's probabilities.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from segx.data.labels import Labels
from segx.ensembling.record import EnsembleRecord
from segx.ensembling.task import task_for
from segx.errors import SegxError
from segx.member_spec import MemberSpec


def members_without_flip(model_paths: Iterable) -> bool:
    """Whether any member model folder (a folder, a list of fold folders, or None for a member of
    weight 0) says in its ``spec.json`` that flip TTA cannot be undone for it (``no_flip_tta``)."""
    for entry in model_paths:
        for folder in [] if entry is None else entry if isinstance(entry, (list, tuple)) else [entry]:
            try:
                spec = MemberSpec.read(Path(folder) / "spec.json")
            except SegxError:
                continue  # the model loader says what is wrong with it
            if spec.no_flip_tta:
                return True
    return False


def check_tta(
    tta: str,
    recorded: str,
    labels: Labels | None,
    *,
    swapped: bool = False,
    no_flip: bool = False,
    key: str = "tta",
) -> str | None:
    """Refuse (:class:`SegxError`, one line naming ``key``) a TTA that would be wrong for an
    ensemble of ``labels`` (None: one structure) searched with ``tta=recorded``; return a warning
    line when ``tta`` is only untuned (not what the ensemble was searched with), else None.
    ``swapped``: the members were trained with data.flip_swap; ``no_flip``: some member's flip
    cannot be undone (:func:`members_without_flip`, or the record's ``no_flip_tta``)."""
    if tta == "flip":
        task = task_for(labels)
        if no_flip:
            regions = ", ".join(task.region_names or ())
            raise SegxError(
                f"{key}=flip cannot be undone for this ensemble's regions ({regions}): data.flip_swap maps a "
                f"region onto no region, so its members were trained without flip TTA; use {key}=none"
            )
        sided = task.sided
        if sided and not swapped:
            raise SegxError(
                f"{key}=flip mirrors the images, and classes {', '.join(sided)} name a side, but the members were "
                f"trained without data.flip_swap: a mirrored pass labels each side as the other; use {key}=none, or "
                "retrain the members with data.flip_swap set"
            )
    if tta != recorded:
        return (
            f"tuned for tta={recorded} (weights, thresholds and post-processing chosen on that pipeline); "
            f"running {key}={tta}, which its recorded scores do not describe (drop the {key} override to run as tuned)"
        )
    return None


def check_record_tta(record: EnsembleRecord, tta: str | None, model_paths: Iterable) -> str | None:
    """:func:`check_tta` for an ensemble's record (``tta``: the override, None for the recorded one)
    and its members' model folders."""
    return check_tta(
        tta or record.tta,
        record.tta,
        record.labels,
        swapped=record.flip_swap is not None,
        no_flip=record.no_flip_tta or members_without_flip(model_paths),
    )


def check_tagged_tta(tta: str, tagged: Mapping | None, key: str) -> None:
    """:func:`check_tta` for members whose runs tag their classes (``tagged``: the tag's JSON,
    :meth:`Labels.to_record` plus ``flip_swap`` and ``no_flip_tta``; None for one structure)."""
    labels = None if tagged is None else Labels.from_record(tagged)
    swapped = tagged is not None and "flip_swap" in tagged
    check_tta(tta, tta, labels, swapped=swapped, no_flip=bool((tagged or {}).get("no_flip_tta")), key=key)
