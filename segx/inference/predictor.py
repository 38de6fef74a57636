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
from segx.ensembling.probs import Score, combine, fold_mean, quantize
from segx.ensembling.record import EnsembleRecord
from segx.ensembling.task import task_for
from segx.inference.view import View, predict_cases

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
        # The kind of ensemble (one structure, several classes, regions) decides how its score
        # becomes the label map; masks are written in the user's encoding.
        self.task = task_for(record.labels)
        self.labels = record.labels
        self.swap = None if record.flip_swap is None else list(record.flip_swap)
        self.threshold = self.task.prediction_threshold(record, threshold)
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

    def predict_slices(self, images: Sequence[np.ndarray], batch_size: int) -> Prediction:
        """A volume's slices (uint8 (h, w, 3), one size, in order), each seen by the members as a
        2D image, ``batch_size`` at a time, then decided as *one* case: stacked along rows, as the
        members cached the volume for the search (:meth:`segx.data.ragged.Ragged.stacked`), so the
        label map, threshold and post-processing are the search's. Returns the volume's maps
        stacked, (n * h, w[, K]); the members' uint8 probabilities of the whole volume are held."""
        images = [np.asarray(im, np.uint8) for im in images]
        parts = [self.member_probs(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
        probs = [
            None if parts[0][m] is None else Ragged.concatenated([p[m] for p in parts]).stacked([len(images)])
            for m in range(len(self.models))
        ]
        shapes = next(p for p in probs if p is not None)
        filled = [shapes.like(np.zeros(shapes.flat.shape, np.uint8)) if p is None else p for p in probs]
        score = combine(filled, self.weights)
        masks = self.task.label_maps(score, self.record, self.threshold)
        mean, uncertainty, bound = self.task.confidence(score, probs, self.weights)
        return Prediction(
            mask=masks[0].copy(), probability=np.clip(mean[0], 0, 1), uncertainty=np.clip(uncertainty[0], 0, bound)
        )

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict uint8 RGB images of any size (H, W, 3); grayscale (H, W) is accepted too."""
        images = [np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im[:, :, :3] for im in images]
        images = [np.asarray(im, np.uint8) for im in images]
        score, probs = self.score(images)
        masks = self.task.label_maps(score, self.record, self.threshold)
        # Maps for people (not masks): the mean probabilities and how uncertain they are.
        mean, uncertainty, bound = self.task.confidence(score, probs, self.weights)
        return [
            Prediction(
                mask=masks[i].copy(), probability=np.clip(mean[i], 0, 1), uncertainty=np.clip(uncertainty[i], 0, bound)
            )
            for i in range(len(images))
        ]
