"""Member networks: build, compile, load, predict. Library functions with plain arguments.

All TensorFlow/Keras/segmentation_models access goes through :mod:`segx.backend`.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from segx.backend import keras, sm, tf
from segx.errors import SegxError, look_up_option
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


def build_model(
    arch: str,
    backbone: str,
    image_size: int,
    encoder_weights: str | None = None,
    encoder_freeze: bool = False,
    classes: int = 1,
    activation: str = "sigmoid",
    **arch_kwargs,
):
    """A segmentation_models network for ``(image_size, image_size, 3)`` inputs.

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
            classes=classes,
            activation=activation,
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


def build_metrics(names) -> list:
    table = {
        "dice": lambda: sm.metrics.FScore(threshold=0.5, name="dice"),
        "iou": lambda: sm.metrics.IOUScore(threshold=0.5, name="iou"),
    }
    return [table[look_up_option(n, table, "metric", "trainer.metrics")]() for n in names]


def compile_model(model, optimizer, loss_weights: Mapping[str, float], metrics=("dice", "iou")):
    model.compile(optimizer=optimizer, loss=build_loss(loss_weights), metrics=build_metrics(metrics))
    return model


def save_member(model, folder: str | os.PathLike, spec: Mapping) -> Path:
    """Write a member as ``folder/{weights.h5, spec.json, model.keras}``.

    ``spec`` (arch, backbone, image_size, options) plus the weights rebuild the network in about
    a second without running any code from the file; ``model.keras`` is the same network in
    Keras' own format for use outside segx (``keras.models.load_model(path, compile=False)``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(folder / "weights.h5"))
    (folder / "spec.json").write_text(json.dumps(dict(spec), indent=1))
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
        spec = json.loads(spec_path.read_text())
        model = build_model(
            spec["arch"], spec["backbone"], int(spec["image_size"]), None, False, **spec.get("options", {})
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
    """The compiled training loss of ``probs`` float32 (N, S, S) against ``masks`` bool (N, S, S):
    the validation loss, on the scale of Keras' training loss (one batch of every case)."""
    y_true = tf.convert_to_tensor(np.asarray(masks, np.float32)[..., None])
    y_pred = tf.convert_to_tensor(np.asarray(probs, np.float32)[..., None])
    return float(model.loss(y_true, y_pred))


def predict_probs(model, images: np.ndarray, backbone: str, tta: str = "none") -> np.ndarray:
    """Foreground probabilities float32 (N, S, S) for uint8 RGB images (N, S, S, 3).

    ``tta='flip'``: the mean of the plain pass and the width- and height-flipped passes, each
    flipped back. Same code as :func:`predict_probs_modes`, so it is bit for bit what a member
    caches at training time for the ensemble search.
    """
    return predict_probs_modes(model, images, backbone, (tta,))[tta]


def predict_probs_modes(model, images: np.ndarray, backbone: str, modes=TTA_MODES) -> dict[str, np.ndarray]:
    """``{mode: predict_probs(model, images, backbone, mode)}`` for several TTA modes at once.

    The plain forward pass of each batch is run once and shared by every mode (flip TTA then
    costs two extra passes, not three); each mode goes through the same operations, in the same
    order, as a call for that mode alone, so the results are identical to it.
    """
    return _probs_modes(lambda batches: [_predict(model, batches[0])], [backbone], images, modes)[0]


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
            out.numpy()[..., 0]
            for out in forward(*[tf.constant(np.ascontiguousarray(b, dtype=np.float32)) for b in batches])
        ]

    def probs_modes(self, images: np.ndarray, modes=TTA_MODES) -> list[dict[str, np.ndarray]]:
        """Per network, ``{mode: float32 (N, S, S)}`` for uint8 RGB ``images`` (N, S, S, 3)."""
        return _probs_modes(self._forward, self.backbones, images, modes)


def _probs_modes(forward, backbones, images: np.ndarray, modes) -> list[dict[str, np.ndarray]]:
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
        if any(mode != "none" for mode in modes):
            flipped_w = [p[:, :, ::-1] for p in forward([b[:, :, ::-1] for b in batches])]
            flipped_h = [p[:, ::-1] for p in forward([b[:, ::-1] for b in batches])]
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
    return result.numpy()[..., 0]


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
