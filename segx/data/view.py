"""How a member sees an image: resized to a square, or in patches with a sliding window. Named
once, here: members record it, ensemble records store and check it, prediction repeats it
(:func:`segx.inference.view.predict_cases`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from segx.errors import SegxError

MODES = ("resize", "patch")
RESIZE_MODES = ("resize", "pad")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class View:
    mode: str = "resize"  # resize | patch
    size: int = 128  # network input: the square image (resize) or the window (patch)
    resize_mode: str = "resize"  # resize mode only: resize | pad
    scale: float = 1.0  # patch mode only: images are rescaled by this first
    overlap: float = 0.5  # patch mode only: sliding-window overlap in [0, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> View:
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        view = cls(**known)
        return cls(str(view.mode), int(view.size), str(view.resize_mode), float(view.scale), float(view.overlap))

    @classmethod
    def from_data_config(cls, data) -> View:
        """The view of a ``data`` config section (``data.mode`` and its settings)."""
        mode = str(data.get("mode", "resize"))
        if mode == "patch":
            return cls(
                "patch",
                int(data.patch_size),
                "resize",
                float(data.get("scale", 1.0) or 1.0),
                float(data.get("overlap", 0.5)),
            )
        return cls("resize", int(data.image_size), str(data.get("resize_mode", "resize")))

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> View:
        """A member run's view from its logged ``data.*`` params (strings; older runs lack some)."""
        if params.get("data.mode", "resize") == "patch":
            return cls(
                "patch",
                int(params["data.patch_size"]),
                "resize",
                float(params.get("data.scale", 1.0)),
                float(params.get("data.overlap", 0.5)),
            )
        return cls("resize", int(params.get("data.image_size", 128)), params.get("data.resize_mode", "resize"))

    @staticmethod
    def validate(view: Any, where: str) -> None:
        """A view as a record stores it (a dict): one line naming the field and the fix."""
        fix = "give {mode: resize|patch, size: N, ...} or rebuild the record with python -m segx.ensemble"
        if not isinstance(view, dict) or view.get("mode") not in MODES:
            raise SegxError(f"{where}={view!r}: needs a 'mode' of {' or '.join(MODES)}; {fix}")
        size = view.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SegxError(f"{where}.size={size!r} must be a whole number of pixels; {fix}")
        scale, overlap = view.get("scale", 1.0), view.get("overlap", 0.5)
        if not _is_number(scale) or scale <= 0:
            raise SegxError(f"{where}.scale={scale!r} must be a positive number; {fix}")
        if not _is_number(overlap) or not 0 <= overlap < 1:
            raise SegxError(f"{where}.overlap={overlap!r} must be in [0, 1); {fix}")
        if view.get("resize_mode", "resize") not in RESIZE_MODES:
            raise SegxError(f"{where}.resize_mode={view.get('resize_mode')!r} must be 'resize' or 'pad'; {fix}")

    def describe(self) -> str:
        if self.mode == "patch":
            scale = f", scale {self.scale:g}" if self.scale != 1 else ""
            return f"patches of {self.size} px, sliding window with overlap {self.overlap:g}{scale}"
        how = "padded to a square and resized" if self.resize_mode == "pad" else "resized"
        return f"{how} to {self.size}x{self.size}"
