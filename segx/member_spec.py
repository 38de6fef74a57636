"""What a member's saved model says about itself: ``spec.json`` beside its weights (the run's
``model/spec.json``). Written by ``segx.train`` (:func:`segx.models.save_member`), read wherever
a member network is rebuilt or its flip TTA is checked. Plain values and the data stage's own
objects only: every stage that reads it may import this module."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segx.data.labels import Labels
from segx.data.view import View
from segx.errors import SegxError

_FIX = "retrain the member"


@dataclass(frozen=True)
class MemberSpec:
    """A member's ``spec.json``, read and validated once (:meth:`from_json`, :meth:`read`) and
    written by one :meth:`to_json`. Specs written by every earlier segx still read: ``view``
    came later (None: written before members recorded it), and ``labels`` and the fields after
    it only for several classes or mixed precision."""

    arch: str
    backbone: str
    image_size: int  # the network's square input
    options: dict = field(default_factory=dict)  # arch.options as given (nulls are build_model's defaults)
    view: View | None = None
    labels: Labels | None = None  # None: one structure (one sigmoid)
    flip_swap: tuple[int, ...] | None = None  # the outputs' permutation under a horizontal flip
    no_flip_tta: bool = False  # regions the flip swap maps onto no region: flip TTA cannot be undone
    precision: str | None = None  # "mixed_float16": trained so; rebuilt and predicted in float32

    def to_json(self) -> dict:
        """The spec as JSON, key for key what ``segx.train`` has always written."""
        out: dict[str, Any] = {"arch": self.arch, "backbone": self.backbone, "image_size": self.image_size}
        if self.view is not None:
            out["view"] = self.view.to_dict()
        out["options"] = dict(self.options)
        if self.labels is not None:
            out["labels"] = self.labels.to_record()
        if self.flip_swap is not None:
            out["flip_swap"] = list(self.flip_swap)
        if self.no_flip_tta:
            out["no_flip_tta"] = True
        if self.precision is not None:
            out["precision"] = self.precision
        return out

    @classmethod
    def from_json(cls, spec: Any, where: str = "spec.json") -> MemberSpec:
        """A spec from its JSON (a dict), validated: a problem is one line naming the field."""
        if not isinstance(spec, Mapping):
            raise SegxError(f"{where} holds {type(spec).__name__}, not a member spec (a JSON object); {_FIX}")
        for key in ("arch", "backbone"):
            if not isinstance(spec.get(key), str):
                raise SegxError(f"{where}: {key}={spec.get(key)!r} must be a name; {_FIX}")
        size = spec.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SegxError(f"{where}: image_size={size!r} must be a whole number of pixels; {_FIX}")
        options = spec.get("options") or {}
        if not isinstance(options, Mapping):
            raise SegxError(f"{where}: options={options!r} must be a mapping (arch.options); {_FIX}")
        view = spec.get("view")
        if view is not None:
            try:
                View.validate(view, f"{where}: view")
            except SegxError as exc:  # its fix is a record's; a spec's is the member's
                raise SegxError(f"{str(exc).split('; ')[0]}; {_FIX}") from None
        return cls(
            arch=spec["arch"],
            backbone=spec["backbone"],
            image_size=size,
            options=dict(options),
            view=None if view is None else View.from_dict(view),
            labels=_labels(spec.get("labels"), where),
            flip_swap=_permutation(spec.get("flip_swap"), where),
            no_flip_tta=bool(spec.get("no_flip_tta", False)),
            precision=None if spec.get("precision") is None else str(spec["precision"]),
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> MemberSpec:
        """The spec in the file ``path`` (one line if it is missing, not JSON or not valid)."""
        try:
            spec = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            raise SegxError(f"{path} is missing or not JSON; {_FIX}") from None
        return cls.from_json(spec, str(path))

    def write(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))


def _labels(written: Any, where: str) -> Labels | None:
    if not written:  # one structure
        return None
    if not isinstance(written, Mapping) or not isinstance(written.get("names"), list):
        raise SegxError(f"{where}: labels={written!r} must name the classes ({{names: [...], values: [...]}}); {_FIX}")
    try:
        return Labels.from_record(written)
    except (KeyError, TypeError, ValueError) as exc:
        raise SegxError(f"{where}: labels are not readable ({type(exc).__name__}: {exc}); {_FIX}") from None


def _permutation(swap: Any, where: str) -> tuple[int, ...] | None:
    if swap is None:
        return None
    if not isinstance(swap, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in swap):
        raise SegxError(f"{where}: flip_swap={swap!r} must be a list of output indices; {_FIX}")
    return tuple(swap)
