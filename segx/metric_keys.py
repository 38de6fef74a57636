"""MLflow metric keys: one name per meaning, the same on members and ensembles, so one chart
compares them (the README's "Metrics" table). No imports: every stage may use it.

* ``val/*``, ``test/*``: one value each, scored on whole images at each image's own size (what
  a user compares; an ensemble logs its own on the same keys);
* ``curves/*``: per epoch (the step is the epoch, from 1), at the model's input size (resize
  mode) or on one fixed patch per case (patch mode); they choose the best epoch;
* ``time/*``: per epoch, the training loop's own cost; ``search/*``, ``cv/*``: ensembles and
  cross-validation.
"""

from __future__ import annotations

CURVES = "curves/"
BEST_EPOCH = "curves/best_epoch"  # the epoch whose weights the member keeps (from 1)
BEST_VAL_DICE = "curves/best_val_dice"  # curves/val_dice at that epoch (what early stopping watched)
TRAIN_LOSS = "curves/train_loss"
VAL_DICE = "val/dice"
TEST_DICE = "test/dice"


def curve(name: str) -> str:
    """The per-epoch key of a training log entry: ``val/dice`` -> ``curves/val_dice``,
    ``train/loss`` -> ``curves/train_loss``, ``lr`` -> ``curves/lr``."""
    return CURVES + name.replace("/", "_")


def final(role: str, score: str) -> str:
    """A whole-image score at each image's own size: ``final("val", "dice")`` -> ``val/dice``."""
    return f"{role}/{score}"
