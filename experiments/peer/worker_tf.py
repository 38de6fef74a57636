"""segx's side of the peer benchmark: a worker driven by experiments/peer/peer.py.

    .venv/bin/python experiments/peer/worker_tf.py      # reads one JSON request a line on stdin

Run with the project's venv. The networks, loss, optimizer and inference are segx's own:
``segx.models.build_model`` / ``set_bn_momentum`` / ``compile_model`` with the default trainer
settings (Dice + BCE, Adam 1e-3, BatchNorm momentum 0.9, TF op determinism on) and
``segx.models.predict_probs`` for inference. Start-up (imports, model building, graph tracing)
is excluded: each request's work is timed inside the worker and only that is reported.

Levers (measured by ``peer.py --levers``; none is a segx default) come in the ``setup``
request or the environment the driver starts the worker with:

- ``deterministic``: ``segx.models.set_determinism(seed, deterministic)`` (segx: true);
- ``jit_infer``: the forward ``tf.function`` that ``predict_probs`` uses, compiled with XLA;
- ``jit_train``: ``model.compile(..., jit_compile=True)`` (XLA on the training step);
- ``intra_op`` / ``inter_op``: TensorFlow's thread pools (set once, at start-up);
- ``TF_ENABLE_ONEDNN_OPTS`` etc.: environment variables, set by the driver.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

# The protocol owns the real stdout; anything TF or Keras prints goes to stderr (the log).
PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)

THREADS = json.loads(os.environ.get("PEER_THREADS", '{"intra_op": 2, "inter_op": 2}'))
SEED = 1
BATCH = 8

from segx import models  # noqa: E402  (segx.backend configures TF before its first import)
from segx.backend import keras, tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(int(THREADS["intra_op"]))
tf.config.threading.set_inter_op_parallelism_threads(int(THREADS["inter_op"]))


def conv_flops(model, size: int) -> dict:
    """Forward FLOPs per image of the convolutions and matmuls (2 x multiply-adds), counted from
    the frozen inference graph's shapes: the same ops torch's FlopCounterMode counts, so both
    sides are counted alike. ``segx.models.count_flops`` (TF's profiler) is reported beside it:
    the profiler has no FLOP count for depthwise convolutions."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2_as_graph,
    )

    spec = tf.TensorSpec([1, size, size, 3], tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen, _ = convert_variables_to_constants_v2_as_graph(concrete)
    total = {"conv": 0, "depthwise": 0, "matmul": 0}
    for op in frozen.graph.get_operations():
        if op.type == "Conv2D":
            kh, kw, cin, _ = op.inputs[1].shape.as_list()
            total["conv"] += 2 * int(np.prod(op.outputs[0].shape.as_list())) * kh * kw * cin
        elif op.type == "DepthwiseConv2dNative":
            kh, kw, _, _ = op.inputs[1].shape.as_list()
            total["depthwise"] += 2 * int(np.prod(op.outputs[0].shape.as_list())) * kh * kw
        elif op.type in ("MatMul", "BatchMatMulV2"):
            k = op.inputs[0].shape.as_list()[-1]
            total["matmul"] += 2 * int(np.prod(op.outputs[0].shape.as_list())) * k
    return {
        "flops": float(sum(total.values())),
        "flops_parts": total,
        "flops_segx_profiler": models.count_flops(model, size),
    }


class Cell:
    """One network (backbone, size) compiled for training as segx trains it, plus inputs."""

    def __init__(self, backbone: str, size: int, jit_infer: bool, jit_train: bool, images: int):
        t0 = time.perf_counter()
        self.backbone, self.size = backbone, size
        self.model = models.build_model("unet", backbone, size)
        models.set_bn_momentum(self.model, 0.9)
        optimizer = keras.optimizers.Adam(learning_rate=0.001)
        models.compile_model(self.model, optimizer, {"dice": 1.0, "bce": 1.0})
        if jit_train:  # compile_model's own arguments, plus XLA on the train step
            self.model.compile(
                optimizer=self.model.optimizer,
                loss=self.model.loss,
                metrics=models.build_metrics(("dice", "iou")),
                jit_compile=True,
            )
        if jit_infer:  # predict_probs looks its forward function up here before making one
            model = self.model
            models._FORWARD[model] = tf.function(lambda x: model(x, training=False), jit_compile=True)
        rng = np.random.default_rng(SEED)
        prep = models.preprocessing(backbone)
        # As segx's tf.data pipeline hands batches to fit: preprocessed float32 images, 0/1 masks.
        self.x = tf.constant(prep(rng.integers(0, 256, (BATCH, size, size, 3)).astype(np.float32)).astype(np.float32))
        self.y = tf.constant((rng.random((BATCH, size, size, 1)) > 0.5).astype(np.float32))
        self.images = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
        self.build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(2):  # tracing, oneDNN primitive creation, optimizer slots
            self.train(1)
        self.infer()
        self.warmup_s = time.perf_counter() - t0

    def train(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.model.train_on_batch(self.x, self.y)  # returns numpy: the step has finished
        return time.perf_counter() - t0

    def infer(self) -> float:
        t0 = time.perf_counter()
        probs = models.predict_probs(self.model, self.images, self.backbone, "none")
        assert probs.shape == self.images.shape[:3]
        return time.perf_counter() - t0


def matmul(n: int, reps: int) -> dict:
    rng = np.random.default_rng(SEED)
    a_np, b_np = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    a, b = tf.constant(a_np), tf.constant(b_np)
    out = {}
    tf.matmul(a, b).numpy()
    t0 = time.perf_counter()
    for _ in range(reps):
        c = tf.matmul(a, b)
    c.numpy()
    out["tf"] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    a_np @ b_np
    t0 = time.perf_counter()
    for _ in range(reps):
        a_np @ b_np
    out["numpy_tf_venv"] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return out


def main() -> None:
    cells: dict[str, Cell] = {}
    options = {"deterministic": True, "jit_infer": False, "jit_train": False}
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request["cmd"]
        if cmd == "quit":
            break
        if cmd == "options":  # before the first setup: determinism is process-wide
            options.update(request["options"])
            models.set_determinism(SEED, bool(options["deterministic"]))
            reply = {
                "framework": "segx",
                "segx_file": models.__file__,
                "tensorflow": tf.__version__,
                "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                "onednn_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
                "options": options,
            }
        elif cmd == "setup":
            cell = Cell(
                request["backbone"],
                int(request["size"]),
                bool(options["jit_infer"]),
                bool(options["jit_train"]),
                int(request["images"]),
            )
            cells[request["key"]] = cell
            trainable = sum(int(np.prod(w.shape)) for w in cell.model.trainable_weights)
            reply = {
                "params": trainable,
                "params_all": int(cell.model.count_params()),
                "build_s": cell.build_s,
                "warmup_s": cell.warmup_s,
                **conv_flops(cell.model, cell.size),
            }
        elif cmd == "train":
            reply = {"seconds": cells[request["key"]].train(int(request["steps"]))}
        elif cmd == "infer":
            reply = {"seconds": cells[request["key"]].infer()}
        elif cmd == "matmul":
            reply = matmul(int(request["n"]), int(request["reps"]))
        else:
            reply = {"error": f"unknown cmd {cmd}"}
        PROTOCOL.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
