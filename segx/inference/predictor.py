"""A rebuilt ensemble that predicts masks: used by ``segx.predict`` and the MLflow pyfunc model.

Each member predicts every image at the image's own size, the way it was trained to see it
(:mod:`segx.inference.view`: resized, or a sliding window over patches); its probabilities are
quantised and combined with the record's integer weights in the arithmetic the weight search
scored (:func:`segx.ensembling.probs.combine`, :func:`segx.ensembling.probs.binarize`), and
post-processed, all at the image's own size: exactly what the members cached for the search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segx.data.ragged import Ragged
from segx.ensembling.probs import Score, argmax_labels, binarize, combine, fold_mean, quantize
from segx.ensembling.record import EnsembleRecord
from segx.errors import SegxError
from segx.inference.view import View, predict_cases
from segx.scoring.postprocess import PostProcess, apply, apply_classes

# segx.models (TensorFlow) is imported where a network is loaded or run, not here: an exported
# ensemble (segx.inference.export_runtime) reuses this arithmetic on ONNX Runtime without TensorFlow.


@dataclass
class Prediction:
    """mask: bool (H, W); probability: float32 (H, W) ensemble score in [0, 1];
    uncertainty: float32 (H, W), weighted std of member probabilities in [0, 0.5].
    Several classes: mask is the label map of class indices, uint8 (H, W); probability the mean
    class probabilities (H, W, K); uncertainty their normalised entropy in [0, 1]."""

    mask: np.ndarray
    probability: np.ndarray
    uncertainty: np.ndarray


def class_postprocess(record: EnsembleRecord) -> dict[int, PostProcess]:
    """A multi-class record's per-class post-processing, by class index (empty: none)."""
    if record.labels is None:
        return {}
    return {record.labels.index(name): p for name, p in record.class_postprocess.items()}


def member_probs(
    model, backbone: str, view: View, images: Sequence[np.ndarray], modes: Sequence[str], swap=None
) -> dict[str, Ragged]:
    """``{tta mode: uint8 probabilities}`` of one member for ``images``, at each image's own size:
    what a member caches for the search and what the ensemble predicts with (``swap``: the class
    permutation of data.flip_swap for flip TTA's mirrored passes)."""
    from segx.models import predict_probs_modes

    out: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    for maps in predict_cases(images, view, lambda batch: predict_probs_modes(model, batch, backbone, modes, swap)):
        for mode in modes:
            out[mode].append(quantize(maps[mode]))
    return {mode: Ragged.from_list(maps, np.uint8) for mode, maps in out.items()}


class EnsemblePredictor:
    """``model_paths``: per member, its model folder, or a list of folders (one per fold) for a
    cross-validated member, which predicts as the integer-rounded mean of its fold models
    (:func:`segx.ensembling.probs.fold_mean`), as its cached test probabilities were computed.

    ``fused``: the networks that see an image the same way (same view) run together, one
    compiled function per view (:class:`segx.models.NetworkGroup`), each image resized once for
    all of them; False runs each network on its own, as a member does when it caches its
    probabilities. Both give the same numbers, bit for bit."""

    def __init__(
        self,
        record: EnsembleRecord,
        model_paths: Sequence,
        tta: str | None = None,
        fused: bool = True,
        threshold: float | None = None,
    ):
        self.record = record
        if len(model_paths) != len(record.members):
            raise ValueError("one model path per member")
        self.members = record.members
        self.views = record.views
        self.weights = record.weights  # exact counts over a denominator
        # Several classes: labelled by argmax (no threshold); masks written in the user's encoding.
        self.labels = record.labels
        self.class_post = class_postprocess(record)
        self.swap = None if record.flip_swap is None else list(record.flip_swap)
        if self.labels is not None:
            if threshold is not None and self.labels.regions:
                chosen = record.region_thresholds
                shown = ", ".join(f"{r}={float(chosen[r]):g}" for r in self.labels.region_names if r in chosen)
                raise SegxError(
                    f"threshold={threshold} but this ensemble segments {len(self.labels.regions)} regions "
                    f"({', '.join(self.labels.region_names)}), each at its own threshold chosen on validation"
                    f"{f' ({shown})' if shown else ''}; drop the threshold override"
                )
            if threshold is not None:
                raise SegxError(
                    f"threshold={threshold} but this ensemble segments {self.labels.n_classes} classes "
                    f"({', '.join(self.labels.names)}), labelled by argmax; drop the threshold override"
                )
            self.threshold = None
            # Regions: one threshold each (chosen on validation), decoded into the label map in order.
            region = record.region_thresholds
            self.region_thresholds = (
                [float(region[r]) for r in self.labels.region_names] if self.labels.regions else None
            )
        else:
            self.threshold = float(record.threshold if threshold is None else threshold)
        self.post = record.postprocess
        self.tta = tta or record.tta
        from segx.models import NetworkGroup, load_member

        # Members with weight 0 cannot change the output: skip loading and running them.
        self.models = [
            None if k == 0 else [load_member(f) for f in p] if isinstance(p, (list, tuple)) else load_member(p)
            for p, k in zip(model_paths, self.weights.counts, strict=True)
        ]
        # Every network to run, as (member index, model), grouped by the view it needs.
        self.networks: dict[View, list[tuple[int, object]]] = {}
        for i, (model, view) in enumerate(zip(self.models, self.views, strict=True)):
            for network in [] if model is None else model if isinstance(model, list) else [model]:
                self.networks.setdefault(view, []).append((i, network))
        self.groups = (
            {
                view: NetworkGroup([n for _, n in nets], [self.members[i].backbone for i, _ in nets])
                for view, nets in self.networks.items()
            }
            if fused
            else None
        )

    def member_probs(self, images: Sequence[np.ndarray]) -> list[Ragged | None]:
        """uint8 probabilities per member at each image's own size (None for weight 0)."""
        per_network: dict[int, list[Ragged]] = {}  # member index -> one Ragged per network (fold)
        for view, nets in self.networks.items():
            if self.groups is None:
                results = [
                    member_probs(n, self.members[i].backbone, view, images, (self.tta,), self.swap)[self.tta]
                    for i, n in nets
                ]
            else:
                results = self._group_probs(self.groups[view], view, images)
            for (i, _), probs in zip(nets, results, strict=True):
                per_network.setdefault(i, []).append(probs)
        return [
            None if model is None else fold_mean(per_network[i]) if isinstance(model, list) else per_network[i][0]
            for i, model in enumerate(self.models)
        ]

    def _group_probs(self, group, view: View, images: Sequence[np.ndarray]) -> list[Ragged]:
        """:func:`member_probs` of every network of ``group`` at once (keys: network index)."""

        def predict(batch):
            return dict(enumerate(m[self.tta] for m in group.probs_modes(batch, (self.tta,), self.swap)))

        maps: list[list[np.ndarray]] = [[] for _ in group.models]
        for case in predict_cases(images, view, predict):
            for j, probs in case.items():
                maps[j].append(quantize(probs))
        return [Ragged.from_list(m, np.uint8) for m in maps]

    def score(self, images: Sequence[np.ndarray]) -> tuple[Score, list]:
        """Exact ensemble score (ragged, :class:`segx.ensembling.probs.Score`) and the member probabilities."""
        probs = self.member_probs(images)
        shapes = next(p for p in probs if p is not None)
        # Members with count 0 add nothing: all members, with their counts, give the same sum.
        filled = [shapes.like(np.zeros(shapes.flat.shape, np.uint8)) if p is None else p for p in probs]
        return combine(filled, self.weights), probs

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict uint8 RGB images of any size (H, W, 3); grayscale (H, W) is accepted too."""
        images = [np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im[:, :, :3] for im in images]
        images = [np.asarray(im, np.uint8) for im in images]
        score, probs = self.score(images)
        if self.labels is not None:
            return self._predict_classes(score, probs, len(images))
        masks = apply(binarize(score, self.threshold), self.post)
        # Maps for people (not masks): the exact mean score / (255 D) and the weighted spread.
        mean = score.probability()
        used = [
            (p.flat.astype(np.float32) / 255.0, w)
            for p, w in zip(probs, self.weights.floats, strict=True)
            if p is not None
        ]
        spread = mean.like(np.sqrt(sum(w * (p - mean.flat) ** 2 for p, w in used)).astype(np.float32))
        return [
            Prediction(mask=masks[i].copy(), probability=np.clip(mean[i], 0, 1), uncertainty=np.clip(spread[i], 0, 0.5))
            for i in range(len(images))
        ]

    def _predict_classes(self, score: Score, probs, n: int) -> list[Prediction]:
        """Several classes: the label map (argmax of the exact class scores, ties to the lowest
        index: the search's labels), the mean class probabilities, and their normalised entropy
        as the uncertainty (0: one class certain, 1: every class equally likely)."""
        mean = score.probability()
        if self.labels.regions:  # regions: each at its threshold, painted in order; binary entropy
            on = np.zeros(score.values.flat.shape, bool)
            for r, t in enumerate(self.region_thresholds):
                part = Score(score.values.like(np.ascontiguousarray(score.values.flat[:, r])), score.denominator)
                on[:, r] = binarize(part, t).flat
            labels = mean.like(self.labels.decode_regions(on))
            # Bounds float32 can hold (1 - 1e-12 is 1.0 in float32: a certain region's 0 * log2(0) was NaN).
            p = np.clip(mean.flat, np.float32(1e-12), np.nextafter(np.float32(1), np.float32(0)))
            bits = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
            entropy = mean.like(bits.max(axis=-1).astype(np.float32))
        else:
            labels = apply_classes(argmax_labels(score), self.class_post)
            k = mean.flat.shape[-1]
            p = np.clip(mean.flat, 1e-12, 1.0)
            entropy = mean.like((-(p * np.log(p)).sum(axis=-1) / np.log(k)).astype(np.float32))
        return [
            Prediction(mask=labels[i].copy(), probability=np.clip(mean[i], 0, 1), uncertainty=np.clip(entropy[i], 0, 1))
            for i in range(n)
        ]
