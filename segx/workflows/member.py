"""One member, start to end: check its config, read the data, train, and record everything
in its MLflow run (params, curves, model, cached probabilities, figures), resuming an
interrupted run when asked. Called by ``python -m segx.train`` and by ``segx.ensemble`` when
members are missing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from segx import metric_keys as keys
from segx.config import (
    ARCHS,
    check_key_names,
    recorded_container,
    require_choice,
    require_float,
    require_int,
)
from segx.data.labels import Labels
from segx.data.view import View
from segx.ensembling.task import task_for
from segx.errors import SegxError, look_up_option
from segx.member_spec import MemberSpec
from segx.objects import check_no_stray_targets, checked_container, instantiate
from segx.tracking import tags as tag_names
from segx.tracking.readers import MemberRun
from segx.training.settings import FitSettings

if TYPE_CHECKING:  # segx.training.fit starts TensorFlow: imported once threads and devices are set
    from segx.training.fit import FitData

log = logging.getLogger("segx.train")


@dataclass(frozen=True)
class MemberResult:
    """What training a member produced: its run and its scores."""

    run_id: str
    best_val_dice: float  # curves/best_val_dice: the kept epoch's Dice on the validation patches
    scores: dict[str, float]  # val/* and test/*: whole images at their own size


@dataclass(frozen=True)
class MemberPlan:
    """What the member is and how it is trained, read from its config once (:func:`train_member`)
    and handed to each step: the network, how it sees images, its classes, its run's names, how
    it is fitted and where it runs."""

    arch: str
    backbone: str
    arch_options: dict  # arch.options, resolved
    view: View
    labels: Labels | None  # None: one structure
    flip_swap: np.ndarray | None  # data.flip_swap's class table; None without pairs
    augmentation: Any  # the albumentations pipeline (augment.transforms)
    fold: int | None
    base_name: str  # the run's name without its fold (the cross-validation parent's stem)
    run_name: str
    identity: str  # config_identity: what resume=auto matches
    fit: FitSettings
    strategy: Any  # TensorFlow's distribution strategy over several devices, or None
    precision: str | None  # trainer.precision
    spacing: Any  # data.pixel_spacing: HD95's units (None: pixels)

    @property
    def size(self) -> int:
        return self.view.size

    @property
    def placement(self) -> dict[str, str]:
        """Where it runs: TensorFlow's threads (the launcher's share of the cores) and devices."""
        devices = self.strategy.num_replicas_in_sync if self.strategy is not None else 1
        return {"segx.threads": str(self.fit.threads or "all"), "segx.devices": str(devices)}

    def spec(self) -> MemberSpec:
        """What the member's saved model says about itself (``spec.json``): network, view, and for
        several classes their names and flip TTA's permutation of the outputs."""
        labels = self.labels
        # Several classes: named in the model's own spec, with the outputs' permutation under flip
        # TTA (classes, or regions) and whether a swap maps some region onto none.
        output_swap, no_flip_tta = task_for(labels).flip_outputs(self.flip_swap)
        return MemberSpec(
            arch=self.arch,
            backbone=self.backbone,
            image_size=self.size,
            options=self.arch_options,
            view=self.view,
            labels=labels,
            flip_swap=None if output_swap is None else tuple(output_swap),
            no_flip_tta=no_flip_tta,
            # trained so; rebuilt and predicted in float32
            precision="mixed_float16" if self.precision == "mixed_float16" else None,
        )


# Keys that do not change what is trained: left out of the resume identity.
# Where it runs (accelerator, devices, threads) is not identity either: a member preempted on
# one node resumes on another.
NOT_IDENTITY = (
    "resume",
    "mlflow",
    "paths",
    "trainer.verbose",
    "data.cache_dir",
    "tags",
    "note",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.threads",
    "trainer.checkpoint_every_s",
)


def validate_config(cfg: DictConfig) -> None:
    """Cheap checks that name the key, before data or models are touched, a run is created or
    a file is written. Every ``_target_`` segx will build is checked here by what it resolves to."""
    # TF and NumPy's legacy seeding take 32-bit unsigned seeds.
    check_key_names(cfg)
    require_int(cfg, "seed", 0, 2**32 - 1)
    require_int(cfg, "trainer.epochs", 1)
    require_int(cfg, "trainer.batch_size", 1)
    require_int(cfg, "trainer.early_stopping.patience", 0)
    require_float(cfg, "trainer.early_stopping.min_delta", 0.0, 1.0)
    if cfg.trainer.get("val_every") is not None:
        require_int(cfg, "trainer.val_every", 1)
    if cfg.trainer.get("checkpoint_every_s") is not None:
        require_float(cfg, "trainer.checkpoint_every_s", 0.0, 7 * 86400.0, high_open=False)
    if cfg.trainer.bn_momentum is not None:
        require_float(cfg, "trainer.bn_momentum", 0.0, 1.0)
    for key, weight in cfg.trainer.loss.items():
        bad = isinstance(weight, bool) or not isinstance(weight, (int, float))
        if bad or not math.isfinite(weight) or weight < 0:
            raise SegxError(f"trainer.loss.{key}={weight!r} must be a finite number >= 0; e.g. trainer.loss.{key}=1.0")
    if not any(cfg.trainer.loss.values()):
        raise SegxError("trainer.loss has no term with a non-zero weight; e.g. trainer.loss.dice=1")
    if not isinstance(cfg.trainer.get("deterministic"), bool):
        raise SegxError(f"trainer.deterministic={cfg.trainer.get('deterministic')!r} must be true or false")
    if cfg.trainer.verbose != "auto":
        require_int(cfg, "trainer.verbose", 0, 2)
    require_choice(cfg, "arch.name", ARCHS)
    if cfg.mlflow.get("offline_wait") is not None:
        require_float(cfg, "mlflow.offline_wait", 0.0, 86400.0, high_open=False)
    require_choice(cfg, "trainer.accelerator", ("auto", "gpu", "cpu"))
    if cfg.trainer.get("devices") is not None:
        require_int(cfg, "trainer.devices", 1)
    if cfg.trainer.get("strategy") is not None:
        require_choice(cfg, "trainer.strategy", ("mirrored",))
    if cfg.trainer.get("precision") is not None:
        require_choice(cfg, "trainer.precision", ("float32", "mixed_float16"))
    from segx.data.labels import check_class_weights
    from segx.workflows.prepare import check_fold, labels_of, validate_data_config

    validate_data_config(cfg.data)
    check_fold(cfg.data, cfg.get("fold"))
    weights = cfg.trainer.get("class_weights")
    check_class_weights(
        OmegaConf.to_container(weights) if OmegaConf.is_config(weights) else weights, labels_of(cfg.data)
    )
    # The same nodes train_member builds (the optimizer after the run is created), and no
    # `_target_` anywhere else: nothing would build it there.
    if cfg.trainer.optimizer is None:
        raise SegxError("trainer.optimizer is null; give one, e.g. trainer.optimizer._target_=tf_keras.optimizers.Adam")
    checked_container(cfg.trainer.optimizer, "trainer.optimizer")
    if cfg.trainer.lr_schedule is not None:
        checked_container(cfg.trainer.lr_schedule, "trainer.lr_schedule")
    checked_container(cfg.augment.transforms, "augment.transforms")
    check_no_stray_targets(cfg)
    from segx.models import LOSSES  # TensorFlow is imported by now (the optimizer's check)

    for key in cfg.trainer.loss:
        look_up_option(str(key), LOSSES, "loss", "trainer.loss")


def _drop_nulls(node):
    """Null settings left out, so a key that a newer segx adds with a null default (an option that
    is off) leaves the identity of every existing config as it was: resume and the folds of one
    cross-validated configuration still find each other across that upgrade."""
    if isinstance(node, dict):
        return {k: _drop_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_nulls(v) for v in node]
    return node


def config_identity(cfg: DictConfig, without: tuple[str, ...] = ()) -> str:
    """Hash of everything that determines the trained member (for resume=auto); ``without``
    leaves more keys out (``("fold",)``: the configuration shared by its folds)."""
    plain = _drop_nulls(OmegaConf.to_container(cfg, resolve=True))
    for key in (*NOT_IDENTITY, *without):
        parent, _, leaf = key.rpartition(".")
        node = plain
        for part in filter(None, parent.split(".")):
            node = node.get(part, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def _user_tags(cfg: DictConfig) -> dict[str, str]:
    """``tags`` from the command line (as the Lightning-Hydra template): a list (``tags=[dev,
    baseline]``) becomes ``tag.<name>=true`` plus ``segx.tags``; a mapping is set as given."""
    tags = cfg.get("tags")
    if not tags:
        return {}
    if OmegaConf.is_list(tags) or isinstance(tags, (list, tuple)):
        names = [str(t) for t in tags]
        return {"segx.tags": ", ".join(names), **{f"tag.{n}": "true" for n in names}}
    if OmegaConf.is_dict(tags):
        return {str(k): str(v) for k, v in tags.items()}
    raise SegxError(f"tags={tags!r} must be a list (tags=[dev,baseline]) or a mapping (tags={{owner:ana}})")


def _progress(desc: str):
    from segx.progress import progress

    return lambda items: progress(items, desc)


def _resume_target(cfg: DictConfig, client, experiment: str, identity: str, data_fingerprint: str) -> str | None:
    """The run ID to continue, or None for a fresh run. Only a run of the same config on the
    same data (same file contents) is continued: its earlier epochs saw that data."""
    from segx import tracking

    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        same = {tag_names.CONFIG_HASH: identity, tag_names.DATA_FINGERPRINT: data_fingerprint}
        for status in ("KILLED", "FAILED", "RUNNING"):
            runs = tracking.find_runs(client, experiment, "member", status, same)
            for run in runs:
                state = _checkpoint_dir(cfg, run.info.run_id) / "state.json"
                if state.exists() and not _owner_alive(state):
                    return run.info.run_id
                # Stopped before its first checkpoint (preempted within checkpoint_every_s, or a
                # full disk): its process ended it, so the run continues, from the first epoch.
                if (status == "KILLED" or MemberRun.of(run).disk_full) and not state.exists():
                    return run.info.run_id
        return None
    run = tracking.get_run(client, str(cfg.resume), need_finished=False)
    if run.info.status == "FINISHED":
        raise SegxError(f"resume={cfg.resume}: that run already FINISHED; nothing to resume")
    member = MemberRun.of(run)
    recorded = member.config_hash
    if recorded and recorded != identity:
        raise SegxError(
            f"resume={cfg.resume}: the run was started with another config (hash {recorded}, now "
            f"{identity}); repeat its overrides (see python -m segx.info run_id={cfg.resume})"
        )
    recorded = member.data_fingerprint
    if recorded and recorded != data_fingerprint:
        raise SegxError(
            f"resume={cfg.resume}: the data changed since that run started (fingerprint {recorded}, "
            f"now {data_fingerprint}); start a new run, or restore the data it was trained on"
        )
    no_checkpoint = not _checkpoint_dir(cfg, run.info.run_id).joinpath("state.json").exists()
    if no_checkpoint and member.disk_full:
        return run.info.run_id  # the disk filled before a checkpoint was complete: again from epoch 1
    if no_checkpoint:
        raise SegxError(
            f"resume={cfg.resume}: no checkpoint in {_checkpoint_dir(cfg, run.info.run_id)}; "
            "it died before its first epoch ended: start a new run"
        )
    return run.info.run_id


def _owner_alive(state: Path) -> bool:
    """Is the process that wrote this checkpoint still running here (a parallel member)?"""
    import socket

    try:
        data = json.loads(state.read_text())
        if data.get("host") != socket.gethostname() or not data.get("pid"):
            return False
        os.kill(int(data["pid"]), 0)
        return int(data["pid"]) != os.getpid()
    except (OSError, ValueError):
        return False


def _checkpoint_dir(cfg: DictConfig, run_id: str) -> Path:
    return Path(cfg.paths.output_dir) / "checkpoints" / run_id


def train_member(
    cfg: DictConfig, overrides: Sequence[str] | None = None, on_run: Callable[[str], None] | None = None
) -> MemberResult:
    """Train the member described by ``cfg``; return its run and scores.

    ``on_run(run_id)`` is called as soon as the run exists (a sweep names it even when the
    member then fails or is stopped).

    ``overrides``: the ``segx.train`` overrides that compose ``cfg`` (a caller that composed it,
    such as ``segx.ensemble ensemble.train_missing=true``); None: this ``segx.train`` job's own.
    They are recorded as the run's reproduce command (``segx.info``)."""
    validate_config(cfg)
    plan = _plan(cfg)
    from segx.workflows.prepare import prepare

    prepared = prepare(cfg.data, cfg.paths.output_dir, _progress("reading data"), cfg.get("fold"))

    from segx import tracking

    client = tracking.connect(str(cfg.mlflow.tracking_uri))
    experiment = tracking.experiment_id(client, str(cfg.mlflow.experiment_name), cfg.mlflow.artifact_root)
    resume_id = _resume_target(cfg, client, experiment, plan.identity, prepared.fingerprint)
    run_id, parent_id, overrides = _open_run(cfg, plan, client, experiment, prepared, resume_id, overrides)
    _tag_labels(client, run_id, plan)
    if on_run is not None:
        on_run(run_id)
    print(f"segx: member run {run_id} ({plan.run_name}) in experiment '{cfg.mlflow.experiment_name}'", flush=True)
    folder = _checkpoint_dir(cfg, run_id)
    metrics_on = bool(cfg.mlflow.get("system_metrics", False))
    with (
        tracking.run_scope(client, run_id, lambda: _remove_partial_checkpoints(folder)),
        tracking.system_metrics(run_id, str(cfg.mlflow.tracking_uri), metrics_on),
    ):
        _log_inputs(cfg, client, run_id, plan, prepared, resume_id)
        model, state, history = _fit(cfg, client, run_id, plan, prepared, resume_id, overrides)
        final_scores = _log_outputs(client, run_id, model, plan, prepared, history, state.best_epoch + 1)
        tracking.log_metrics(
            client, run_id, {keys.BEST_VAL_DICE: state.best_dice, keys.BEST_EPOCH: state.best_epoch + 1}
        )
        print(
            f"segx: {plan.run_name}: best epoch {state.best_epoch + 1} (curves/val_dice {state.best_dice:.4f}); "
            f"val/dice {final_scores.get(keys.VAL_DICE, float('nan')):.4f} on whole images at their own size",
            flush=True,
        )
    # Finished: the logged model is the member; the resumable checkpoint (weights and optimizer
    # state, several times the model's size) is only for runs that did not finish.
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    if parent_id is not None:  # after the fold's run is FINISHED, so the summary counts it
        _report_folds(client, experiment, parent_id, int(cfg.data.folds))
    return MemberResult(run_id, float(state.best_dice), final_scores)


def _plan(cfg: DictConfig) -> MemberPlan:
    """The member's plan, with every cheap check before a single image is read: the runtime
    (threads and devices, before TensorFlow's starts), sizes against the arch, the backbone's
    options, the augmentation pipeline."""
    from segx.training.resources import batch_per_device, cpu_cores, job_threads
    from segx.workflows.hydra_job import launcher_config

    threads = job_threads(cfg.trainer.threads, launcher_config(), os.environ, cpu_cores())
    from segx import models  # TensorFlow: threads and devices are set before its runtime starts

    strategy = models.configure_runtime(
        threads, str(cfg.trainer.accelerator), cfg.trainer.devices, cfg.trainer.strategy
    )
    if strategy is not None:
        batch_per_device(int(cfg.trainer.batch_size), strategy.num_replicas_in_sync)
    from segx.models import check_model_options
    from segx.objects import build_augmentation
    from segx.workflows.prepare import flip_swap_of, labels_of, pixel_spacing

    view = View.from_data_config(cfg.data)
    backbone, arch = str(cfg.backbone.name), str(cfg.arch.name)
    check_model_options(arch, backbone, view.size, "data.patch_size" if view.mode == "patch" else "data.image_size")
    pipeline = build_augmentation(cfg.augment.transforms)
    labels = labels_of(cfg.data)
    swap = flip_swap_of(cfg.data, labels, OmegaConf.to_container(cfg.augment.transforms, resolve=True) or ())
    fold = cfg.get("fold")
    base_name = cfg.mlflow.run_name or f"{backbone}-{arch}-s{cfg.seed}"
    return MemberPlan(
        arch=arch,
        backbone=backbone,
        arch_options=OmegaConf.to_container(cfg.arch.options, resolve=True),
        view=view,
        labels=labels,
        flip_swap=swap,
        augmentation=pipeline,
        fold=fold,
        base_name=base_name,
        run_name=base_name if fold is None else f"{base_name}-fold{fold}",
        identity=config_identity(cfg),
        fit=fit_settings(cfg, view, labels, threads),
        strategy=strategy,
        precision=cfg.trainer.get("precision"),
        spacing=pixel_spacing(cfg.data),
    )


def fit_settings(cfg: DictConfig, view: View, labels: Labels | None, threads: int | None) -> FitSettings:
    """How the member is fitted: the ``trainer`` section and the seed, as plain values."""
    verbose = cfg.trainer.verbose
    if verbose == "auto":  # a log gets segx's own line per epoch only, a terminal Keras's bar too
        verbose = 1 if sys.stdout.isatty() else 0
    return FitSettings(
        epochs=int(cfg.trainer.epochs),
        batch_size=int(cfg.trainer.batch_size),
        seed=int(cfg.seed),
        patience=int(cfg.trainer.early_stopping.patience),
        min_delta=float(cfg.trainer.early_stopping.min_delta),
        verbose=int(verbose),
        samples_per_epoch=cfg.data.get("samples_per_epoch") if view.mode == "patch" else None,
        threads=threads,
        checkpoint_every_s=float(cfg.trainer.get("checkpoint_every_s") or 0.0),
        val_every=int(cfg.trainer.get("val_every") or 1),
        task=task_for(labels),
    )


def _tag_labels(client, run_id: str, plan: MemberPlan) -> None:
    """The member's classes as a run tag: the ensemble names its classes from here (its members' own)."""
    from segx import tracking

    task = task_for(plan.labels)
    # no_flip_tta: regions the swap maps onto no region: no flip-TTA cache, and segx.inference.tta says why
    record = task.labels_record(*task.flip_outputs(plan.flip_swap))
    if record is not None:  # one structure tags none
        tracking.set_tags(client, run_id, {tag_names.LABELS: json.dumps(record)})


def _log_inputs(cfg: DictConfig, client, run_id: str, plan: MemberPlan, prepared, resume_id: str | None) -> None:
    """What the member is trained from: params, split sizes, the split as an MLflow dataset, the
    recorded config, the augmentation and the split file."""
    from segx import tracking
    from segx.training.augment import save_augmentation

    recorded = recorded_container(cfg)  # values from the environment as written, not their values
    tracking.log_params(client, run_id, tracking.flatten(recorded))
    train, val, test = (prepared.part(r) for r in ("train", "val", "test"))
    sizes = {"data.n_train": len(train.stems), "data.n_val": len(val.stems), "data.n_test": len(test.stems)}
    tracking.log_params(client, run_id, sizes)
    if not resume_id:  # the split as an MLflow dataset, digest = the data fingerprint
        tracking.log_dataset(
            client,
            run_id,
            str(cfg.data.name),
            prepared.fingerprint,
            str(cfg.data.root),
            {**sizes, "split_file": str(prepared.split_path)},
        )
    with tempfile.TemporaryDirectory(prefix="segx-") as tmp:
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(recorded)))
        save_augmentation(plan.augmentation, tmp / "augmentation.json")
        tracking.log_artifact(client, run_id, tmp / "config.yaml")
        tracking.log_artifact(client, run_id, tmp / "augmentation.json")
        tracking.log_artifact(client, run_id, prepared.split_path, "split")


def _fit(cfg: DictConfig, client, run_id: str, plan: MemberPlan, prepared, resume_id, overrides):
    """(the trained model holding its best weights, its FitState, the curves' history): the
    network built and fitted in the strategy's scope, its epochs logged to the run."""
    from segx import models
    from segx.training.fit import fit_member

    models.set_determinism(plan.fit.seed, bool(cfg.trainer.deterministic))
    models.set_precision(cfg.trainer.precision)
    folder = _checkpoint_dir(cfg, run_id)
    with contextlib.ExitStack() as stack:
        # Variables are created in the strategy's scope (mirrored on every device), and so is the
        # optimizer's state; fit then splits each batch across the devices.
        scope = plan.strategy.scope() if plan.strategy is not None else contextlib.nullcontext()
        stack.callback(models.set_precision, None)  # the next member in this process starts float32
        stack.enter_context(scope)
        model, extra = _compiled_network(cfg, plan)
        history: dict[str, list[tuple[int, float]]] = {}  # key -> (epoch, value), for curves.png
        epoch_log, log_epoch = _epoch_logging(cfg, client, run_id, folder, resume_id, plan.run_name, history)
        data = _fit_data(cfg, plan, prepared)
        state = fit_member(model, data, plan.backbone, folder, plan.fit, extra_callbacks=extra, log_fn=log_epoch)
        epoch_log.flush(float(cfg.mlflow.get("offline_wait", 300)), _resume_advice(folder, run_id, overrides))
    # Out of the strategy's scope from here: outputs are predicted on one device.
    return model, state, history


def _epoch_logging(cfg: DictConfig, client, run_id: str, folder: Path, resume_id, run_name: str, history: dict):
    """(the run's EpochLog, ``log_epoch(metrics, step)``): each epoch's metrics to MLflow, to
    ``history`` (for curves.png) and as one printed line with the time left."""
    from segx import tracking
    from segx.progress import EpochClock

    # A tracking server that goes away does not stop training: the epoch's metrics are kept
    # (also beside the checkpoint, for a resume) and sent with the next epoch's.
    epoch_log = tracking.EpochLog(client, run_id, folder / "unsent-metrics.json")

    # Epochs a resumed run repeats (those after its last checkpoint) were logged before, with
    # the same values (training is deterministic): they are not logged twice.
    logged_until = 0
    if resume_id:
        sent = client.get_metric_history(run_id, keys.TRAIN_LOSS)
        logged_until = max(
            [m.step for m in sent] + [int(m[3]) for m in epoch_log.pending if m[0] == keys.TRAIN_LOSS], default=0
        )
    clock = EpochClock(int(cfg.trainer.epochs), first_epoch=logged_until + 1)

    def log_epoch(metrics: dict, step: int) -> None:
        if step <= logged_until:
            return
        epoch_log.log(metrics, step)
        for key, value in metrics.items():
            history.setdefault(key, []).append((step, value))
        if keys.TRAIN_LOSS in metrics:  # one line per epoch: where the training is, and how long it has left
            val = f", val dice {metrics[keys.curve('val/dice')]:.4f}" if keys.curve("val/dice") in metrics else ""
            print(
                f"segx: {run_name} epoch {step}/{cfg.trainer.epochs}: train loss {metrics[keys.TRAIN_LOSS]:.4f}{val}; "
                f"{clock.line(step)}",
                flush=True,
            )

    return epoch_log, log_epoch


def _compiled_network(cfg: DictConfig, plan: MemberPlan):
    """The member's network, compiled with its optimizer and loss (one sigmoid, a K-way softmax,
    or one sigmoid per region), and the extra callbacks (the learning-rate schedule)."""
    from segx import models

    task = task_for(plan.labels)
    model = models.build_model(
        plan.arch,
        plan.backbone,
        plan.size,
        encoder_weights=cfg.backbone.encoder_weights,
        encoder_freeze=bool(cfg.backbone.encoder_freeze),
        head=models.Head(classes=task.n_outputs, activation=task.activation),
        **plan.arch_options,
    )
    model = models.float32_outputs(model)
    models.set_bn_momentum(model, cfg.trainer.bn_momentum)
    optimizer = instantiate(cfg.trainer.optimizer, "trainer.optimizer")
    class_weights = cfg.trainer.get("class_weights")
    models.compile_model(
        model,
        optimizer,
        OmegaConf.to_container(cfg.trainer.loss, resolve=True),
        n_classes=task.n_outputs,
        class_weights=None if class_weights is None else list(class_weights),
        regions=None if task.region_members is None else [list(m) for m in task.region_members],
    )
    extra = []
    if cfg.trainer.lr_schedule is not None:
        extra.append(instantiate(cfg.trainer.lr_schedule, "trainer.lr_schedule"))
    return model, extra


def _fit_data(cfg: DictConfig, plan: MemberPlan, prepared) -> FitData:
    """What the member is fitted on: arrays at model size in resize mode; in patch mode a patch
    sampler over the cached cases (masks None) and one fixed patch per validation case."""
    from segx.training.augment import SeededAugmenter
    from segx.training.fit import FitData

    view, labels = plan.view, plan.labels
    augmenter = SeededAugmenter(plan.augmentation, plan.flip_swap)
    if view.mode != "patch":
        train, val = prepared.part("train"), prepared.part("val")
        return FitData(train.images, train.masks, augmenter, val.images, val.masks)
    from segx.training.patches import PatchSampler, validation_patches

    sampler = PatchSampler(
        prepared.cases("train", view.scale),
        view.size,
        float(cfg.data.foreground_fraction),
        task_for(labels).n_classes,
    )
    val_images, val_masks = validation_patches(prepared.cases("val", view.scale), view.size)
    return FitData(sampler, None, augmenter, val_images, val_masks)


def _open_run(
    cfg: DictConfig,
    plan: MemberPlan,
    client,
    experiment: str,
    prepared,
    resume_id: str | None,
    overrides: Sequence[str] | None,
) -> tuple[str, str | None, list[str] | None]:
    """The member's run, created (tags, description) or reopened for a resume, and a fold's
    cross-validation parent; (run ID, parent run ID or None, the overrides it records)."""
    from segx import tracking
    from segx.tracking import provenance

    tags = {
        tracking.ROLE: "member",
        tag_names.BACKBONE: plan.backbone,
        tag_names.ARCH: plan.arch,
        **prepared.fingerprint_tags,  # segx.data_fingerprint and its parts (split, files)
        tag_names.CONFIG_HASH: plan.identity,
        tag_names.COMMAND: provenance.command_line(),
        **provenance.provenance_tags(),
        **_user_tags(cfg),
        # Where it ran: TensorFlow's threads (the launcher's share of the cores) and devices.
        **plan.placement,
    }
    overrides = provenance.job_overrides("train") if overrides is None else [str(o) for o in overrides]
    if overrides is not None:  # exactly this member's overrides: what segx.info's reproduce prints
        tags[tag_names.OVERRIDES] = json.dumps(overrides)
        tags[tag_names.REPRODUCE] = provenance.member_reproduce(overrides)
    if resume_id:
        run_id = resume_id
        tracking.reopen_run(client, run_id)
        tracking.set_tags(client, run_id, {tag_names.RESUMED: "true"})
        log.info("resuming run %s", run_id)
    else:
        run_id = tracking.start_run(client, experiment, plan.run_name, tags, _run_note(cfg, plan, prepared, tags))
    parent_id = None
    if plan.fold is not None:
        from segx.tracking import cv

        folds = int(cfg.data.folds)
        parent_id = cv.parent_run(
            client,
            experiment,
            cv.CrossValidation(config_identity(cfg, ("fold",)), prepared.cv_tags["segx.cv_fingerprint"], folds),
            f"{plan.base_name}-cv{folds}",
            {k: v for k, v in tags.items() if k in (tag_names.BACKBONE, tag_names.ARCH, tag_names.COMMAND)},
            Path(cfg.paths.output_dir) / "locks",
        )
        tracking.set_tags(client, run_id, {cv.PARENT_TAG: parent_id, cv.PARENT_RUN_ID: parent_id})
    return run_id, parent_id, overrides


def _run_note(cfg: DictConfig, plan: MemberPlan, prepared, tags: dict[str, str]) -> str:
    """The new run's description: what the member is, how it sees images, how to reproduce it."""
    train, val, test = (prepared.part(r) for r in ("train", "val", "test"))
    what = (
        f"fold {plan.fold} of {cfg.data.folds} of a cross-validated configuration"
        if plan.fold is not None
        else "an ensemble member"
    )
    note = (
        f"segx member ({what}): {plan.arch} with a {plan.backbone} encoder, trained on {len(train.stems)} cases, "
        f"validated on {len(val.stems)}, tested on {len(test.stems)}; sees images "
        f"{plan.view.describe()}; val/* and test/* are scored at each image's own size.\n\nCommand: `{tags[tag_names.COMMAND]}`"
        + (f"\n\nReproduce: `{tags[tag_names.REPRODUCE]}`" if tag_names.REPRODUCE in tags else "")
    )
    if cfg.get("note"):
        note = f"{cfg.note}\n\n{note}"  # the user's words first
    return note


def _report_folds(client, experiment: str, parent_id: str, folds: int) -> None:
    """Update the cross-validation parent's summary and say how far the folds are."""
    from segx.tracking import cv

    summary = cv.update_summary(client, experiment, parent_id)
    done = folds - len(summary["missing"])
    oof = summary["metrics"].get("cv/oof_dice")
    print(
        f"segx: cross-validation {parent_id}: {done}/{folds} folds finished"
        + (f", out-of-fold Dice {oof:.4f}" if oof is not None else f", missing {summary['missing']}"),
        flush=True,
    )


def _remove_partial_checkpoints(folder: Path) -> None:
    """After a full disk: the checkpoint files being written when it filled (TensorFlow's
    ``*_temp`` folders), and the whole folder if it holds no complete checkpoint (state.json)."""
    import shutil

    if not (folder / "state.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in sorted(folder.rglob("*_temp"), reverse=True):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for path in folder.rglob("*.tempstate*"):
        path.unlink(missing_ok=True)


def _resume_advice(folder: Path, run_id: str, overrides: Sequence[str] | None) -> str:
    """What to do when the server stays away after training: the exact command that continues."""
    from segx.tracking import provenance

    overrides = sys.argv[1:] if overrides is None else overrides
    command = provenance.reproduce_command(
        "segx.train", [*(o for o in overrides if not o.startswith("resume=")), f"resume={run_id}"]
    )
    return f"the checkpoint is kept in {folder}; once the server answers, continue with: {command}"


def _log_outputs(client, run_id, model, plan: MemberPlan, prepared, history, best_epoch=None) -> dict[str, float]:
    """Model, cached probabilities, final metrics and figures, as artifacts of the run.

    Validation and test cases are predicted whole, at each image's own size, the way the member
    sees images (resized, or a sliding window over patches), and scored there against the
    original masks: what the ensemble search reads and what ``segx.predict`` computes.
    """
    from segx import tracking
    from segx.evaluation import plots
    from segx.progress import stage

    spec, view = plan.spec(), plan.view
    with tempfile.TemporaryDirectory(prefix="segx-") as tmp:
        tmp = Path(tmp)
        stage("training done: saving the model and logging it to MLflow")
        model = _log_model(client, run_id, model, spec, tmp, _volumes_record(prepared))
        if prepared.volumes is not None:
            tracking.set_tags(client, run_id, {tag_names.VOLUMES: prepared.volumes.folder.name})
        final = {}
        for role in ("val", "test"):
            cases = prepared.cases(role)
            if cases:
                volumes = _volumes_record(prepared)
                final.update(_cache_and_score(model, spec, role, cases, tmp, plan.spacing, volumes))
        stage("uploading the cached probabilities; drawing the figures")
        tracking.log_artifact(client, run_id, tmp / "predictions", "predictions")
        if history:
            full = _history_from_store(client, run_id) or history
            n_val = len(prepared.cases("val"))
            where = "one fixed patch per case" if view.mode == "patch" else f"{view.size} px"
            plots.plot_curves(
                full, tmp / "plots" / "curves.png", best_epoch, f"validation split ({n_val} cases, {where})"
            )
        tracking.log_artifact(client, run_id, tmp / "plots", "plots")
        tracking.log_metrics(client, run_id, final)
    return final


def _volumes_record(prepared) -> dict | None:
    """A volume dataset's slice plan and each case's grid (``model/volumes.json``): how
    ``segx.predict`` slices a scan exactly as training did, and how the ensemble puts the test
    slices back together into volumes scored in 3D."""
    if prepared.volumes is None:
        return None
    return {
        "plan": prepared.volumes.plan.to_json(),
        "cases": prepared.volumes.cases,
        "nsd_tolerance_mm": prepared.volumes.nsd_tolerance_mm,
    }


def _log_model(client, run_id: str, model, spec: MemberSpec, tmp: Path, volumes: dict | None = None):
    """The member saved (weights, spec.json, model.keras, and for volumes volumes.json) as the
    run's ``model`` artifact and logged as an MLflow model; returns the network to predict with."""
    from segx import models, tracking

    models.save_member(model, tmp / "model", spec)
    if volumes is not None:
        (tmp / "model" / "volumes.json").write_text(json.dumps(volumes, indent=1))
    tracking.log_artifact(client, run_id, tmp / "model", "model")
    if spec.precision == "mixed_float16":
        # Trained in float16: predict with the float32 network that segx.predict rebuilds
        # from these weights, so the caches the search reads are what prediction computes.
        model = models.load_member(tmp / "model")
    experiment = client.get_run(run_id).info.experiment_id
    view = spec.view.to_dict()
    labels = task_for(spec.labels).labels_record(spec.flip_swap)  # the classes and their flip swap; None: one structure
    tracking.log_member_model(
        client,
        run_id,
        experiment,
        f"{spec.backbone}-{spec.arch}",
        {"arch": spec.arch, "backbone": spec.backbone, **{f"view.{k}": v for k, v in view.items()}},
        {
            "backbone": spec.backbone,
            "arch": spec.arch,
            "view": view,
            **({"labels": labels} if labels is not None else {}),
        },
    )
    return model


def _cache_and_score(model, spec: MemberSpec, role: str, cases, tmp: Path, spacing, volumes=None) -> dict[str, float]:
    """The role's cases predicted whole (every TTA mode), their probabilities cached for the
    ensemble, scored (the role's final metrics), and for validation its figure of cases.

    ``volumes`` (a volume dataset's record): a case is a patient's scan, so each volume's slices,
    predicted one by one, are cached, searched and scored as one case (stacked along rows:
    counts are the volume's, distances measured in 3D in mm)."""
    from segx import models
    from segx.data.ragged import Ragged
    from segx.ensembling.probs import cache_artifact, save_cached
    from segx.evaluation import plots
    from segx.inference.predictor import member_probs
    from segx.progress import progress

    view, labels = spec.view, spec.labels
    task = task_for(labels)
    # One cache per TTA mode, so an ensemble with ensemble.tta=flip chooses its weights,
    # threshold and post-processing on the probabilities segx.predict will compute.
    what = "validation" if role == "val" else "test"
    images = progress(
        (np.asarray(c.image()) for c in cases),
        f"{what} cases at their own size ({view.describe()}), probabilities cached for the ensemble",
        total=len(cases),
    )
    swap = None if spec.flip_swap is None else list(spec.flip_swap)
    modes = ("none",) if spec.no_flip_tta else models.TTA_MODES
    by_mode = member_probs(model, spec.backbone, view, images, modes, swap)
    # Label maps of class indices (several classes, regions) or bool masks (one structure).
    masks = Ragged.from_list([np.asarray(c.mask(), task.truth_dtype) for c in cases], task.truth_dtype)
    previews = [plots.thumbnail(np.asarray(c.image())) for c in cases]  # every case: figures pick any
    stems = [c.stem for c in cases]
    if volumes is not None:
        from segx.data.volume_prep import group_slices
        from segx.scoring.stacked import StackedVolumes

        stems, counts = group_slices(stems)
        by_mode = {mode: probs.stacked(counts) for mode, probs in by_mode.items()}
        masks = masks.stacked(counts)
        starts = np.cumsum([0, *counts[:-1]])
        previews = [previews[start + count // 2] for start, count in zip(starts, counts, strict=True)]  # mid slice
        spacing = StackedVolumes.of(volumes, stems)
    for mode, mode_probs in by_mode.items():
        save_cached(
            tmp / cache_artifact(role, mode), stems, mode_probs, masks, previews, task.class_names, task.region_names
        )
    # The member's own metrics and figure: no TTA, alone (at 0.5, or by argmax).
    pred = task.member_label_maps(by_mode["none"])
    scores = task.case_metrics(pred, masks, spacing, with_hd95=(role == "test"))
    if role == "val":
        shown, row_labels = plots.pick_cases(scores["dice"])
        plots.plot_cases(
            plots.ShownCases(
                [previews[i] for i in shown],
                [masks[i] for i in shown],
                {"prediction": [pred[i] for i in shown]},
                [stems[i] for i in shown],
                {"prediction": scores["dice"][shown]},
                row_labels=row_labels,
            ),
            tmp / "plots" / "val_cases.png",
            title=f"validation split: worst and typical of {len(stems)} cases ({task.member_rule})",
            classes=task.class_names,
            colours=task.palette,
        )
    # val/dice, test/dice, ...: the ensemble logs its own on the same keys (one chart for all)
    return task.final_metrics(role, scores)


def _history_from_store(client, run_id) -> dict[str, list[tuple[int, float]]]:
    """Whole per-epoch history (a resumed run holds epochs from before the interruption)."""
    out = {}
    for key in map(keys.curve, ("train/loss", "val/loss", "val/dice", "val/iou", "train/dice", "lr")):
        values = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if values:
            out[key] = [(m.step, m.value) for m in values]
    return out
