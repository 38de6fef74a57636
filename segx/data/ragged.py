"""Per-case maps of different sizes in one flat array (numpy only).

Scoring happens at each case's own size, so the probabilities and masks of a split are ragged:
case ``i`` is ``flat[offsets[i]:offsets[i + 1]]`` reshaped to ``shapes[i]``. One flat array
(not a list of arrays) keeps combining members elementwise a single numpy operation and lets a
cache be memory-mapped from one file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np


class Ragged:
    """Cases ``(H_i, W_i[, C])`` stored as ``flat`` (sum of H_i * W_i rows[, C]) + ``shapes`` (N, 2)."""

    def __init__(self, flat: np.ndarray, shapes: np.ndarray | Sequence[Sequence[int]]):
        shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
        sizes = shapes[:, 0] * shapes[:, 1]
        offsets = np.zeros(len(shapes) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        if len(flat) != offsets[-1]:
            raise ValueError(f"flat array has {len(flat)} rows but the shapes need {offsets[-1]}")
        self.flat, self.shapes, self.offsets = flat, shapes, offsets

    @classmethod
    def from_list(cls, arrays: Sequence[np.ndarray], dtype=None) -> Ragged:
        """Concatenate (H_i, W_i[, C]) arrays (copied once)."""
        arrays = [np.asarray(a, dtype) for a in arrays]
        shapes = [a.shape[:2] for a in arrays]
        tail = arrays[0].shape[2:] if arrays else ()
        flat = (
            np.concatenate([a.reshape(-1, *tail) for a in arrays])
            if arrays
            else np.zeros((0, *tail), dtype or np.uint8)
        )
        return cls(flat, shapes)

    @classmethod
    def of(cls, cases) -> Ragged:
        """``cases`` as is if ragged; an (N, H, W[, C]) array or a list of arrays otherwise."""
        if isinstance(cases, Ragged):
            return cases
        if isinstance(cases, np.ndarray):
            n, h, w = cases.shape[:3]
            return cls(cases.reshape(n * h * w, *cases.shape[3:]), [(h, w)] * n)
        return cls.from_list(list(cases))

    def like(self, flat: np.ndarray) -> Ragged:
        """Another map with the same case shapes (e.g. a mask computed from these probabilities)."""
        return Ragged(flat, self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("ragged slices must be contiguous")
            return Ragged(self.flat[self.offsets[start] : self.offsets[stop]], self.shapes[start:stop])
        i = int(index)
        if i < 0:
            i += len(self)
        h, w = self.shapes[i]
        return self.flat[self.offsets[i] : self.offsets[i + 1]].reshape(int(h), int(w), *self.flat.shape[1:])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def map(self, fn: Callable[[np.ndarray], np.ndarray], dtype=None) -> Ragged:
        """Apply ``fn`` to every case (it must keep the case's height and width)."""
        out = np.empty((len(self.flat), *self.flat.shape[1:]), dtype or self.flat.dtype)
        result = Ragged(out, self.shapes)
        for i, case in enumerate(self):
            result[i][...] = fn(case)
        return result

    @property
    def n_pixels(self) -> int:
        return int(self.offsets[-1])

    def same_shapes(self, other: Ragged) -> bool:
        return np.array_equal(self.shapes, other.shapes)

    def stacked(self, counts: Sequence[int]) -> Ragged:
        """Consecutive cases joined into one, ``counts[j]`` at a time, each group's cases stacked
        along rows: a volume's slices (all of one size, in order) become one (n * h, w) case with the
        same flat array (no copy), so every count over a case is a count over the volume."""
        counts = [int(c) for c in counts]
        if sum(counts) != len(self) or any(c < 1 for c in counts):
            raise ValueError(f"groups of {sum(counts)} cases for {len(self)}")
        shapes, start = [], 0
        for count in counts:
            group = self.shapes[start : start + count]
            if not (group == group[0]).all():
                raise ValueError(f"cases {start}..{start + count - 1} differ in size; a volume's slices share one")
            shapes.append((int(group[0][0]) * count, int(group[0][1])))
            start += count
        return Ragged(self.flat, shapes)

    @classmethod
    def concatenated(cls, parts: Sequence[Ragged]) -> Ragged:
        """The cases of ``parts`` in order, as one Ragged (copied once)."""
        flat = np.concatenate([p.flat for p in parts]) if len(parts) > 1 else parts[0].flat
        return cls(flat, np.concatenate([p.shapes for p in parts]))


def per_case_count(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Number of true values of a flat boolean array within each case -> int64 (N,)."""
    return np.array([np.count_nonzero(flags[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)], np.int64)
