"""How a member is fitted, as plain values: no TensorFlow here, so a workflow builds the
settings from its config before (and without) starting TensorFlow's runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

from segx.ensembling.task import BinaryTask, Task


@dataclass(frozen=True)
class FitSettings:
    """How a member is fitted (the ``trainer`` config section and the seed, as plain values);
    built once by the workflow from its config."""

    epochs: int
    batch_size: int
    seed: int = 0
    patience: int = 0  # validated epochs without improvement before stopping; 0: never stops early
    min_delta: float = 0.0  # the least gain in validation Dice that counts as improvement
    verbose: int = 2  # Keras' fit verbosity
    samples_per_epoch: int | None = None  # patch mode (data.samples_per_epoch); None: one per case
    threads: int | None = None  # the job's share of the cores (trainer.threads), tf.data's pool too
    checkpoint_every_s: float = 0.0  # the least seconds between checkpoints; 0: after every epoch
    val_every: int = 1  # validate every this many epochs, and after the last
    # What the member segments (one structure, several classes, regions): how each epoch's
    # validation is scored.
    task: Task = field(default_factory=BinaryTask)
