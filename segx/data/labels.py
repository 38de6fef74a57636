"""The structures a dataset names, named once (as nnU-Net's ``dataset.json`` ``labels``).

``data.labels`` maps class names to the mask values that mean them, ``{background: 0, tumour: 1,
oedema: 2}``; colour-coded masks (the sandstone tutorial's, CamVid's) are read through
``data.palette`` (class name -> ``[r, g, b]``), and ``data.ignore`` marks unannotated pixels
(a value, or a colour with a palette) that no loss, metric or search counts.

Internally a mask is a label map of class *indices*: ``uint8 (H, W)`` with ``0..K-1`` in the
order of the classes' values (background, the class of value 0, is always index 0) and
:data:`IGNORE_INDEX` (255) for ignored pixels. ``data.labels: null`` keeps segx's binary case
exactly as it was: one structure, a mask is ``value > data.mask_threshold`` (:class:`Threshold`).
:func:`mask_rule` gives either as the one *mask rule* that reading, checking and fingerprinting
data, and a member's head, ask (outputs, activation, how a file is read, the settings key), so
that they never ask which kind of task it is.

Nothing here knows whether a case is a 2D image or a volume: :meth:`Labels.encode` maps any
array of mask values, so a volume's label map goes through the same check.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from segx.errors import SegxError

IGNORE_INDEX = 255  # a label map's value for pixels no loss, metric or search counts
MAX_CLASSES = 64  # uint8 label maps with room for IGNORE_INDEX; K probability maps per member
# Class names that say which side of the body they are on (right_lung, left_kidney, lung_L,
# LeftLung, leftlung, lungright): a horizontal flip turns one into the other (see data.flip_swap).
_SEPARATOR = re.compile(r"[_\-\s]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Words that begin or end with left/right and say no side: 'bright' spots, a 'cleft', 'leftover'.
_NOT_SIDES = frozenset(
    "bright upright fright wright alright aright cleft copyright downright outright forthright birthright "
    "playwright shipwright wheelwright cartwright eyebright leftover leftovers lefty righteous rightful rightly".split()
)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def names_a_side(name: str) -> bool:
    """Whether a class name says left or right: a word ``left``/``right`` (``left_lung``,
    ``LeftLung``), a word that begins or ends with one (``leftlung``, ``lungright``), or ``l``/``r``
    between separators (``lung_L``, ``r-kidney``; not inside a word: ``liver``)."""
    for part in _SEPARATOR.split(name):
        if part.lower() in ("l", "r"):
            return True
        for word in _CAMEL.split(part):
            word = word.lower()
            if word in ("left", "right"):
                return True
            if word in _NOT_SIDES:
                continue
            if word.startswith(("left", "right")) and len(word) > 6:
                return True
            if (word.endswith("left") and len(word) >= 7) or (word.endswith("right") and len(word) >= 8):
                return True
    return False


@dataclass(frozen=True)
class Labels:
    """K named classes: ``names[i]`` is class index ``i``, stored in masks as ``values[i]``
    (a label map) or drawn in ``colours[i]`` (a colour-coded mask). ``ignore`` is the value (or
    colour) of unannotated pixels, or None."""

    names: tuple[str, ...]
    values: tuple[int, ...]
    colours: tuple[tuple[int, int, int], ...] | None = None
    ignore: int | tuple[int, int, int] | None = None
    # Overlapping regions (data.regions, nnU-Net's region-based training): (name, class indices
    # it unites), in decoding order; each region paints the one class it adds over later ones.
    regions: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    @property
    def n_outputs(self) -> int:
        """Output channels of a member: one sigmoid per region, else a K-way softmax."""
        return len(self.regions) if self.regions else self.n_classes

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.regions or ())

    @property
    def region_members(self) -> list[tuple[int, ...]]:
        """The class indices each region unites, in the regions' order (what region scores need)."""
        return [members for _, members in self.regions or ()]

    def paints(self) -> tuple[int, ...]:
        """The class each region writes when decoding (regions in order, later ones over earlier):
        the one class of the region that no later region holds."""
        out = []
        for r, (_, members) in enumerate(self.regions or ()):
            later = {c for _, m in (self.regions or ())[r + 1 :] for c in m}
            out.append(next(c for c in members if c not in later))
        return tuple(out)

    def region_masks(self, labels: np.ndarray) -> np.ndarray:
        """bool (..., R): for each region, whether a pixel's class is in it (ignored pixels: none)."""
        table = np.zeros((256, len(self.regions or ())), bool)
        for r, (_, members) in enumerate(self.regions or ()):
            table[list(members), r] = True
        return table[np.asarray(labels)]

    def decode_regions(self, on: np.ndarray) -> np.ndarray:
        """Class indices uint8 (...) from region decisions bool (..., R): background, then each
        region in order paints its class where it is on (a later region over an earlier one)."""
        out = np.zeros(on.shape[:-1], np.uint8)
        for r, paint in enumerate(self.paints()):
            out[on[..., r]] = paint
        return out

    @property
    def n_classes(self) -> int:
        return len(self.names)

    # -- as a mask rule (beside :class:`Threshold`) ------------------------------------------

    per_class = True  # class-wise checks apply (every class in some training case, per-class counts)
    config_key = "data.labels"  # the key that says how masks are read

    @property
    def labels(self) -> Labels:
        return self

    @property
    def activation(self) -> str:
        """A member's head: one sigmoid per region, else a K-way softmax."""
        return "sigmoid" if self.regions else "softmax"

    @property
    def decoding(self) -> Labels:
        """What the decoded cache and :func:`segx.data.folder.read_case` read masks with."""
        return self

    @property
    def fingerprint_settings(self) -> dict[str, str]:
        """The reading's part of :func:`segx.data.split.fingerprint_parts`' settings."""
        return {"labels": self.key}

    def read(self, path, max_pixels: int) -> np.ndarray:
        """A mask file as class indices ``uint8 (H, W)``."""
        from segx.data.io import read_label_map

        return read_label_map(path, self, max_pixels)

    @property
    def foreground(self) -> tuple[str, ...]:
        """Every class but background (index 0): the classes that are scored and averaged."""
        return self.names[1:]

    def index(self, name: str) -> int:
        if name not in self.names:
            from segx.errors import suggest

            raise SegxError(
                f"'{name}' is not a class of data.labels ({', '.join(self.names)}){suggest(name, self.names)}"
            )
        return self.names.index(name)

    def swap_table(self, pairs) -> np.ndarray | None:
        """``data.flip_swap`` (pairs of class names) as a 256-entry table of class indices that
        swaps each pair and keeps every other index (ignore included); None without pairs."""
        if not pairs:
            return None
        table = np.arange(256, dtype=np.uint8)
        seen: set[str] = set()
        for pair in pairs:
            if isinstance(pair, str) or len(pair) != 2:
                raise SegxError(
                    f"data.flip_swap: {pair!r} is not a pair of class names; write e.g. [[right_lung, left_lung]]"
                )
            for name in pair:
                if str(name) not in self.names:
                    from segx.errors import suggest

                    raise SegxError(
                        f"data.flip_swap names '{name}', not a class of data.labels ({', '.join(self.names)})"
                        f"{suggest(str(name), self.names)}"
                    )
                if self.names.index(str(name)) == 0:
                    raise SegxError(
                        f"data.flip_swap: {name} is the background (value 0), which a flip never swaps; pair only "
                        "classes that name a side, e.g. [[right_lung, left_lung]]"
                    )
                if str(name) in seen or pair[0] == pair[1]:
                    raise SegxError(f"data.flip_swap: class '{name}' is in more than one pair; swap each class once")
                seen.add(str(name))
            a, b = self.index(str(pair[0])), self.index(str(pair[1]))
            table[a], table[b] = b, a
        return table

    def output_swap(self, table: np.ndarray | None) -> list[int] | None:
        """The permutation of a member's outputs that a swap of classes (``table``, from
        :meth:`swap_table`) means: the classes' own for a softmax; for regions, each region to the
        region of the swapped classes, or None when some region has no such partner (flip TTA
        then cannot be undone, and is not offered)."""
        if table is None:
            return None
        if not self.regions:
            return [int(i) for i in table[: self.n_classes]]
        sets = [frozenset(m) for _, m in self.regions]
        out = []
        for members in sets:
            swapped = frozenset(int(table[c]) for c in members)
            if swapped not in sets:
                return None
            out.append(sets.index(swapped))
        return out

    def sided(self) -> list[str]:
        """Class names that say left or right (a horizontal flip would swap them)."""
        return [n for n in self.names if names_a_side(n)]

    @property
    def key(self) -> str:
        """A short, stable description for cache keys and fingerprints: two label definitions
        read the same masks to the same label maps iff their keys are equal."""
        return (
            "labels-"
            + hashlib.blake2b(json.dumps(self.to_record(), sort_keys=True).encode(), digest_size=8).hexdigest()
        )

    def to_record(self) -> dict:
        """Plain JSON: what a member's run and an ensemble's record say about the classes."""
        out: dict = {"names": list(self.names), "values": list(self.values)}
        if self.colours is not None:
            out["colours"] = [list(c) for c in self.colours]
        if self.ignore is not None:
            out["ignore"] = list(self.ignore) if isinstance(self.ignore, tuple) else int(self.ignore)
        if self.regions:
            out["regions"] = [[name, [self.names[c] for c in members]] for name, members in self.regions]
        return out

    @classmethod
    def from_record(cls, written: Mapping) -> Labels:
        """Labels from their JSON (:meth:`to_record`), as a member's run and an ensemble's record hold it."""
        colours = written.get("colours")
        ignore = written.get("ignore")
        names = tuple(str(n) for n in written["names"])
        regions = written.get("regions")
        return cls(
            names,
            tuple(int(v) for v in written["values"]),
            None if colours is None else tuple(tuple(int(x) for x in c) for c in colours),
            None if ignore is None else (tuple(int(x) for x in ignore) if isinstance(ignore, list) else int(ignore)),
            None if not regions else tuple((str(n), tuple(names.index(m) for m in ms)) for n, ms in regions),
        )

    @classmethod
    def from_config(cls, labels, palette=None, ignore=None, regions=None) -> Labels | None:
        """``data.labels``, ``data.palette`` and ``data.ignore`` (plain dicts and lists) checked, or
        None when ``labels`` is None (binary). Every problem is one line naming the key."""
        if labels is None:
            if palette is not None:
                raise SegxError("data.palette is set but data.labels is null; name the classes in data.labels too")
            if ignore is not None:
                raise SegxError("data.ignore is set but data.labels is null; name the classes in data.labels too")
            if regions:
                raise SegxError("data.regions is set but data.labels is null; name the classes in data.labels too")
            return None
        if not isinstance(labels, Mapping) or len(labels) < 2:
            raise SegxError(
                f"data.labels={labels!r} must name at least two classes with their mask values, e.g. "
                "data.labels='{background: 0, tumour: 1}'"
            )
        if len(labels) > MAX_CLASSES:
            raise SegxError(f"data.labels names {len(labels)} classes; segx supports at most {MAX_CLASSES}")
        items = []
        for name, value in labels.items():
            name = _text(name, "data.labels", "class", value)
            if not _NAME.match(name):
                raise SegxError(
                    f"data.labels: class name '{name}' must start with a letter and hold only letters, digits, "
                    "'_' and '-' (it becomes a metric name)"
                )
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise SegxError(f"data.labels.{name}={value!r} must be a mask value, an integer in 0..65535")
            items.append((int(value), name))
        values = [v for v, _ in items]
        if len(set(values)) != len(values):
            twice = next(v for v in values if values.count(v) > 1)
            names = [n for v, n in items if v == twice]
            raise SegxError(
                f"data.labels: {' and '.join(names)} share the value {twice}; give each class its own value"
            )
        if 0 not in values:
            raise SegxError(
                f"data.labels has no class of value 0; name the background, e.g. data.labels.background=0 "
                f"(values: {sorted(values)})"
            )
        items.sort()
        names, values = tuple(n for _, n in items), tuple(v for v, _ in items)
        colours = None if palette is None else _palette(palette, names)
        return cls(names, values, colours, _ignore(ignore, values, colours, names), _regions(regions, names))

    # -- reading masks ---------------------------------------------------------------------

    def encode(self, raw: np.ndarray, where: str) -> np.ndarray:
        """Mask values (``(..., )`` integers; ``(..., 3)`` RGB with a palette) as class indices
        ``uint8``, :data:`IGNORE_INDEX` for ignored pixels. A value or colour no class names is
        one line naming ``where``, the values and the key to fix."""
        if self.colours is not None:
            return self._encode_colours(raw, where)
        raw = np.asarray(raw)
        if raw.dtype.kind == "f":
            if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
                raise SegxError(
                    f"{where}: a label map must hold whole numbers, this one holds fractions; save it as 8- or 16-bit integers"
                )
            raw = raw.astype(np.int64)
        lookup_size = 65536 if raw.dtype.itemsize > 1 else 256
        if raw.size and (raw.min() < 0 or raw.max() >= lookup_size):
            raise SegxError(f"{where}: mask values outside 0..65535; save the label map as 8- or 16-bit integers")
        table = np.full(lookup_size, 254, np.uint16)  # 254: not named (MAX_CLASSES < 254)
        for i, v in enumerate(self.values):
            if v < lookup_size:
                table[v] = i
        if self.ignore is not None and int(self.ignore) < lookup_size:
            table[int(self.ignore)] = IGNORE_INDEX
        out = table[raw.astype(np.intp, copy=False)].astype(np.uint8)
        stray = out == 254
        if stray.any():
            values, counts = np.unique(raw[stray], return_counts=True)
            shown = ", ".join(f"{int(v)} ({int(c)} px)" for v, c in list(zip(values, counts, strict=True))[:6])
            more = f" and {len(values) - 6} more" if len(values) > 6 else ""
            hint = (
                " (in-between values: anti-aliased or resized edges? save label maps without smoothing, "
                "with nearest-neighbour resizing)"
                if len(values) > 2 or any(min(self.values) < v < max(self.values) for v in values)
                else ""
            )
            raise SegxError(
                f"{where}: mask value(s) {shown}{more} are not in data.labels "
                f"({', '.join(f'{n}={v}' for n, v in zip(self.names, self.values, strict=True))}){hint}; "
                "add them to data.labels, or set data.ignore to the value of unannotated pixels"
            )
        return out

    def _encode_colours(self, raw: np.ndarray, where: str) -> np.ndarray:
        raw = np.asarray(raw)
        if raw.ndim < 3 or raw.shape[-1] != 3 or raw.dtype != np.uint8:
            raise SegxError(
                f"{where}: data.palette needs 8-bit RGB masks, this one is {raw.dtype} of shape {raw.shape}; "
                "save it as an RGB PNG, or describe a label map with data.labels alone"
            )
        code = (raw[..., 0].astype(np.int32) << 16) | (raw[..., 1].astype(np.int32) << 8) | raw[..., 2]
        out = np.full(code.shape, 254, np.uint8)
        for i, (r, g, b) in enumerate(self.colours or ()):
            out[code == (r << 16 | g << 8 | b)] = i
        if self.ignore is not None:
            r, g, b = self.ignore  # type: ignore[misc]
            out[code == (r << 16 | g << 8 | b)] = IGNORE_INDEX
        stray = out == 254
        if stray.any():
            colours, counts = np.unique(code[stray], return_counts=True)
            shown = ", ".join(
                f"[{c >> 16}, {(c >> 8) & 255}, {c & 255}] ({int(n)} px)"
                for c, n in list(zip(colours, counts, strict=True))[:4]
            )
            more = f" and {len(colours) - 4} more" if len(colours) > 4 else ""
            raise SegxError(
                f"{where}: colour(s) {shown}{more} are not in data.palette; add them to data.palette "
                "(or data.ignore), or save the masks without anti-aliasing"
            )
        return out

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """Class indices back to the user's own encoding: mask values (uint8, or uint16 when a
        value exceeds 255) or, with a palette, RGB colours ``uint8 (..., 3)``."""
        indices = np.asarray(indices)
        if self.colours is not None:
            table = np.zeros((256, 3), np.uint8)
            table[: self.n_classes] = np.asarray(self.colours, np.uint8)
            return table[indices]
        dtype = np.uint8 if max(self.values) <= 255 else np.uint16
        table = np.zeros(256, dtype)
        table[: self.n_classes] = np.asarray(self.values, dtype)
        return table[indices]


@dataclass(frozen=True)
class Threshold:
    """One structure (``data.labels: null``): a mask value above ``value`` is foreground. The mask
    rule beside :class:`Labels`, with the same few methods, so that reading, checking and
    fingerprinting data never ask which kind it is (:func:`mask_rule` builds either)."""

    value: float = 0.0

    labels = None  # no classes named
    names = ()
    n_outputs = 1  # one sigmoid
    activation = "sigmoid"
    per_class = False
    config_key = "data.mask_threshold"

    @property
    def decoding(self) -> float:
        return float(self.value)

    @property
    def fingerprint_settings(self) -> dict[str, float]:
        return {"mask_threshold": float(self.value)}

    def read(self, path, max_pixels: int) -> np.ndarray:
        """A mask file as ``uint8 (H, W)`` in {0, 1}."""
        from segx.data.io import read_mask

        return read_mask(path, self.value, max_pixels)

    def swap_table(self, pairs) -> None:
        """No classes, nothing to swap: ``data.flip_swap`` refused in one line when set."""
        if pairs:
            raise SegxError("data.flip_swap is set but data.labels is null; name the classes in data.labels")
        return None

    def sided(self) -> list[str]:
        return []


def mask_rule(labels: Labels | None, threshold: float = 0.0) -> Labels | Threshold:
    """How masks are read: ``labels`` (several classes or regions), or, without them, one
    structure at ``threshold`` (``data.mask_threshold``)."""
    return Threshold(float(threshold)) if labels is None else labels


def difference(a: Mapping | None, b: Mapping | None) -> str:
    """What differs between two label records (:meth:`Labels.to_record`; None: one structure),
    in words a user can act on: 'classes background, a vs background, b', 'regions whole, core vs
    one softmax over the classes'. '' when they read masks alike."""

    def kind(r):
        if r is None:
            return "one structure (data.labels null)"
        if r.get("regions"):
            return f"regions {', '.join(n for n, _ in r['regions'])}"
        return "one softmax over the classes"

    if a is None or b is None:
        if a is b:
            return ""
        return f"{kind(a) if a is None else 'classes ' + ', '.join(a['names'])} vs " + (
            kind(b) if b is None else "classes " + ", ".join(b["names"])
        )
    out = []
    if list(a["names"]) != list(b["names"]):
        out.append(f"classes {', '.join(a['names'])} vs {', '.join(b['names'])}")
    elif list(a["values"]) != list(b["values"]):
        shown = lambda r: ", ".join(f"{n}={v}" for n, v in zip(r["names"], r["values"], strict=True))  # noqa: E731
        out.append(f"mask values {shown(a)} vs {shown(b)}")
    if [list(map(str, x)) for x in a.get("regions") or []] != [list(map(str, x)) for x in b.get("regions") or []]:
        regions = lambda r: "; ".join(f"{n}: {', '.join(m)}" for n, m in r["regions"])  # noqa: E731
        same_names = [n for n, _ in a.get("regions") or []] == [n for n, _ in b.get("regions") or []]
        if a.get("regions") and b.get("regions") and same_names:
            out.append(f"regions {regions(a)} vs {regions(b)}")
        else:
            out.append(f"{kind(a)} vs {kind(b)}")
    for key, what in (("colours", "data.palette"), ("ignore", "data.ignore")):
        if a.get(key) != b.get(key):
            out.append(f"{what} {a.get(key)} vs {b.get(key)}")
    return "; ".join(out)


def check_class_weights(weights, labels: Labels | None) -> list[float] | None:
    """``trainer.class_weights`` (None, or one non-negative factor per class of ``labels``,
    background first, not all zero on the foreground) as plain floats; one line otherwise."""
    if weights is None:
        return None
    if labels is None or labels.regions:
        what = "data.labels is null (one structure)" if labels is None else "data.regions trains one sigmoid per region"
        raise SegxError(
            f"trainer.class_weights is set but {what}: nothing would use it; set trainer.class_weights=null"
        )
    items = list(weights) if isinstance(weights, Sequence) and not isinstance(weights, str) else [weights]
    ok = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in items)
    values = [float(w) for w in items] if ok else []
    good = ok and len(values) == labels.n_classes and all(0 <= w < float("inf") for w in values)
    if not good or not sum(values[1:]) > 0:
        shown = ", ".join(f"{w:g}" for w in values) if ok else ", ".join(map(str, items))
        raise SegxError(
            f"trainer.class_weights=[{shown}] must give {labels.n_classes} non-negative factors, one per class of "
            f"data.labels ({', '.join(labels.names)}), not all zero on the foreground"
        )
    return values


def _palette(palette, names: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(palette, Mapping):
        raise SegxError(f"data.palette={palette!r} must map class names to colours, e.g. '{{background: [0, 0, 0]}}'")
    unknown = [str(n) for n in palette if str(n) not in names]
    if unknown:
        from segx.errors import suggest

        raise SegxError(
            f"data.palette.{unknown[0]} is not a class of data.labels ({', '.join(names)}){suggest(unknown[0], names)}"
        )
    missing = [n for n in names if n not in palette]
    if missing:
        raise SegxError(f"data.palette has no colour for {missing[0]}; give every class of data.labels a colour")
    out = []
    for name in names:
        out.append(_colour(palette[name], f"data.palette.{name}"))
    if len(set(out)) != len(out):
        raise SegxError("data.palette: two classes share a colour; give each class its own")
    return tuple(out)


def _colour(value, key: str) -> tuple[int, int, int]:
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 3
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in value)
    )
    if not ok:
        raise SegxError(f"{key}={value!r} must be an RGB colour [r, g, b] with 0..255 each")
    return (int(value[0]), int(value[1]), int(value[2]))


def _ignore(ignore, values: Sequence[int], colours, names: Sequence[str]):
    if ignore is None:
        return None
    if colours is not None:
        colour = _colour(ignore, "data.ignore")
        if colour in colours:
            name = names[colours.index(colour)]
            raise SegxError(
                f"data.ignore={list(colour)} is also the colour of class {name}; give unannotated pixels their own colour"
            )
        return colour
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 <= ignore <= 65535:
        raise SegxError(f"data.ignore={ignore!r} must be the mask value of unannotated pixels (0..65535) or null")
    if ignore in values:
        name = names[list(values).index(ignore)]
        raise SegxError(f"data.ignore={ignore} is also the value of class {name} in data.labels; use another value")
    return int(ignore)


def _regions(regions, names: Sequence[str]):
    """``data.regions`` (region name -> list of class names, in decoding order) checked."""
    if not regions:
        return None
    if not isinstance(regions, Mapping):
        raise SegxError(
            f"data.regions={regions!r} must map region names to lists of classes, e.g. "
            "'{whole: [oedema, core, enhancing], core: [core, enhancing], enhancing: [enhancing]}'"
        )
    out = []
    for region, members in regions.items():
        region = _text(region, "data.regions", "region", members)
        if not _NAME.match(region):
            raise SegxError(f"data.regions: region name '{region}' must start with a letter (it becomes a metric name)")
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise SegxError(
                f"data.regions.{region}={members!r} must list the classes it unites, e.g. [core, enhancing]"
            )
        indices = []
        for name in members:
            if str(name) not in names:
                from segx.errors import suggest

                raise SegxError(
                    f"data.regions.{region} names '{name}', not a class of data.labels ({', '.join(names)})"
                    f"{suggest(str(name), names)}"
                )
            if names.index(str(name)) == 0:
                raise SegxError(
                    f"data.regions.{region} holds the background ({name}); regions unite foreground classes"
                )
            indices.append(names.index(str(name)))
        out.append((region, tuple(sorted(set(indices)))))
    for r, (region, members) in enumerate(out):
        later = {c for _, m in out[r + 1 :] for c in m}
        adds = [names[c] for c in members if c not in later]
        if len(adds) != 1:
            raise SegxError(
                f"data.regions: {region} adds {len(adds)} classes over the regions after it "
                f"({', '.join(adds) or 'none'}); order the regions from the largest to the smallest, each adding one "
                "class (e.g. whole, core, enhancing), so that the label map can be decoded"
            )
    covered = {c for _, members in out for c in members}
    lost = [name for c, name in enumerate(names) if c and c not in covered]
    if lost:
        raise SegxError(
            f"data.regions: class {lost[0]} is in no region, so no prediction can ever paint it; add it to the "
            f"regions that contain it (at least a last region: data.regions.{lost[0]}=[{lost[0]}])"
        )
    return tuple(out)


def _text(name, key: str, what: str, value) -> str:
    """A name from YAML as text, or one line: YAML 1.1 reads unquoted yes, no, on, off, true and
    false as booleans (two of them then become one key) and null as no name at all."""
    if not isinstance(name, bool) and name is not None:
        return str(name)
    example = {True: "yes", False: "no", None: "none"}[name]
    raise SegxError(
        f"{key}: {what} name {name} is not a name (YAML reads unquoted yes, no, on, off, true, false as "
        f"booleans and null as nothing); quote it in the YAML, e.g. '{example}': {value!r}"
    )
