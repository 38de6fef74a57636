"""What kind of segmentation a member makes: one structure (binary), several classes, or
overlapping regions. numpy only.

Each kind is one object of one protocol, modelled on nnU-Net's ``LabelManager``: the member's
head, how the ensemble search compacts and scores the members' probabilities, how a weighting
becomes the label map the user's file holds (a threshold, an argmax, regions decoded in order),
and how that map is scored and post-processed. The stages call these methods and never ask
which kind they hold: the kind branches live here, in :func:`task_for`, and nowhere else.

The kind of *case* (a 2D image today, a volume later) is a separate axis: a task maps
probabilities to label maps pixel by pixel and scores label maps case by case, whatever shape
a case has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segx.data.labels import Labels

# A method of the test table: what it is called, the label maps (or masks) it predicts, and the
# threshold column's value for it.
Method = tuple[str, Callable[[], Any], Any]


@dataclass(frozen=True)
class Finish:
    """What a task adds to the chosen weighting on validation: its score through the prediction
    path, its decision (threshold, none, or a threshold per region), the post-processing kept,
    and the majority vote's score (a baseline)."""

    val_dice: float
    majority_val_dice: float
    postprocess: Any = None  # segx.scoring.postprocess.PostProcess: one structure
    postprocess_results: list = field(default_factory=list)
    class_postprocess: dict = field(default_factory=dict)  # class name -> PostProcess
    class_postprocess_results: list = field(default_factory=list)  # (class, candidate, class Dice)
    region_thresholds: dict = field(default_factory=dict)  # region name -> threshold


@dataclass(frozen=True)
class GraphDecision:
    """How an exported graph turns the exact integer score into its ``mask`` output, as plain
    numbers: one structure's cut (``score >= cut``), or the argmax, or each region's (cut, class
    painted) in order; and the data's own mask values the class indices are written in."""

    threshold_cut: int | None = None
    region_cuts: tuple[tuple[int, int], ...] | None = None
    values: tuple[int, ...] | None = None


class Task(ABC):
    """One kind of segmentation. ``labels`` is None for one structure."""

    kind: str
    labels: Labels | None = None
    # One threshold decides (binary): a member alone is deployed at the threshold validation
    # chose for it, and the tables carry it. Several classes (argmax) and regions (a threshold
    # each) have none of one number.
    one_threshold: bool = True
    dice_axis: str = "validation Dice (whole images, own size)"

    # --- the member -----------------------------------------------------------------------
    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Output channels of a member's network."""

    @property
    def activation(self) -> str:
        return "sigmoid"

    @property
    def n_classes(self) -> int:
        """The classes a label map holds, background included (patch sampling balances them)."""
        return 2

    @property
    def region_members(self) -> tuple[tuple[int, ...], ...] | None:
        """Regions: the class indices each unites (the loss and the validation Dice need them)."""
        return None

    # --- the search on validation ------------------------------------------------------------
    @abstractmethod
    def search_stage(self, method: str, n_members: int, n_cases: int) -> str:
        """The progress line of the search."""

    @abstractmethod
    def compact(self, probs: Sequence, truth, thresholds: Sequence[float]):
        """The members' probabilities reduced to what the search needs (its ``evaluate``)."""

    def rescore(self, probs: Sequence, truth, candidates: Sequence, data, thresholds: Sequence[float]) -> dict:
        """Candidates rescored where the search's objective is not yet the file's: {id: decision}."""
        return {}

    @abstractmethod
    def finish(self, probs: Sequence, truth, chosen, decision, settings) -> Finish:
        """The chosen weighting scored through the prediction path, and its post-processing."""

    # --- the test split -----------------------------------------------------------------------
    @abstractmethod
    def test_methods(self, probs: Sequence, names: Sequence[str], record) -> list[Method]:
        """Each member (``names``), equal weights, majority vote and the ensemble ``record``
        (:class:`~segx.ensembling.record.EnsembleRecord`: its weights and decision), as label maps."""

    @abstractmethod
    def member_label_maps(self, probs):
        """One member's label maps (or masks) from its uint8 probabilities, alone: at 0.5, or by argmax."""

    @abstractmethod
    def case_metrics(self, pred, truth, spacing=None, with_hd95: bool = True) -> dict[str, np.ndarray]:
        """Per-case scores of label maps (Dice, IoU, HD95, and per class where there are classes)."""

    def final_metrics(self, role: str, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """A member's whole-split scores as MLflow metrics (``val/dice``, ...): the keys the
        ensemble logs its own under too (one chart for all)."""
        from segx import metric_keys as keys

        return {keys.final(role, k): float(v.mean()) for k, v in scores.items()}

    @property
    def truth_dtype(self) -> type:
        """The dtype of the ground truth the scores read: bool masks, or uint8 label maps."""
        return bool

    def epoch_scores(self, probs: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
        """(Dice, IoU) of a training epoch's validation: float probabilities (N, H, W[, C]) of
        the network at its own size against its masks, the learning curve (not the final score)."""
        from segx.scoring.metrics import dice_per_case, iou_per_case

        pred = probs >= 0.5
        return float(dice_per_case(pred, masks).mean()), float(iou_per_case(pred, masks).mean())

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The classes (background first) where the files are label maps; None for masks."""
        return None

    @property
    def region_names(self) -> tuple[str, ...] | None:
        """The regions, in decoding order, where members output one sigmoid each; else None."""
        return None

    @property
    def member_rule(self) -> str:
        """How a member alone makes its label map, in words (figure titles)."""
        return "threshold 0.5"

    @property
    def probability_planes(self) -> tuple[tuple[int, str], ...] | None:
        """The probability maps prediction writes per case, as (output channel, name): one per
        foreground class, or per region (its own sigmoid); None: one map, the case's own file."""
        return None

    def describe(self, record) -> tuple[str, str]:
        """(how the ensemble ``record`` makes a label map, its post-processing), in words."""
        return f"threshold: {record.threshold}", record.postprocess.describe()

    def decision_words(self, candidate) -> str:
        """How a search candidate makes its label map, for the search plot's legend."""
        return f"threshold {candidate.threshold}"

    # --- prediction ---------------------------------------------------------------------------
    def prediction_threshold(self, record, override: float | None) -> float | None:
        """The threshold prediction applies: the record's, or ``override`` where one threshold
        decides (refused in one line otherwise)."""
        return float(record.threshold if override is None else override)

    def label_maps(self, score, record, threshold: float | None):
        """The files' content from the exact ensemble ``score`` (:class:`~segx.ensembling.probs.Score`):
        bool masks, post-processed as the record says."""
        from segx.ensembling.probs import binarize
        from segx.scoring.postprocess import apply

        return apply(binarize(score, threshold), record.postprocess)

    def graph_decision(self, record) -> GraphDecision:
        """The decision of the ensemble ``record`` for an exported graph (its exact cut)."""
        from segx.ensembling.probs import cut

        return GraphDecision(threshold_cut=cut(float(record.threshold), record.weights.denominator))

    @property
    def label_names(self) -> tuple[str, ...]:
        """The names of a label map's values, background first (what a per-class table lists)."""
        return ("background", "foreground")

    def encode(self, label_map: np.ndarray) -> np.ndarray:
        """One case's label map in the data's own encoding, as a served request returns it:
        0/1 uint8 for one structure, the mask values (or palette colours) of data.labels else."""
        return label_map.astype(np.uint8)

    def confidence(self, score, probs: Sequence, weights):
        """Maps for people, not masks: (probability, uncertainty, the uncertainty's upper bound).
        One structure: the exact mean score / (255 D), and the members' weighted spread (std, at
        most 0.5); ``probs`` holds None for a member of weight 0."""
        mean = score.probability()
        used = [
            (p.flat.astype(np.float32) / 255.0, w) for p, w in zip(probs, weights.floats, strict=True) if p is not None
        ]
        spread = mean.like(np.sqrt(sum(w * (p - mean.flat) ** 2 for p, w in used)).astype(np.float32))
        return mean, spread, 0.5

    def run_summary(self, record, n_members: int, search: str) -> str:
        """The first paragraph of the ensemble run's description: what was chosen, how it is scored."""
        return (
            f"segx ensemble of {n_members} members, chosen on validation by {search} search; threshold "
            f"{record.threshold}, post-processing {record.postprocess.describe()}. Validation: members at their "
            "own chosen threshold; test: members at 0.5, the ensemble at its threshold; every score on whole images "
            "at their own size."
        )

    # --- what the runs and records say about the kind ---------------------------------------
    @property
    def record_version(self) -> int:
        """The format version of the ensemble record this kind writes (:mod:`segx.ensembling.record`):
        3 for one structure, which every segx since 0.2 reads."""
        from segx.ensembling.record import RECORD_VERSION

        return RECORD_VERSION

    def labels_record(self, flip_swap=None, no_flip_tta: bool = False) -> dict | None:
        """What a member's run (its labels tag, its logged model's info) and an ensemble's record
        say about the classes (their ``labels``): None for one structure, which names none."""
        return None

    def flip_outputs(self, swap) -> tuple[list[int] | None, bool]:
        """(the permutation of a member's outputs under a horizontal flip, whether flip TTA cannot
        be undone) for data.flip_swap's table ``swap`` (:meth:`Labels.swap_table`): one structure
        has no classes to swap."""
        return None, False

    @property
    def sided(self) -> list[str]:
        """The class names that say left or right (a horizontal flip swaps them): none here."""
        return []

    @property
    def palette(self) -> tuple | None:
        """The classes' colours in the data (data.palette), for figures; None: segx's own colours."""
        return None

    def run_params(self) -> dict[str, str]:
        """What the kind adds to an ensemble run's ``chosen.*`` params (segx.info reads them back)."""
        return {}


class BinaryTask(Task):
    """One structure: a sigmoid, the weighted mean at a threshold, one post-processing."""

    kind = "binary"

    @property
    def n_outputs(self) -> int:
        return 1

    def search_stage(self, method: str, n_members: int, n_cases: int) -> str:
        return f"searching weights and threshold on validation ({method}, {n_members} members, {n_cases} cases)"

    def compact(self, probs, truth, thresholds):
        from segx.ensembling.search import compact

        return compact(probs, truth, list(thresholds))

    def finish(self, probs, truth, chosen, decision, settings) -> Finish:
        from segx.ensembling import search
        from segx.progress import stage
        from segx.scoring.postprocess import PostProcess

        val_dice = float(search.exact_dice(probs, truth, chosen.weights, chosen.threshold).mean())
        post, post_results = PostProcess(), []
        if settings.postprocess:
            stage("choosing post-processing on validation")
            post, post_results = choose_postprocess(
                probs, truth, chosen.weights, chosen.threshold, list(settings.postprocess_min_sizes), settings.tolerance
            )
        majority = float(search.dice_per_case(search.majority_vote(probs), truth).mean())
        return Finish(val_dice, majority, postprocess=post, postprocess_results=post_results)

    def test_methods(self, probs, names, record) -> list[Method]:
        from segx.ensembling.probs import Weights, binarize, combine
        from segx.ensembling.search import majority_vote
        from segx.scoring.postprocess import PostProcess, apply

        weights, threshold, post = record.weights, record.threshold, record.postprocess or PostProcess()
        equal = Weights((1,) * len(probs), len(probs))
        # Only the ensemble's threshold was chosen (on validation); the others are at 0.5.
        methods: list[Method] = [
            (name, (lambda i=i: self.member_label_maps(probs[i])), 0.5) for i, name in enumerate(names)
        ]
        methods.append(("equal-weights", lambda: binarize(combine(probs, equal), 0.5), 0.5))
        methods.append(("majority-vote", lambda: majority_vote(probs), 0.5))
        ensemble = lambda: binarize(combine(probs, weights), threshold)  # noqa: E731
        if post != PostProcess():
            methods.append(("ensemble (no post-processing)", ensemble, threshold))
        methods.append(("ensemble", lambda: apply(ensemble(), post), threshold))
        return methods

    def member_label_maps(self, probs):
        return probs.like(probs.flat >= 128)

    def case_metrics(self, pred, truth, spacing=None, with_hd95: bool = True):
        from segx.scoring.metrics import case_metrics

        return case_metrics(pred, truth, with_hd95=with_hd95, spacing=spacing)


class ClassesTask(Task):
    """Several classes: a softmax, the argmax of the weighted probabilities (no threshold), and
    post-processing per class; scored by the foreground mean of per-class Dice."""

    kind = "classes"
    one_threshold = False
    dice_axis = "validation foreground-mean Dice (per-class means)"

    def __init__(self, labels: Labels):
        self.labels = labels

    @property
    def n_outputs(self) -> int:
        return self.labels.n_classes

    @property
    def activation(self) -> str:
        return "softmax"

    @property
    def n_classes(self) -> int:
        return self.labels.n_classes

    def search_stage(self, method: str, n_members: int, n_cases: int) -> str:
        return f"searching weights on validation ({method}, {n_members} members, {self.labels.n_classes} classes)"

    def compact(self, probs, truth, thresholds):
        from segx.ensembling.classes import compact_classes

        return compact_classes(probs, truth, self.labels.n_classes)

    def finish(self, probs, truth, chosen, decision, settings) -> Finish:
        from segx.ensembling.classes import exact_class_dice, exact_labels, majority_vote_labels
        from segx.progress import stage
        from segx.scoring.classes import mean_foreground_dice
        from segx.scoring.postprocess import choose_class_postprocess

        k, names = self.labels.n_classes, self.labels.names
        val_dice = exact_class_dice(probs, truth, chosen.weights, k)
        per_class, tried = {}, []
        if settings.postprocess:
            stage("choosing post-processing per class on validation")
            per_class, tried = choose_class_postprocess(
                exact_labels(probs, chosen.weights), truth, k, list(settings.postprocess_min_sizes), settings.tolerance
            )
        majority = mean_foreground_dice(majority_vote_labels(probs), truth, k)
        return Finish(
            val_dice,
            majority,
            class_postprocess={names[c]: p for c, p in per_class.items()},
            class_postprocess_results=[(names[c], d, v) for c, d, v in tried],
        )

    def test_methods(self, probs, names, record) -> list[Method]:
        from segx.ensembling.classes import exact_labels, majority_vote_labels
        from segx.ensembling.probs import Weights
        from segx.scoring.postprocess import apply_classes

        classes, weights = self.labels.names, record.weights
        methods: list[Method] = [
            (name, (lambda i=i: self.member_label_maps(probs[i])), None) for i, name in enumerate(names)
        ]
        methods.append(("equal-weights", lambda: exact_labels(probs, Weights((1,) * len(probs), len(probs))), None))
        methods.append(("majority-vote", lambda: majority_vote_labels(probs), None))
        post = {classes.index(n): p for n, p in record.class_postprocess.items() if not p.is_identity}
        if post:
            methods.append(("ensemble (no post-processing)", lambda: exact_labels(probs, weights), None))
        methods.append(("ensemble", lambda: apply_classes(exact_labels(probs, weights), post), None))
        return methods

    def member_label_maps(self, probs):
        from segx.ensembling.probs import member_labels

        return member_labels(probs)

    def case_metrics(self, pred, truth, spacing=None, with_hd95: bool = True):
        from segx.scoring.classes import class_metrics

        return class_metrics(pred, truth, self.labels.names, with_hd95=with_hd95, spacing=spacing)

    def final_metrics(self, role: str, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """``<role>/dice`` (the foreground mean of per-class means, the search's objective),
        ``<role>/dice/<class>`` per class, the same for IoU and HD95."""
        from segx import metric_keys as keys
        from segx.scoring.classes import class_means, foreground_mean

        names = self._scored_names
        out = {}
        for metric in ("dice", "iou", "hd95"):
            if f"{metric}/{names[1]}" not in scores:
                continue
            per_class = np.stack(
                [np.full(len(scores[metric]), np.nan)] + [scores[f"{metric}/{n}"] for n in names[1:]], 1
            )
            means = class_means(per_class)
            out[keys.final(role, metric)] = float(foreground_mean(means, 0.0 if metric == "hd95" else 1.0))
            for c, name in enumerate(names[1:], start=1):
                if not np.isnan(means[c]):
                    out[keys.final(role, f"{metric}/{name}")] = float(means[c])
        return out

    @property
    def _scored_names(self) -> tuple[str, ...]:
        """What the per-case scores name, after a background slot: classes here, regions below."""
        return self.labels.names

    @property
    def truth_dtype(self) -> type:
        return np.uint8

    def epoch_scores(self, probs, masks) -> tuple[float, float]:
        """The foreground mean of per-class means (the search's objective) of the argmax."""
        from segx.scoring.classes import class_dice, class_iou, class_means, confusion_counts, foreground_mean

        counts = confusion_counts(np.argmax(probs, axis=-1).astype(np.uint8), masks, probs.shape[-1])
        return float(foreground_mean(class_means(class_dice(*counts)))), float(
            foreground_mean(class_means(class_iou(*counts)))
        )

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.labels.names

    @property
    def member_rule(self) -> str:
        return "argmax"

    @property
    def probability_planes(self) -> tuple[tuple[int, str], ...] | None:
        return tuple(enumerate(self.labels.names[1:], start=1))

    def describe(self, record) -> tuple[str, str]:
        post = ", ".join(f"{n}: {p.describe()}" for n, p in record.class_postprocess.items()) or "none"
        return f"labels: argmax of {self.labels.n_classes} classes", post

    def decision_words(self, candidate) -> str:
        return "argmax"

    def prediction_threshold(self, record, override: float | None) -> float | None:
        if override is not None:
            from segx.errors import SegxError

            raise SegxError(
                f"threshold={override} but this ensemble segments {self.labels.n_classes} classes "
                f"({', '.join(self.labels.names)}), labelled by argmax; drop the threshold override"
            )
        return None

    def label_maps(self, score, record, threshold: float | None):
        """The argmax of the exact class scores (ties to the lowest index: the search's labels),
        post-processed per class."""
        from segx.ensembling.probs import argmax_labels
        from segx.scoring.postprocess import apply_classes

        post = {self.labels.index(name): p for name, p in record.class_postprocess.items()}
        return apply_classes(argmax_labels(score), post)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.labels.names)

    def encode(self, label_map: np.ndarray) -> np.ndarray:
        return self.labels.decode(label_map)

    def graph_decision(self, record) -> GraphDecision:
        """The argmax (ties to the lowest index), written in data.labels' values."""
        return GraphDecision(values=tuple(int(v) for v in self.labels.values))

    def confidence(self, score, probs: Sequence, weights):
        """The mean class probabilities and their normalised entropy (0: one class certain, 1:
        every class equally likely)."""
        mean = score.probability()
        k = mean.flat.shape[-1]
        p = np.clip(mean.flat, 1e-12, 1.0)
        return mean, mean.like((-(p * np.log(p)).sum(axis=-1) / np.log(k)).astype(np.float32)), 1.0

    def run_summary(self, record, n_members: int, search: str) -> str:
        post = ", ".join(f"{c}: {p.describe()}" for c, p in record.class_postprocess.items()) or "none"
        return (
            f"segx ensemble of {n_members} members, chosen on validation by {search} search; {self._how(record)}, "
            f"post-processing {post}. Dice is the foreground mean of per-class means; every score on whole "
            "images at their own size."
        )

    def _how(self, record) -> str:
        return f"labels by argmax of {self.labels.n_classes} classes"

    @property
    def record_version(self) -> int:
        """4: the record names the classes and has no threshold."""
        from segx.ensembling.record import CLASSES_RECORD_VERSION

        return CLASSES_RECORD_VERSION

    def labels_record(self, flip_swap=None, no_flip_tta: bool = False) -> dict | None:
        """The classes (:meth:`Labels.to_record`), the outputs' permutation under a flip where
        there is one, and ``no_flip_tta`` where flip TTA cannot be undone."""
        return {
            **self.labels.to_record(),
            **({"flip_swap": list(flip_swap)} if flip_swap is not None else {}),
            **({"no_flip_tta": True} if no_flip_tta else {}),
        }

    def flip_outputs(self, swap) -> tuple[list[int] | None, bool]:
        """The classes' own permutation, or for regions each region onto the region of the
        swapped classes; flip TTA cannot be undone where a swap maps some region onto none."""
        outputs = self.labels.output_swap(swap)
        return outputs, outputs is None and swap is not None

    @property
    def sided(self) -> list[str]:
        return self.labels.sided()

    @property
    def palette(self) -> tuple | None:
        return self.labels.colours

    def run_params(self) -> dict[str, str]:
        """The class names, background first (``chosen.classes``)."""
        return {"chosen.classes": ",".join(self.labels.names)}


class RegionsTask(ClassesTask):
    """Overlapping regions (nnU-Net's region-based training): a sigmoid per region, each region
    at its own threshold, decoded in the regions' order into a label map; scored per region on
    that decoded map."""

    kind = "regions"
    dice_axis = "validation Dice (mean over regions of the decoded label maps)"

    @property
    def n_outputs(self) -> int:
        return len(self.labels.regions)

    @property
    def activation(self) -> str:
        return "sigmoid"

    @property
    def region_members(self) -> tuple[tuple[int, ...], ...] | None:
        return tuple(tuple(m) for m in self.labels.region_members)

    def search_stage(self, method: str, n_members: int, n_cases: int) -> str:
        regions = len(self.labels.regions)
        return f"searching weights and a threshold per region on validation ({method}, {regions} regions)"

    def compact(self, probs, truth, thresholds):
        from segx.ensembling.regions import compact_regions

        return compact_regions(probs, truth, self.labels.region_members, list(thresholds))

    def rescore(self, probs, truth, candidates, data, thresholds) -> dict:
        # The search ranked weightings by each region's raw decision; the user gets the decoded
        # label map. Every candidate is scored on that, its thresholds refined there, before the choice.
        from segx.ensembling.regions import refine_region_thresholds
        from segx.progress import stage

        stage("scoring the candidates on their decoded label maps (region thresholds refined there)")
        decisions = {}
        for c in candidates:
            decisions[id(c)], c.val_dice = refine_region_thresholds(
                probs, truth, c.weights, data.thresholds_for(c.weights), list(thresholds), self.labels
            )
        return decisions

    def finish(self, probs, truth, chosen, decision, settings) -> Finish:
        from segx.ensembling.regions import exact_region_dice, majority_region_decisions
        from segx.scoring.classes import mean_region_dice

        labels = self.labels
        val_dice = exact_region_dice(probs, truth, chosen.weights, decision, labels)
        majority_on = majority_region_decisions(probs)
        majority = mean_region_dice(
            majority_on.like(labels.decode_regions(majority_on.flat)), truth, labels.region_members
        )
        return Finish(val_dice, majority, region_thresholds=dict(zip(labels.region_names, decision, strict=True)))

    def test_methods(self, probs, names, record) -> list[Method]:
        import json

        from segx.ensembling.probs import Weights
        from segx.ensembling.regions import majority_region_decisions, region_decisions

        labels, regions = self.labels, self.labels.region_names
        half = [0.5] * len(regions)

        def decoded(decide):  # the label maps segx.predict writes
            def make():
                on = decide()
                return on.like(labels.decode_regions(on.flat))

            return make

        methods: list[Method] = [
            (name, (lambda i=i: self.member_label_maps(probs[i])), 0.5) for i, name in enumerate(names)
        ]
        equal = Weights((1,) * len(probs), len(probs))
        methods.append(("equal-weights", decoded(lambda: region_decisions(probs, equal, half)), 0.5))
        methods.append(("majority-vote", decoded(lambda: majority_region_decisions(probs)), 0.5))
        weights, thresholds = record.weights, dict(record.region_thresholds)
        ensemble = decoded(lambda: region_decisions(probs, weights, [thresholds[r] for r in regions]))
        methods.append(("ensemble", ensemble, json.dumps(thresholds)))
        return methods

    def member_label_maps(self, probs):
        """Each region at 0.5, decoded in the regions' order (what the member alone would write)."""
        from segx.ensembling.probs import Weights
        from segx.ensembling.regions import region_decisions

        on = region_decisions([probs], Weights((1,), 1), [0.5] * len(self.labels.regions))
        return on.like(self.labels.decode_regions(on.flat))

    def case_metrics(self, pred, truth, spacing=None, with_hd95: bool = True):
        from segx.scoring.classes import region_metrics

        labels = self.labels
        return region_metrics(
            pred, truth, labels.region_names, labels.region_members, with_hd95=with_hd95, spacing=spacing
        )

    @property
    def _scored_names(self) -> tuple[str, ...]:
        return ("", *self.labels.region_names)

    @property
    def region_names(self) -> tuple[str, ...] | None:
        return self.labels.region_names

    def epoch_scores(self, probs, masks) -> tuple[float, float]:
        """Each region's raw decision at 0.5 against "the class is in the region", averaged
        over regions (the curve; the final score decodes the label map)."""
        from segx.scoring.metrics import dice_per_case, iou_per_case

        on = probs >= 0.5
        per_region = []
        for r, members in enumerate(self.labels.region_members):
            truth = np.isin(masks, members)
            per_region.append((dice_per_case(on[..., r], truth), iou_per_case(on[..., r], truth)))
        return float(np.mean([d.mean() for d, _ in per_region])), float(np.mean([i.mean() for _, i in per_region]))

    @property
    def member_rule(self) -> str:
        return "each region at 0.5"

    @property
    def probability_planes(self) -> tuple[tuple[int, str], ...] | None:
        return tuple(enumerate(self.labels.region_names))

    def describe(self, record) -> tuple[str, str]:
        return "thresholds: " + ", ".join(f"{r}={t:g}" for r, t in record.region_thresholds.items()), "none"

    def decision_words(self, candidate) -> str:
        return "a threshold per region"

    def prediction_threshold(self, record, override: float | None) -> float | None:
        if override is not None:
            from segx.errors import SegxError

            chosen = record.region_thresholds
            names = self.labels.region_names
            shown = ", ".join(f"{r}={float(chosen[r]):g}" for r in names if r in chosen)
            raise SegxError(
                f"threshold={override} but this ensemble segments {len(names)} regions "
                f"({', '.join(names)}), each at its own threshold chosen on validation"
                f"{f' ({shown})' if shown else ''}; drop the threshold override"
            )
        return None

    def graph_decision(self, record) -> GraphDecision:
        """Each region at its exact cut, painting its class, later over earlier."""
        from segx.ensembling.probs import cut

        denominator = record.weights.denominator
        cuts = [cut(float(record.region_thresholds[r]), denominator) for r in self.labels.region_names]
        return GraphDecision(
            region_cuts=tuple(zip(cuts, self.labels.paints(), strict=True)),
            values=tuple(int(v) for v in self.labels.values),
        )

    def label_maps(self, score, record, threshold: float | None):
        """Each region at its threshold (chosen on validation), painted in the regions' order."""
        from segx.ensembling.probs import Score, binarize

        on = np.zeros(score.values.flat.shape, bool)
        for r, name in enumerate(self.labels.region_names):
            part = Score(score.values.like(np.ascontiguousarray(score.values.flat[:, r])), score.denominator)
            on[:, r] = binarize(part, float(record.region_thresholds[name])).flat
        return score.values.like(self.labels.decode_regions(on))

    def confidence(self, score, probs: Sequence, weights):
        """The mean region probabilities, and the largest binary entropy over regions (bits)."""
        mean = score.probability()
        # Bounds float32 can hold (1 - 1e-12 is 1.0 in float32: a certain region's 0 * log2(0) was NaN).
        p = np.clip(mean.flat, np.float32(1e-12), np.nextafter(np.float32(1), np.float32(0)))
        bits = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        return mean, mean.like(bits.max(axis=-1).astype(np.float32)), 1.0

    def _how(self, record) -> str:
        return "thresholds " + ", ".join(f"{r} {t:g}" for r, t in record.region_thresholds.items())


def task_for(labels: Labels | None) -> Task:
    """The task of members trained with ``labels`` (None: one structure)."""
    if labels is None:
        return BinaryTask()
    if labels.regions:
        return RegionsTask(labels)
    return ClassesTask(labels)


def task_of_record(labels: dict | None) -> Task:
    """The task of a member or ensemble from the labels its record holds (``Labels.to_record``)."""
    return task_for(None if labels is None else Labels.from_record(labels))


def choose_postprocess(probs, truth, weights, threshold, min_sizes, tolerance):
    """One structure's post-processing, picked on validation only; identity unless a gain
    exceeds ``tolerance``."""
    from segx.ensembling.probs import Weights, binarize, combine
    from segx.scoring.metrics import dice_per_case
    from segx.scoring.postprocess import apply, candidates

    pred = binarize(combine(probs, Weights.of(weights)), threshold)
    results = [(p, float(dice_per_case(apply(pred, p), truth).mean())) for p in candidates([0, *min_sizes])]
    base = results[0][1]
    best = max(results, key=lambda r: r[1])
    chosen = best if best[1] > base + tolerance else results[0]
    return chosen[0], results
