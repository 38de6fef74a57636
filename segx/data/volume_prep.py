"""Volumes to the 2D slices segx's members train on, and predictions back onto the scan's grid.

nnU-Net's ``2d`` configuration is the model, and its rules are kept:

- **Slice axis.** Along the axis with the coarsest median spacing of the training cases (ties:
  the volume's third axis, z), or ``data.slice_axis`` (x, y or z: the volume's index axes).
- **In-plane spacing.** Slices are resampled in-plane only, to ``data.spacing`` (default: the
  median in-plane spacing of the training cases): images with cubic interpolation (order 3),
  labels with nearest neighbour; the slice spacing is kept.
- **Normalisation by modality.** A CT channel (``channel_names`` "CT") is clipped to the 0.5
  and 99.5 percentiles of the training set's foreground intensities, then z-scored with their
  mean and standard deviation; any other channel is z-scored per volume (over its nonzero
  voxels where the volume has a zero background, as nnU-Net's ``use_mask_for_norm`` does).
  The statistics go into the :class:`SlicePlan`, which enters the data fingerprint and every
  member's record, so prediction applies exactly the same.
- **2.5D context.** ``data.context_slices=k`` puts the k neighbouring slices on each side into
  extra channels (the edge slice repeated at the ends).

segx's members read 3-channel 8-bit images (ImageNet-shaped encoders, the on-disk decoded cache,
albumentations), so the normalised values are stored as 8 bit: ``z`` in [-4, 4] standard
deviations maps linearly onto 0..255 (steps of 0.031 SD; about 12 HU for a CT standard
deviation of 400 HU). Channels are filled to 3 by repeating the last; a case needing more than
3 (channels x (2k + 1)) is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from segx.errors import SegxError

PLAN_VERSION = 1
Z_WINDOW = 4.0  # standard deviations each side of the mean kept in the 8-bit encoding
MAX_CHANNELS = 3
FOREGROUND_SAMPLES = 10_000  # CT foreground voxels kept per case for the statistics (nnU-Net too)
AXIS_NAMES = {"x": 2, "y": 1, "z": 0}  # index axis name -> numpy axis of a (z, y, x) array
SLICE_SEPARATOR = "__s"  # a slice's stem: <case>__s0007


def slice_stem(case_id: str, index: int) -> str:
    return f"{case_id}{SLICE_SEPARATOR}{index:04d}"


def case_of(stem: str) -> str:
    """The case (volume) a slice's stem belongs to."""
    return stem.rsplit(SLICE_SEPARATOR, 1)[0]


def group_slices(stems) -> tuple[list[str], list[int]]:
    """(case ids, slices per case) of slice stems that list each case's slices together, in order
    0, 1, ... (as a split lists them); anything else is refused (a bug, not a user's error)."""
    ids: list[str] = []
    counts: list[int] = []
    for stem in stems:
        case, index = case_of(stem), int(stem.rsplit(SLICE_SEPARATOR, 1)[1])
        if ids and ids[-1] == case:
            if index != counts[-1]:
                raise ValueError(f"slice {stem} out of order")
            counts[-1] += 1
        else:
            if case in ids or index != 0:
                raise ValueError(f"the slices of case {case} are not listed together from 0")
            ids.append(case)
            counts.append(1)
    return ids, counts


@dataclass(frozen=True)
class ChannelNorm:
    """How one channel is normalised: ``ct`` (clip to [low, high], then (v - mean) / std with the
    training set's statistics) or ``zscore`` (each volume by its own mean and std)."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class SlicePlan:
    """How every volume of a dataset becomes slices: written into each member's record."""

    slice_axis: int  # numpy axis of a (z, y, x) volume
    spacing: tuple[float, float]  # in-plane target spacing (mm), numpy order of the two axes left
    context: int
    norms: tuple[ChannelNorm, ...]
    version: int = PLAN_VERSION

    @property
    def channels(self) -> int:
        return len(self.norms) * (2 * self.context + 1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, written: dict) -> SlicePlan:
        return cls(
            int(written["slice_axis"]),
            tuple(float(v) for v in written["spacing"]),
            int(written["context"]),
            tuple(ChannelNorm(**n) for n in written["norms"]),
            int(written.get("version", PLAN_VERSION)),
        )

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def choose_slice_axis(spacings_zyx: list[tuple[float, ...]], override: str | None) -> int:
    """The numpy axis to slice along: ``override`` (x, y or z) or the coarsest median spacing."""
    if override is not None:
        if str(override) not in AXIS_NAMES:
            raise SegxError(f"data.slice_axis={override!r} must be x, y, z or null (the coarsest spacing)")
        return AXIS_NAMES[str(override)]
    median = np.median(np.asarray(spacings_zyx, float), axis=0)
    # argmax takes the first of equal values: z (axis 0) on isotropic data, as nnU-Net's 2D does.
    return int(np.argmax(median))


def in_plane(spacing_zyx: tuple[float, ...], axis: int) -> tuple[float, float]:
    return tuple(float(s) for i, s in enumerate(spacing_zyx) if i != axis)


def target_spacing(spacings_zyx: list[tuple[float, ...]], axis: int, given) -> tuple[float, float]:
    """``data.spacing`` (one number or two, mm) or the median in-plane spacing of the training cases."""
    if given is not None:
        values = [float(v) for v in (given if isinstance(given, (list, tuple)) else [given])]
        if len(values) not in (1, 2) or not all(np.isfinite(v) and v > 0 for v in values):
            raise SegxError(f"data.spacing={given!r} must be null, one positive number (mm) or two")
        return (values[0], values[-1])
    planes = np.asarray([in_plane(s, axis) for s in spacings_zyx], float)
    return tuple(float(v) for v in np.median(planes, axis=0))


def foreground_sample(channel: np.ndarray, label: np.ndarray, seed: int) -> np.ndarray:
    """Up to :data:`FOREGROUND_SAMPLES` intensities of ``channel`` where ``label`` is foreground."""
    values = channel[label > 0]
    if values.size > FOREGROUND_SAMPLES:
        values = np.random.default_rng(seed).choice(values, FOREGROUND_SAMPLES, replace=False)
    return values.astype(np.float64)


def ct_norm(samples: list[np.ndarray], channel_name: str) -> ChannelNorm:
    """nnU-Net's CT normalisation from the training set's foreground intensities."""
    values = np.concatenate(samples) if samples else np.zeros(0)
    if values.size == 0:
        raise SegxError(f"channel {channel_name} is CT but no training label has foreground; check labelsTr/")
    low, high = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, low, high)
    return ChannelNorm("ct", float(low), float(high), float(clipped.mean()), float(max(clipped.std(), 1e-8)))


def normalise(channel: np.ndarray, norm: ChannelNorm) -> np.ndarray:
    """One channel (any shape) in standard deviations, float32."""
    values = channel.astype(np.float32)
    if norm.kind == "ct":
        return (np.clip(values, norm.low, norm.high) - norm.mean) / norm.std
    inside = values[values != 0] if (values == 0).mean() > 0.25 else values.ravel()  # a zero background
    inside = inside if inside.size else values.ravel()
    return (values - float(inside.mean())) / float(max(inside.std(), 1e-8))


def to_uint8(z: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((z + Z_WINDOW) * (255.0 / (2 * Z_WINDOW))), 0, 255).astype(np.uint8)


def check_channels(n_channels: int, context: int) -> None:
    total = n_channels * (2 * context + 1)
    if total > MAX_CHANNELS:
        raise SegxError(
            f"{n_channels} channel(s) with data.context_slices={context} make {total} input channels; segx's "
            f"members take {MAX_CHANNELS}: lower data.context_slices (0 keeps each slice alone)"
        )


class SlicedVolume:
    """One volume's slices at the plan's in-plane spacing, normalised: ``image(i)`` uint8 (H, W, 3)
    and ``label(i)`` uint8 (H, W); ``n`` slices."""

    def __init__(self, channels: np.ndarray, label: np.ndarray | None, spacing_zyx, plan: SlicePlan):
        # channels: (c, z, y, x) as read; the slice axis moved first, normalised once per volume.
        axis = plan.slice_axis
        self.plan = plan
        self.plane_shape = tuple(s for i, s in enumerate(channels.shape[1:]) if i != axis)
        self.source_spacing = in_plane(spacing_zyx, axis)
        self.shape = _resampled_shape(self.plane_shape, self.source_spacing, plan.spacing)
        moved = np.moveaxis(channels, axis + 1, 1)
        self._z = np.stack([normalise(moved[c], plan.norms[c]) for c in range(moved.shape[0])])
        self._label = None if label is None else np.moveaxis(label, axis, 0)
        self.n = moved.shape[1]

    def image(self, index: int) -> np.ndarray:
        k = self.plan.context
        planes = []
        for c in range(self._z.shape[0]):
            for offset in range(-k, k + 1):
                planes.append(self._z[c, min(max(index + offset, 0), self.n - 1)])
        planes += [planes[-1]] * (MAX_CHANNELS - len(planes))
        stacked = np.stack(planes, axis=-1)
        if self.shape != self.plane_shape:
            stacked = cv2.resize(stacked, self.shape[::-1], interpolation=cv2.INTER_CUBIC)
        return to_uint8(stacked)

    def label(self, index: int) -> np.ndarray:
        plane = self._label[index]
        if self.shape != self.plane_shape:
            plane = cv2.resize(plane, self.shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
        return plane


def _resampled_shape(shape, source, target) -> tuple[int, int]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, source, target, strict=True))


def back_to_grid(planes: np.ndarray, plane_shape: tuple[int, int], axis: int) -> np.ndarray:
    """Per-slice maps at the plan's spacing, (n, h, w[, c]) float, back to the volume's own grid:
    in-plane linear resampling to ``plane_shape``, then the slice axis put back."""
    if planes.shape[1:3] != tuple(plane_shape):
        size = (plane_shape[1], plane_shape[0])
        channel_axis = planes.ndim == 4
        planes = np.stack([cv2.resize(p, size, interpolation=cv2.INTER_LINEAR) for p in planes])
        if channel_axis and planes.ndim == 3:  # cv2 dropped a channel axis of 1
            planes = planes[..., None]
    return np.moveaxis(planes, 0, axis)
