"""Member training: the tf.data input pipeline and a resumable fit loop (TensorFlow side).

Determinism and resume: the order of cases and every augmentation's random draws are a pure
function of (seed, epoch, position), so training restarted at epoch k sees exactly the
batches an uninterrupted run would have seen from epoch k on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segx import metric_keys as keys
from segx.backend import keras, tf
from segx.models import loss_value, predict_probs, preprocessing
from segx.training.augment import SeededAugmenter
from segx.training.settings import FitSettings


def epoch_plan(
    n_cases: int, batch_size: int, seed: int, epoch: int, samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(case indices, per-sample seeds) for one epoch: ``samples`` (default: one per case)
    drawn as shuffled passes over all cases, padded with the first cases of the same shuffle to
    whole batches (BatchNorm dislikes tiny tails)."""
    rng = np.random.default_rng([seed, epoch])
    samples = samples or n_cases
    passes = math.ceil(samples / n_cases)
    order = (
        rng.permutation(n_cases) if passes == 1 else np.concatenate([rng.permutation(n_cases) for _ in range(passes)])
    )
    order = order[:samples]
    steps = math.ceil(samples / batch_size)
    # Padded by repeating the shuffle (np.resize cycles it): the same as appending its first
    # cases when there are enough, and still whole batches when an epoch has fewer samples
    # than half a batch.
    order = np.resize(order, steps * batch_size)
    seeds = rng.integers(0, 2**31 - 1, size=len(order))
    return order.astype(np.int64), seeds.astype(np.int64)


@dataclass(frozen=True)
class FitData:
    """What a member is fitted on: ``train_images`` uint8 (N, S, S, 3) at model size with
    ``train_masks`` (resize mode), or a :class:`segx.training.patches.PatchSampler` and None
    (patch mode), each sample through ``augmenter``; validation each epoch on ``val_images`` and
    ``val_masks`` at model size (fixed patches in patch mode)."""

    train_images: Any
    train_masks: np.ndarray | None
    augmenter: SeededAugmenter
    val_images: np.ndarray
    val_masks: np.ndarray


def make_train_dataset(
    images,
    masks: np.ndarray | None,
    augmenter: SeededAugmenter,
    backbone: str,
    settings: FitSettings,
    initial_epoch: int = 0,
):
    """A ``tf.data.Dataset`` of (image float32 (B,S,S,3), mask float32 (B,S,S,1)) batches for
    epochs ``initial_epoch..settings.epochs-1``, and the steps per epoch.

    ``images``: uint8 (N, S, S, 3) in memory with ``masks`` uint8 (N, S, S) in {0, 1} (resize
    mode); or a :class:`segx.training.patches.PatchSampler` (patch mode, ``masks`` None), which
    cuts a patch of a case from the on-disk cache, given the sample's seed and its position in
    the batch. Augmentation and the encoder's preprocessing run in parallel worker threads,
    ahead of the model.
    """
    batch_size, seed, threads = settings.batch_size, settings.seed, settings.threads
    sampler = images if masks is None else None
    n = len(sampler) if sampler is not None else len(images)
    size = sampler.patch if sampler is not None else images.shape[1]
    per_epoch = settings.samples_per_epoch or n
    plans = [epoch_plan(n, batch_size, seed, e, per_epoch) for e in range(initial_epoch, settings.epochs)]
    order = np.concatenate([p[0] for p in plans])
    seeds = np.concatenate([p[1] for p in plans])
    slots = np.tile(np.arange(batch_size), len(order) // batch_size)
    prep = preprocessing(backbone)

    def load(index, sample_seed, slot):
        if sampler is not None:
            image, mask = sampler.sample(int(index), int(sample_seed), int(slot), batch_size)
        else:
            image, mask = images[index], masks[index]
        image, mask = augmenter(image, mask, int(sample_seed))
        image = prep(image.astype(np.float32)).astype(np.float32)
        return image, mask.astype(np.float32)[:, :, None]

    def tf_load(index, sample_seed, slot):
        image, mask = tf.numpy_function(load, [index, sample_seed, slot], [tf.float32, tf.float32])
        image.set_shape((size, size, 3))
        mask.set_shape((size, size, 1))
        return image, mask

    dataset = tf.data.Dataset.from_tensor_slices((order, seeds, slots))
    dataset = dataset.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    if threads:  # the job's share of the cores (trainer.threads): tf.data's own pool too
        options = tf.data.Options()
        options.threading.private_threadpool_size = int(threads)
        dataset = dataset.with_options(options)
    return dataset, math.ceil(per_epoch / batch_size)


class BestWeights(tf.Module):
    """The best epoch's weights beside the model's, in the same checkpoint: copied in memory when
    an epoch improves (a fraction of a second), written with the next checkpoint."""

    def __init__(self, model):
        super().__init__(name="best_weights")
        with tf.init_scope():  # plain variables, whatever strategy scope the model was built in
            self.values = [tf.Variable(w, trainable=False) for w in model.get_weights()]
        self.kept = False

    def keep(self, model) -> None:
        # Variable to variable, inside TensorFlow: no round trip through numpy arrays (which
        # took ~0.09 s an epoch for a ResNet-34 U-Net, experiments/training_overhead).
        for variable, weight in zip(self.values, model.weights, strict=True):
            variable.assign(weight)
        self.kept = True

    def restore_into(self, model) -> None:
        model.set_weights([v.numpy() for v in self.values])


@dataclass
class FitState:
    """What resuming needs besides the weights; stored as ``state.json`` beside them."""

    next_epoch: int = 0
    best_dice: float = -1.0
    best_epoch: int = -1
    wait: int = 0
    checkpoint: str | None = None
    failure: str | None = None

    def snapshot(self) -> FitState:
        return FitState(**self.__dict__)

    def save(self, folder: Path) -> None:
        tmp = folder / f"state.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(self.__dict__ | {"host": socket.gethostname(), "pid": os.getpid()}))
        os.replace(tmp, folder / "state.json")  # atomic: a kill never leaves half a state

    @classmethod
    def load(cls, folder: Path) -> FitState | None:
        path = folder / "state.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Checkpoints:
    """The member's checkpoints in ``folder``, both with the best weights: ``resumable`` (weights
    and optimizer state, written while epochs remain) and ``final`` (after the last epoch nothing
    trains: the weights without the optimizer's state)."""

    def __init__(self, model, folder: Path):
        self.folder = folder
        model.optimizer.build(model.trainable_variables)
        self.best = BestWeights(model)
        self.resumable = tf.train.Checkpoint(model=model, optimizer=model.optimizer, best=self.best)
        # A Keras model carries its optimizer into a checkpoint, so its variables are listed.
        self.final = tf.train.Checkpoint(weights=list(model.weights), best=self.best)

    def restore(self, model, state: FitState) -> None:
        """Continue from where ``state`` says training stopped (nothing to do on a fresh folder)."""
        if (self.folder / "best.weights.h5").exists() and state.best_epoch >= 0:
            model.load_weights(str(self.folder / "best.weights.h5"))  # a folder from segx 0.2: best weights in .h5
            self.best.keep(model)
        if state.checkpoint:
            (self.final if Path(state.checkpoint).name.startswith("final") else self.resumable).restore(
                state.checkpoint
            ).expect_partial()
            self.best.kept = state.best_epoch >= 0

    def sync(self) -> None:
        """Wait for the background writes (and their state.json) to be on disk."""
        self.resumable.sync()
        self.final.sync()

    def raise_background_errors(self) -> None:
        for checkpoint in (self.resumable, self.final):
            _raise_background_error(checkpoint)


class MemberCallback(keras.callbacks.Callback):
    """Per-case validation Dice/IoU each epoch, best-weights tracking, early stopping,
    resumable checkpoints, NaN detection, and metric logging through ``log_fn``."""

    def __init__(
        self,
        data: FitData,
        backbone: str,
        settings: FitSettings,
        state: FitState,
        checkpoints: Checkpoints,
        log_fn: Callable[[dict, int], None],
    ):
        super().__init__()
        self.task = settings.task
        self.val_images, self.val_masks, self.backbone = data.val_images, data.val_masks, backbone
        self.folder, self.state = checkpoints.folder, state
        self.checkpoint, self.final_checkpoint = checkpoints.resumable, checkpoints.final
        self.best = checkpoints.best
        self.patience, self.min_delta, self.log_fn = settings.patience, settings.min_delta, log_fn
        self.epoch = state.next_epoch
        self.epochs, self.checkpoint_every_s = settings.epochs, float(settings.checkpoint_every_s)
        self.val_every = max(1, int(settings.val_every))
        self.last_checkpoint = time.monotonic()  # training (re)starts from a checkpoint, or from scratch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.state.failure = f"loss became {loss} at epoch {self.epoch + 1}, batch {batch + 1}"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if self.state.failure:
            return  # weights are already bad: keep the last good checkpoint as it is
        # The loop's own cost, part by part, beside the epoch's: `time/*` metrics (the steps'
        # time is what the epoch took before this callback; the parts are what it adds).
        clock = {"start": time.perf_counter()}
        # Validation every val_every epochs and after the last (Lightning's check_val_every_n_epoch):
        # best weights and early stopping's patience count validated epochs only.
        if (epoch + 1) % self.val_every and epoch + 1 < self.epochs:
            metrics = {
                "lr": _learning_rate(self.model),
                **{f"train/{k}": float(v) for k, v in logs.items() if "/" not in k},
            }
            clock["validation"] = clock["best_weights"] = time.perf_counter()
            self.state.next_epoch = epoch + 1
            self._finish_epoch(epoch, metrics, clock)
            return
        probs = predict_probs(self.model, self.val_images, self.backbone)
        if not np.isfinite(probs).all():
            # Losses clip their inputs, so exploding weights can leave the loss finite.
            self.state.failure = f"the model's outputs became NaN/inf at epoch {epoch + 1}; lower the learning rate"
            self.model.stop_training = True
            return
        val_dice, val_iou = self.task.epoch_scores(probs, self.val_masks)
        logs["val/dice"], logs["val/iou"] = val_dice, val_iou
        metrics = {
            "val/dice": val_dice,
            "val/iou": val_iou,
            "val/loss": loss_value(self.model, probs, self.val_masks),
            "lr": _learning_rate(self.model),
        }
        for key, value in list(logs.items()):
            if "/" not in key:
                metrics[f"train/{key}"] = float(value)
        clock["validation"] = time.perf_counter()
        if val_dice > self.state.best_dice + self.min_delta:
            self.state.best_dice, self.state.best_epoch, self.state.wait = val_dice, epoch, 0
            self.best.keep(self.model)  # in memory; written with the next checkpoint
        else:
            self.state.wait += 1
        clock["best_weights"] = time.perf_counter()
        self.state.next_epoch = epoch + 1
        self._finish_epoch(epoch, metrics, clock)

    def _finish_epoch(self, epoch: int, metrics: dict, clock: dict) -> None:
        # Epochs count from 1 everywhere: Keras' "Epoch 1/30", the metric step, curves/best_epoch.
        # Metrics first, then the checkpoint, then state.json (the commit point that resume
        # reads), which is written once the checkpoint is on disk: a kill before that repeats
        # this epoch on resume instead of losing its logged values.
        # Logged as curves/<name> (segx/metric_keys.py): val/dice is the whole-image score at the end.
        self.log_fn({**{keys.curve(k): v for k, v in metrics.items()}, **self._timings(clock)}, epoch + 1)
        clock["logged"] = time.perf_counter()
        if self.patience and self.state.wait >= self.patience:
            self.model.stop_training = True
        # A checkpoint (weights, optimizer state, best weights: ~390 MB for a ResNet-34 U-Net)
        # is written at most every checkpoint_every_s seconds, and always after the last epoch:
        # writing it costs about a second of CPU, which a short epoch cannot hide. A kill
        # between two checkpoints repeats the epochs since the last one on resume, identically.
        last = self.model.stop_training or epoch + 1 >= self.epochs
        if last:
            # Nothing trains after this one, so it leaves out the optimizer's state (half the
            # size): it is there for a run that dies while its results are logged.
            self.checkpoint.sync()  # an earlier write must not race this one
            self.state.checkpoint = self._write_checkpoint(self.state.snapshot(), self.final_checkpoint, "final")
        elif time.monotonic() - self.last_checkpoint >= self.checkpoint_every_s:
            self.state.checkpoint = self._write_checkpoint(self.state.snapshot(), self.checkpoint, "last")
            self.last_checkpoint = time.monotonic()
        self.checkpoint_s = time.perf_counter() - clock["logged"]  # reported with the next epoch
        self.log_s = clock["logged"] - clock["best_weights"]

    def _write_checkpoint(self, state: FitState, checkpoint: tf.train.Checkpoint, name: str) -> str:
        """Weights, optimizer state and best weights in one TensorFlow checkpoint (restorable
        under any distribution strategy, unlike .h5), written by TensorFlow in the background
        after a copy of the variables (training goes on meanwhile); state.json follows it."""
        folder = self.folder

        def commit(*_):
            state.save(folder)

        self.committed = state

        options = tf.train.CheckpointOptions(enable_async=True, experimental_write_callbacks=[commit])
        path = checkpoint.write(str(folder / "ckpt" / name), options=options)
        state.checkpoint = path
        return path

    log_s = checkpoint_s = 0.0
    epoch_start = 0.0
    committed: FitState | None = None  # the state of the last checkpoint written by this process

    def _timings(self, clock: dict[str, float]) -> dict[str, float]:
        """Seconds of the epoch's steps and of each part this callback adds; ``time/overhead``
        is their share of the whole epoch (logging and the checkpoint's blocking part are the
        previous epoch's: they come after these metrics are sent)."""
        parts = {
            "validation": clock["validation"] - clock["start"],
            "best_weights": clock["best_weights"] - clock["validation"],
            "checkpoint": self.checkpoint_s,
            "logging": self.log_s,
        }
        steps = clock["start"] - self.epoch_start
        added = sum(parts.values())
        return {
            "time/steps_s": steps,
            **{f"time/{k}_s": v for k, v in parts.items()},
            "time/overhead": added / (steps + added),
        }


class OnValidatedEpochs(keras.callbacks.Callback):
    """Hands ``inner`` (a callback watching ``val/dice``, e.g. ReduceLROnPlateau) the epochs that
    were validated only, so that its patience counts validations, as early stopping's does; it
    gets the epoch and training hooks, not the batch hooks (used with trainer.val_every > 1)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def on_train_begin(self, logs=None):
        self.inner.on_train_begin(logs)

    def on_train_end(self, logs=None):
        self.inner.on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.inner.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if logs and "val/dice" in logs:
            self.inner.on_epoch_end(epoch, logs)


def _raise_background_error(checkpoint) -> None:
    """Raise what failed in a checkpoint's background write (a full disk), here and once.
    TensorFlow keeps it until the next save, or raises it from an exit hook after segx has
    ended, as a traceback nobody can act on (tf 2.21: AsyncCheckpointHelper._async_error)."""
    helper = getattr(checkpoint, "_async_checkpointer_impl", None)
    error = getattr(helper, "_async_error", None)
    if error is not None:
        helper._async_error = None
        raise error


def _learning_rate(model) -> float:
    lr = model.optimizer.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(model.optimizer.iterations)
    return float(keras.backend.get_value(lr))


class TrainingDiverged(RuntimeError):
    pass


def fit_member(
    model,
    data: FitData,
    backbone: str,
    folder: Path,
    settings: FitSettings,
    extra_callbacks: Sequence = (),
    log_fn: Callable[[dict, int], None] = lambda metrics, step: None,
) -> FitState:
    """Train (or continue training) ``model`` on ``data`` and leave it holding its best weights.

    ``folder`` holds the resumable state: if it has a checkpoint, training continues from the
    epoch after it, with the optimizer's state. A checkpoint is written after an epoch when
    ``settings.checkpoint_every_s`` seconds have passed since the last one (0: after every
    epoch), and after the last epoch. Validation runs every ``settings.val_every`` epochs and
    after the last. Raises :class:`TrainingDiverged` on NaN loss (the last good checkpoint stays
    in ``folder``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = FitState.load(folder) or FitState()
    state.failure = None
    checkpoints = Checkpoints(model, folder)
    checkpoints.restore(model, state)
    callback = MemberCallback(data, backbone, settings, state, checkpoints, log_fn)
    if state.next_epoch < settings.epochs and not (settings.patience and state.wait >= settings.patience):
        callbacks = [callback, *(OnValidatedEpochs(c) if settings.val_every > 1 else c for c in extra_callbacks)]
        _run_epochs(model, data, backbone, settings, state.next_epoch, callbacks, checkpoints)
    waited = time.perf_counter()
    checkpoints.sync()  # the last background writes (and their state.json) are on disk from here
    checkpoints.raise_background_errors()
    if callback.committed is not None and not state.failure:
        # The last epoch's checkpoint: its blocking part and the wait for its write (the
        # per-epoch `time/checkpoint_s` of an epoch is reported with the next one).
        log_fn({"time/final_checkpoint_s": callback.checkpoint_s + time.perf_counter() - waited}, state.next_epoch)
    if state.failure:
        # What the last good checkpoint holds (an earlier epoch than the failed one, with the
        # checkpoint interval), with the reason: resume starts from there.
        kept = callback.committed or FitState.load(folder) or FitState()
        kept.failure = state.failure
        kept.save(folder)
        raise TrainingDiverged(state.failure)
    if checkpoints.best.kept:
        checkpoints.best.restore_into(model)
    return state


def _run_epochs(model, data: FitData, backbone: str, settings: FitSettings, first_epoch: int, callbacks, checkpoints):
    """Keras' fit from ``first_epoch`` to the last; an interruption leaves its checkpoint committed."""
    dataset, steps = make_train_dataset(
        data.train_images, data.train_masks, data.augmenter, backbone, settings, first_epoch
    )
    try:
        model.fit(
            dataset,
            epochs=settings.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps,
            callbacks=callbacks,
            verbose=settings.verbose,
        )
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM, a preemption): a checkpoint being written in the
        # background is finished and committed first, so resume finds it. Its own failure
        # (a full disk) is not this error's to replace.
        for ckpt in (checkpoints.resumable, checkpoints.final):
            ckpt.sync()
            with contextlib.suppress(Exception):
                _raise_background_error(ckpt)
        raise
