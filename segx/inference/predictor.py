"""A rebuilt ensemble that predicts masks: used by ``segx.predict`` and the MLflow pyfunc model.

Members predict at the recorded input size; their probabilities are quantised and combined
with the record's integer weights in the arithmetic the weight search scored
(:func:`segx.ensembling.probs.combine`, :func:`segx.ensembling.probs.binarize`), post-processed at that size, then
brought back to each input's own size.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segx.data.folder import from_model_size, to_model_size
from segx.ensembling.probs import Score, binarize, combine, quantize
from segx.ensembling.record import record_weights, validate_record
from segx.errors import SegxError
from segx.inference.postprocess import PostProcess, apply
from segx.models import load_member, predict_probs


@dataclass
class Prediction:
    """mask: bool (H, W); probability: float32 (H, W) ensemble score in [0, 1];
    uncertainty: float32 (H, W), weighted std of member probabilities in [0, 0.5]."""

    mask: np.ndarray
    probability: np.ndarray
    uncertainty: np.ndarray


class EnsemblePredictor:
    def __init__(self, record: dict, model_paths: Sequence[str | os.PathLike], tta: str | None = None):
        self.record = validate_record(record)
        if len(model_paths) != len(record["members"]):
            raise ValueError("one model path per member")
        self.members = record["members"]
        self.weights = record_weights(record)  # exact counts over a denominator
        self.threshold = float(record["threshold"])
        self.size = int(record["image_size"])
        self.resize_mode = record.get("resize_mode", "resize")
        self.post = PostProcess(**record.get("postprocess", {}))
        self.tta = tta or record.get("tta", "none")
        # Members with weight 0 cannot change the output: skip loading and running them.
        self.models = [load_member(p) if k > 0 else None for p, k in zip(model_paths, self.weights.counts, strict=True)]

    def member_probs(self, images: np.ndarray) -> list[np.ndarray | None]:
        """uint8 (N, S, S) probabilities per member (None for weight 0) for uint8 (N, S, S, 3)."""
        return [
            None if model is None else quantize(predict_probs(model, images, m["backbone"], self.tta))
            for model, m in zip(self.models, self.members, strict=True)
        ]

    def score_model_size(self, images: np.ndarray) -> tuple[Score, list]:
        """Exact ensemble score (N, S, S) (:class:`segx.ensembling.probs.Score`) and the member probabilities."""
        probs = self.member_probs(images)
        # Members with count 0 add nothing: all members, with their counts, give the same sum.
        filled = [np.zeros(images.shape[:3], np.uint8) if p is None else p for p in probs]
        return combine(filled, self.weights), probs

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict uint8 RGB images of any size (H, W, 3); grayscale (H, W) is accepted too."""
        images = [np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im[:, :, :3] for im in images]
        batch = np.stack([to_model_size(np.asarray(im, np.uint8), self.size, self.resize_mode, False) for im in images])
        score, probs = self.score_model_size(batch)
        masks = apply(binarize(score, self.threshold), self.post)
        # Maps for people (not masks): the exact mean score / (255 D) and the weighted spread.
        mean = score.probability()
        used = [(p.astype(np.float32) / 255.0, w) for p, w in zip(probs, self.weights.floats, strict=True) if p is not None]
        spread = np.sqrt(sum(w * (p - mean) ** 2 for p, w in used))
        out = []
        for i, image in enumerate(images):
            original = image.shape[:2]
            mask = from_model_size(masks[i].astype(np.float32), original, self.resize_mode) >= 0.5
            out.append(Prediction(
                mask=mask,
                probability=np.clip(from_model_size(mean[i], original, self.resize_mode), 0, 1),
                uncertainty=np.clip(from_model_size(spread[i].astype(np.float32), original, self.resize_mode), 0, 0.5),
            ))  # fmt: skip
        return out


def load_ensemble(client, run_id: str, workdir: Path, tta: str | None = None):
    """(record, EnsemblePredictor) for an ensemble run, with its members downloaded."""
    from segx import tracking

    run = tracking.get_run(client, run_id)
    if run.data.tags.get(tracking.ROLE) != "ensemble":
        raise SegxError(f"run '{run_id}' is not a segx ensemble (tag {tracking.ROLE}); give an ensemble run ID")
    path = tracking.download(client, run_id, "ensemble.json", workdir)
    try:
        record = json.loads(Path(path).read_text())
    except ValueError:
        raise SegxError(f"run '{run_id}': ensemble.json is not valid JSON; rebuild the ensemble") from None
    validate_record(record, f"run {run_id} ensemble.json")
    model_paths = []
    for i, member in enumerate(record["members"]):
        tracking.get_run(client, member["run_id"])  # exists, not deleted, FINISHED
        model_paths.append(
            tracking.download_member_model(client, member["run_id"], workdir / f"m{i}", member.get("model_artifact", "model"))
        )
    recorded = record.get("tta", "none")
    if tta not in (None, recorded):
        # Weights, threshold and post-processing were chosen on the recorded pipeline's
        # probabilities; another TTA runs, but the record's Dice no longer describes it.
        print(f"segx: warning: ensemble {run_id} was tuned for tta={recorded}; predicting with "
              f"tta={tta} (drop the tta override to predict as tuned)", file=sys.stderr, flush=True)  # fmt: skip
    return record, EnsemblePredictor(record, model_paths, tta)
