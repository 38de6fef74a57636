"""Member networks: build, compile, load, predict. Library functions with plain arguments.

All TensorFlow/Keras/segmentation_models access goes through :mod:`segx.backend`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segx.backend import keras, sm, tf
from segx.data.labels import mask_rule
from segx.errors import SegxError, look_up_option
from segx.member_spec import MemberSpec
from segx.tta import TTA_MODES

ARCHS = {"unet": "Unet", "fpn": "FPN", "linknet": "Linknet", "pspnet": "PSPNet"}
# Encoders downsample 5 times (32); PSPNet pools a 1/8 feature map at 1, 2, 3 and 6 bins.
SIZE_MULTIPLE = {"unet": 32, "fpn": 32, "linknet": 32, "pspnet": 48}
# Keras' Inception stems refuse inputs below 75 px.
MIN_SIZE = {"inceptionv3": 75, "inceptionresnetv2": 75}
LOSSES: Mapping[str, Callable] = {
    "dice": lambda: sm.losses.DiceLoss(),
    "bce": lambda: sm.losses.BinaryCELoss(),
    "focal": lambda: sm.losses.BinaryFocalLoss(),
    "jaccard": lambda: sm.losses.JaccardLoss(),
}
INFERENCE_BATCH = 8
_FORWARD: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # fixed, so cached and rebuilt predictions go through identical kernels


def backbone_names() -> list[str]:
    return list(sm.Backbones.models_names())


def check_model_options(arch: str, backbone: str, image_size: int, key: str = "data.image_size") -> None:
    """Validate names and input size (the setting ``key``) before anything heavy is built."""
    look_up_option(arch, ARCHS, "arch", "conf/arch/")
    look_up_option(backbone, backbone_names(), "segmentation-models encoder", "backbone.name")
    multiple = SIZE_MULTIPLE[arch]
    smallest = MIN_SIZE.get(backbone, 0)
    if image_size < smallest:
        fit = -(-smallest // multiple) * multiple
        raise SegxError(
            f"{key}={image_size} is too small for backbone={backbone} (needs >= {smallest}); use {key}={fit}"
        )
    if image_size % multiple:
        lower = max(multiple, image_size - image_size % multiple)
        raise SegxError(
            f"{key}={image_size} does not suit arch={arch}: it needs a multiple of "
            f"{multiple}; use {key}={lower} or {lower + multiple}"
        )


@dataclass(frozen=True)
class Head:
    """A network's output layer: ``classes`` channels through ``activation`` (one sigmoid for one
    structure, a K-way softmax for classes, one sigmoid per region)."""

    classes: int = 1
    activation: str = "sigmoid"


def build_model(
    arch: str,
    backbone: str,
    image_size: int,
    encoder_weights: str | None = None,
    encoder_freeze: bool = False,
    head: Head = Head(),
    **arch_kwargs,
):
    """A segmentation_models network for ``(image_size, image_size, 3)`` inputs, ``head`` its outputs.

    ``encoder_weights``: None (random init), ``'imagenet'`` (downloaded by Keras, needs
    internet) or a path to a local ``.h5`` weights file for the encoder (loaded by layer name).
    """
    check_model_options(arch, backbone, image_size)
    local_weights = None
    if encoder_weights not in (None, "imagenet"):
        local_weights = Path(str(encoder_weights)).expanduser()
        if not local_weights.is_file():
            raise SegxError(
                f"backbone.encoder_weights={encoder_weights}: no such file; give a local .h5 "
                "weights file, 'imagenet' or null"
            )
        encoder_weights = None
    factory = getattr(sm, ARCHS[arch])
    arch_kwargs = {k: v for k, v in arch_kwargs.items() if v is not None}
    try:
        model = factory(
            backbone,
            input_shape=(image_size, image_size, 3),
            classes=head.classes,
            activation=head.activation,
            encoder_weights=encoder_weights,
            encoder_freeze=encoder_freeze,
            **arch_kwargs,
        )
    except Exception as exc:
        if encoder_weights == "imagenet":
            raise SegxError(
                f"could not get imagenet weights for {backbone} ({type(exc).__name__}: {exc}); "
                "without internet set backbone.encoder_weights to a local .h5 file or null"
            ) from None
        raise
    if local_weights is not None:
        load_encoder_weights(model, local_weights)
    return model


def set_bn_momentum(model, momentum: float | None) -> int:
    """Set every BatchNormalization layer's moving-average momentum; returns how many.

    Encoders ship with 0.99-0.999, tuned for ImageNet-length training. On a few hundred
    steps the moving statistics then lag far behind the weights, and inference-mode
    predictions (validation, deployment) collapse even while training Dice is high.
    """
    if momentum is None:
        return 0
    count = 0
    for layer in model.submodules:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)
            count += 1
    return count


def load_encoder_weights(model, path: Path) -> int:
    """Load weights by layer name; returns how many layers changed (error if none did)."""
    before = [w.numpy().copy() for w in model.weights]
    try:
        model.load_weights(str(path), by_name=True, skip_mismatch=True)
    except Exception as exc:
        raise SegxError(f"{path}: cannot read weights ({type(exc).__name__}); give a Keras .h5 file") from None
    changed = sum(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights, strict=True))
    if changed == 0:
        raise SegxError(f"{path}: no layer name matched this encoder; use the weights file made for this backbone")
    return changed


def build_loss(weights: Mapping[str, float]):
    """Weighted sum of segmentation_models losses, e.g. ``{'dice': 1, 'focal': 1}``."""
    total = None
    for name, weight in weights.items():
        if not weight:
            continue
        term = LOSSES[look_up_option(name, LOSSES, "loss", "trainer.loss")]()
        term = term if weight == 1 else float(weight) * term
        total = term if total is None else total + term
    if total is None:
        raise SegxError("trainer.loss has no term with a non-zero weight; e.g. trainer.loss.dice=1")
    return total


# Losses for several classes (softmax outputs against label maps of class indices, with
# IGNORE_INDEX left out): nnU-Net's default is Dice over the foreground classes plus
# cross-entropy. 'bce' is read as the categorical cross-entropy, so a binary loss config
# carries over unchanged.
CLASS_LOSSES = ("dice", "ce", "bce", "focal")


def build_class_loss(n_classes: int, weights: Mapping[str, float], class_weights=None):
    """Loss of softmax probabilities (B, S, S, K) against label maps (B, S, S, 1) holding class
    indices, pixels of :data:`segx.data.labels.IGNORE_INDEX` excluded from every term.

    ``weights``: ``{'dice': 1, 'ce': 1}`` (``bce`` is an alias of ``ce``; ``focal`` is the
    categorical focal loss, gamma 2). ``class_weights``: one factor per class for the
    cross-entropy/focal terms and the foreground Dice mean (None: all 1). Dice is the soft
    Dice of each foreground class over the batch (nnU-Net's batch Dice), averaged."""
    from segx.data.labels import IGNORE_INDEX

    k = int(n_classes)
    terms = {}
    for name, weight in weights.items():
        if not weight:
            continue
        name = look_up_option(name, CLASS_LOSSES, "loss for several classes", "trainer.loss")
        if name == "bce":
            name = "ce"
        terms[name] = terms.get(name, 0.0) + float(weight)
    if not terms:
        raise SegxError("trainer.loss has no term with a non-zero weight; e.g. trainer.loss.dice=1")
    cw = np.ones(k, np.float32) if class_weights is None else np.asarray(class_weights, np.float32)
    if cw.shape != (k,) or not np.all(np.isfinite(cw)) or np.any(cw < 0) or not cw[1:].sum() > 0:
        raise SegxError(
            f"trainer.class_weights=[{', '.join(f'{x:g}' for x in np.ravel(cw))}] must give {k} non-negative factors (one per class "
            "of data.labels, background first), not all zero on the foreground"
        )
    eps = 1e-7

    def loss(y_true, y_pred):
        labels = tf.cast(tf.round(y_true[..., 0]), tf.int32)
        valid = tf.cast(tf.not_equal(labels, IGNORE_INDEX), y_pred.dtype)
        onehot = tf.one_hot(tf.where(labels == IGNORE_INDEX, 0, labels), k, dtype=y_pred.dtype) * valid[..., None]
        p = tf.clip_by_value(y_pred, eps, 1.0 - eps)
        weights_c = tf.constant(cw, y_pred.dtype)
        n_valid = tf.maximum(tf.reduce_sum(valid), 1.0)
        total = tf.constant(0.0, y_pred.dtype)
        if "ce" in terms:
            ce = -tf.reduce_sum(onehot * tf.math.log(p) * weights_c, axis=-1)
            total += terms["ce"] * tf.reduce_sum(ce) / n_valid
        if "focal" in terms:
            focal = -tf.reduce_sum(onehot * tf.square(1.0 - p) * tf.math.log(p) * weights_c, axis=-1)
            total += terms["focal"] * tf.reduce_sum(focal) / n_valid
        if "dice" in terms:
            masked = y_pred * valid[..., None]
            inter = tf.reduce_sum(onehot * masked, axis=(0, 1, 2))
            denom = tf.reduce_sum(onehot, axis=(0, 1, 2)) + tf.reduce_sum(masked, axis=(0, 1, 2))
            dice = (2.0 * inter + 1.0) / (denom + 1.0)
            fg = weights_c[1:]
            total += terms["dice"] * (1.0 - tf.reduce_sum(dice[1:] * fg) / tf.reduce_sum(fg))
        return total

    loss.__name__ = "class_loss"
    return loss


def build_region_loss(regions, weights: Mapping[str, float]):
    """Loss of one sigmoid per region (B, S, S, R) against label maps (B, S, S, 1) of class
    indices (nnU-Net's region-based training): each region's target is "the pixel's class is one
    of the region's"; soft Dice per region over the batch, averaged, plus binary cross-entropy
    (``bce``/``ce``) and focal (``focal``); ignored pixels count in no term."""
    from segx.data.labels import IGNORE_INDEX

    terms = {}
    for name, weight in weights.items():
        if not weight:
            continue
        name = look_up_option(name, CLASS_LOSSES, "loss for regions", "trainer.loss")
        name = "ce" if name == "bce" else name
        terms[name] = terms.get(name, 0.0) + float(weight)
    if not terms:
        raise SegxError("trainer.loss has no term with a non-zero weight; e.g. trainer.loss.dice=1")
    table = np.zeros((256, len(regions)), np.float32)
    for r, members in enumerate(regions):
        table[list(members), r] = 1.0
    eps = 1e-7

    def loss(y_true, y_pred):
        labels = tf.cast(tf.round(y_true[..., 0]), tf.int32)
        valid = tf.cast(tf.not_equal(labels, IGNORE_INDEX), y_pred.dtype)[..., None]
        target = tf.gather(tf.constant(table, y_pred.dtype), labels) * valid
        p = tf.clip_by_value(y_pred, eps, 1.0 - eps)
        n_valid = tf.maximum(tf.reduce_sum(valid) * len(regions), 1.0)
        total = tf.constant(0.0, y_pred.dtype)
        if "ce" in terms:
            bce = -(target * tf.math.log(p) + (1.0 - target) * tf.math.log(1.0 - p)) * valid
            total += terms["ce"] * tf.reduce_sum(bce) / n_valid
        if "focal" in terms:
            pt = target * p + (1.0 - target) * (1.0 - p)
            total += terms["focal"] * tf.reduce_sum(-tf.square(1.0 - pt) * tf.math.log(pt) * valid) / n_valid
        if "dice" in terms:
            masked = y_pred * valid
            inter = tf.reduce_sum(target * masked, axis=(0, 1, 2))
            denom = tf.reduce_sum(target, axis=(0, 1, 2)) + tf.reduce_sum(masked, axis=(0, 1, 2))
            total += terms["dice"] * (1.0 - tf.reduce_mean((2.0 * inter + 1.0) / (denom + 1.0)))
        return total

    loss.__name__ = "region_loss"
    return loss


def build_class_metrics(n_classes: int) -> list:
    """Training-curve metric for several classes: the batch's mean foreground Dice of the
    argmax labels (ignored pixels left out)."""
    from segx.data.labels import IGNORE_INDEX

    k = int(n_classes)

    def dice(y_true, y_pred):
        labels = tf.cast(tf.round(y_true[..., 0]), tf.int32)
        valid = tf.cast(tf.not_equal(labels, IGNORE_INDEX), tf.float32)[..., None]
        truth = tf.one_hot(tf.where(labels == IGNORE_INDEX, 0, labels), k) * valid
        pred = tf.one_hot(tf.argmax(y_pred, axis=-1), k) * valid
        inter = tf.reduce_sum(truth * pred, axis=(0, 1, 2))
        denom = tf.reduce_sum(truth, axis=(0, 1, 2)) + tf.reduce_sum(pred, axis=(0, 1, 2))
        return tf.reduce_mean(((2.0 * inter + 1e-6) / (denom + 1e-6))[1:])

    return [dice]


def build_metrics(names) -> list:
    table = {
        "dice": lambda: sm.metrics.FScore(threshold=0.5, name="dice"),
        "iou": lambda: sm.metrics.IOUScore(threshold=0.5, name="iou"),
    }
    return [table[look_up_option(n, table, "metric", "trainer.metrics")]() for n in names]


def compile_model(
    model,
    optimizer,
    loss_weights: Mapping[str, float],
    metrics=("dice", "iou"),
    n_classes: int = 1,
    class_weights=None,
    regions=None,
):
    """Compile with segx's loss: segmentation_models' binary losses for one structure,
    :func:`build_class_loss` for ``n_classes`` > 1 (a softmax member), or :func:`build_region_loss`
    for ``regions`` (lists of class indices: one sigmoid per region)."""
    if regions:
        model.compile(optimizer=optimizer, loss=build_region_loss(regions, loss_weights))
    elif n_classes > 1:
        loss = build_class_loss(n_classes, loss_weights, class_weights)
        model.compile(optimizer=optimizer, loss=loss, metrics=build_class_metrics(n_classes))
    else:
        model.compile(optimizer=optimizer, loss=build_loss(loss_weights), metrics=build_metrics(metrics))
    return model


def save_member(model, folder: str | os.PathLike, spec: MemberSpec) -> Path:
    """Write a member as ``folder/{weights.h5, spec.json, model.keras}``.

    ``spec`` (arch, backbone, image_size, options) plus the weights rebuild the network in about
    a second without running any code from the file; ``model.keras`` is the same network in
    Keras' own format for use outside segx (``keras.models.load_model(path, compile=False)``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(folder / "weights.h5"))
    spec.write(folder / "spec.json")
    # For deployment, not for training on: without the optimizer's state (Adam's two moments
    # tripled the file). tf-keras' .keras format has no include_optimizer, so an uncompiled
    # clone with the same weights is saved.
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    plain.save(str(folder / "model.keras"))
    return folder


def load_member(folder: str | os.PathLike):
    """Rebuild a member saved by :func:`save_member` (uncompiled; recompile to train further)."""
    folder = Path(folder)
    spec_path, weights = folder / "spec.json", folder / "weights.h5"
    if not spec_path.is_file() or not weights.is_file():
        raise SegxError(f"{folder}: member model incomplete (needs spec.json and weights.h5); retrain the member")
    try:
        spec = MemberSpec.read(spec_path)
        # One structure: a sigmoid; several classes: a K-way softmax (the spec names the classes);
        # regions: one sigmoid each.
        rule = mask_rule(spec.labels)
        model = build_model(
            spec.arch,
            spec.backbone,
            spec.image_size,
            None,
            False,
            Head(rule.n_outputs, rule.activation),
            **spec.options,
        )
        model.load_weights(str(weights))
    except SegxError:
        raise
    except Exception as exc:
        raise SegxError(
            f"{folder}: cannot rebuild the member ({type(exc).__name__}: {str(exc)[:200]}); retrain it"
        ) from None
    return model


def load_keras_model(path: str | os.PathLike):
    """Load a ``model.keras`` file, uncompiled, in Keras safe mode (no code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise SegxError(f"{path}: model file missing; the member run has no model artifact")
    return keras.models.load_model(str(path), compile=False, safe_mode=True)


def preprocessing(backbone: str) -> Callable[[np.ndarray], np.ndarray]:
    """The encoder's input normalisation, on float32 RGB in [0, 255]."""
    return sm.get_preprocessing(backbone)


def loss_value(model, probs: np.ndarray, masks: np.ndarray) -> float:
    """The compiled training loss of ``probs`` float32 (N, S, S) against ``masks`` bool (N, S, S)
    (or class probabilities (N, S, S, K) against label maps (N, S, S)): the validation loss, on
    the scale of Keras' training loss (one batch of every case)."""
    y_true = tf.convert_to_tensor(np.asarray(masks, np.float32)[..., None])
    probs = np.asarray(probs, np.float32)
    y_pred = tf.convert_to_tensor(probs if probs.ndim == y_true.shape.rank else probs[..., None])
    return float(model.loss(y_true, y_pred))


def predict_probs(model, images: np.ndarray, backbone: str, tta: str = "none") -> np.ndarray:
    """Foreground probabilities float32 (N, S, S) for uint8 RGB images (N, S, S, 3).

    ``tta='flip'``: the mean of the plain pass and the width- and height-flipped passes, each
    flipped back. Same code as :func:`predict_probs_modes` (whose ``swap``, data.flip_swap's class
    permutation, applies to the horizontally flipped pass), so it is bit for bit what a member caches at
    training time for the ensemble search.
    """
    return predict_probs_modes(model, images, backbone, (tta,))[tta]


def predict_probs_modes(model, images: np.ndarray, backbone: str, modes=TTA_MODES, swap=None) -> dict[str, np.ndarray]:
    """``{mode: predict_probs(model, images, backbone, mode)}`` for several TTA modes at once.

    The plain forward pass of each batch is run once and shared by every mode (flip TTA then
    costs two extra passes, not three); each mode goes through the same operations, in the same
    order, as a call for that mode alone, so the results are identical to it.
    """
    return _probs_modes(lambda batches: [_predict(model, batches[0])], [backbone], images, modes, swap)[0]


class NetworkGroup:
    """Several networks that take the same input size (an ensemble's members, a cross-validated
    member's fold models), run on a batch by one compiled function: one call per TTA pass instead
    of one per network, and TensorFlow schedules the networks' ops together (faster on CPUs, where
    one small network leaves cores idle; ``experiments/ensemble_speed``). Each network's output
    is bit for bit what :func:`predict_probs_modes` gives for it alone (tests/test_ensemble.py)."""

    def __init__(self, models, backbones):
        self.models, self.backbones = list(models), list(backbones)
        if len(self.models) != len(self.backbones) or not self.models:
            raise ValueError("one backbone per model, and at least one model")
        forward = tf.function(
            lambda *xs: [m(x, training=False) for m, x in zip(self.models, xs, strict=True)], reduce_retracing=True
        )
        self._forward = lambda batches: [
            _channels(out.numpy())
            for out in forward(*[tf.constant(np.ascontiguousarray(b, dtype=np.float32)) for b in batches])
        ]

    def probs_modes(self, images: np.ndarray, modes=TTA_MODES, swap=None) -> list[dict[str, np.ndarray]]:
        """Per network, ``{mode: float32 (N, S, S)}`` for uint8 RGB ``images`` (N, S, S, 3)."""
        return _probs_modes(self._forward, self.backbones, images, modes, swap)


def _probs_modes(forward, backbones, images: np.ndarray, modes, swap=None) -> list[dict[str, np.ndarray]]:
    """Per network, ``{mode: probabilities}``; ``forward`` maps one preprocessed batch per network
    to one (B, S, S) array per network. Flip TTA is the mean of the plain pass and the width- and
    height-flipped passes, each flipped back (axis 2 is width and axis 1 height of both the
    (N, H, W, C) batch and the (N, H, W) outputs)."""
    for mode in modes:
        if mode not in TTA_MODES:
            raise SegxError(f"tta='{mode}' is not valid; use one of {', '.join(TTA_MODES)}")
    preps = [preprocessing(b) for b in backbones]
    out = [{mode: np.zeros(images.shape[:3], np.float32) for mode in modes} for _ in backbones]
    for start in range(0, len(images), INFERENCE_BATCH):
        batches = [prep(images[start : start + INFERENCE_BATCH].astype(np.float32)) for prep in preps]
        plain = forward(batches)
        for i, maps in enumerate(out):  # several classes: (N, S, S, K), known at the first batch
            if plain[i].ndim == 4 and next(iter(maps.values())).ndim == 3:
                for mode in modes:
                    maps[mode] = np.zeros((*images.shape[:3], plain[i].shape[-1]), np.float32)
        if any(mode != "none" for mode in modes):
            flipped_w = [p[:, :, ::-1] for p in forward([b[:, :, ::-1] for b in batches])]
            flipped_h = [p[:, ::-1] for p in forward([b[:, ::-1] for b in batches])]
            if swap is not None:  # data.flip_swap: the horizontally flipped pass labels left as right; swap back
                flipped_w = [p[..., swap] if p.ndim == 4 else p for p in flipped_w]
        for i, maps in enumerate(out):
            for mode in modes:
                maps[mode][start : start + len(batches[i])] = (
                    plain[i] if mode == "none" else (plain[i] + flipped_w[i] + flipped_h[i]) / np.float32(3.0)
                )
    return out


def _predict(model, batch: np.ndarray) -> np.ndarray:
    # One compiled graph per model, reused for every batch (eager model(x) runs op by op and
    # was ~1.5x slower here; model.predict rebuilds its pipeline on each call).
    forward = _FORWARD.get(model)
    if forward is None:
        # Kept beside the model, not on it: Keras would track (and try to save) the attribute.
        forward = _FORWARD[model] = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    result = forward(tf.constant(np.ascontiguousarray(batch, dtype=np.float32)))
    return _channels(result.numpy())


def _channels(out: np.ndarray) -> np.ndarray:
    """A network's output as segx holds it: (B, S, S) for one sigmoid, (B, S, S, K) for K classes."""
    return out[..., 0] if out.shape[-1] == 1 else out


def clear_session() -> None:
    """Free graphs and compiled forward functions (sweeps train members in one process)."""
    _FORWARD.clear()  # each entry's function holds its model, so weak keys alone never free it
    keras.backend.clear_session()


def set_determinism(seed: int, deterministic_ops: bool) -> None:
    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()


def count_flops(model, image_size: int) -> float:
    """Forward-pass FLOPs for one image, from TensorFlow's graph profiler."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2_as_graph,
    )

    spec = tf.TensorSpec([1, image_size, image_size, 3], tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen, _ = convert_variables_to_constants_v2_as_graph(concrete)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    info = tf.compat.v1.profiler.profile(
        graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=opts
    )
    return float(info.total_float_ops)


def configure_runtime(threads: int | None, accelerator: str, devices: int | None, strategy: str | None):
    """Threads and devices for this process, then the distribution strategy (or None).

    TensorFlow takes thread counts and device layouts only before its runtime starts; a later
    job in the same process (a sweep in one process) keeps the first job's, and asking for
    different ones is refused in one line. ``accelerator``: auto | gpu | cpu; ``devices``: how
    many (on the CPU, that many logical devices); ``strategy``: None or ``"mirrored"``.
    """
    gpus = tf.config.list_physical_devices("GPU")  # lists without starting the runtime
    if accelerator == "gpu" and not gpus:
        raise SegxError(
            "trainer.accelerator=gpu, but TensorFlow sees no GPU here (no GPU, no driver, or a "
            "CPU-only TensorFlow build); use trainer.accelerator=auto or cpu"
        )
    on_gpu = bool(gpus) and accelerator != "cpu"
    available = len(gpus) if on_gpu else None
    count = int(devices) if devices else (available or 1)
    if on_gpu and count > available:
        raise SegxError(
            f"trainer.devices={devices}, but TensorFlow sees {available} GPU(s) here; "
            f"use trainer.devices={available} or request more GPUs (hydra.launcher.gpus_per_node)"
        )
    if count > 1 and strategy != "mirrored":
        raise SegxError(
            f"trainer.devices={count} trains on one device unless trainer.strategy=mirrored; "
            "set trainer.strategy=mirrored, or trainer.devices=1"
        )
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(threads))
        if on_gpu:
            tf.config.set_visible_devices(gpus[:count], "GPU")
        else:
            if gpus:
                tf.config.set_visible_devices([], "GPU")
            if count > 1:
                cpu = tf.config.list_physical_devices("CPU")[0]
                tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        _check_runtime_unchanged(threads, on_gpu, count)
    if threads:
        import cv2

        cv2.setNumThreads(int(threads))  # image decoding and augmentation in the input pipeline
    names = [d.name for d in tf.config.list_logical_devices("GPU" if on_gpu else "CPU")][:count]
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy(names)
    return None


def _check_runtime_unchanged(threads: int | None, on_gpu: bool, count: int) -> None:
    """The runtime already started (an earlier job in this process): fine if it is as asked."""
    kind = "GPU" if on_gpu else "CPU"
    now = len(tf.config.list_logical_devices(kind))
    same_threads = not threads or tf.config.threading.get_intra_op_parallelism_threads() in (0, int(threads))
    if now < count or (not on_gpu and now != count) or not same_threads:
        raise SegxError(
            "trainer.threads/devices differ from an earlier job in this process, and TensorFlow "
            "sets them once per process; run the sweep with hydra/launcher=joblib (a process "
            "per job) or give every job the same trainer.threads and trainer.devices"
        )


def set_precision(precision: str | None) -> None:
    """Keras' global dtype policy: None (float32) or ``mixed_float16``."""
    keras.mixed_precision.set_global_policy(precision or "float32")


def float32_outputs(model):
    """Under mixed precision the last layer computes in float16: add a float32 output so the
    loss, the metrics and every saved prediction stay float32 (Keras' advice)."""
    if model.output.dtype == tf.float32:
        return model
    outputs = keras.layers.Activation("linear", dtype="float32", name="float32_output")(model.output)
    return keras.Model(model.input, outputs, name=model.name)
