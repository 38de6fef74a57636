"""Where the time goes, op by op, on each side of the peer benchmark (issue 15).

    .venv/bin/python experiments/peer/profile_ops.py tf resnet34 256 train [--steps 2] [--jit-infer]
    .venv-peer/bin/python experiments/peer/profile_ops.py torch resnet34 256 train [--steps 2]

segx's side: the network, loss and optimizer that worker_tf.py builds (segx's own), profiled with
the TF profiler (``tf.profiler.experimental``); the XPlane it writes is read back here and the
host threads' op events are summed by op type. MONAI's side: worker_torch.py's network under
``torch.profiler`` (self CPU time per aten op). Prints JSON: total wall seconds of the profiled
work and the ops that cost the most, and writes it to experiments/peer/profile-<side>-....json.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def profile_tf(args) -> dict:
    import worker_tf  # noqa: E402  (imports segx, sets TF's threads)
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    from worker_tf import Cell, tf

    cell = Cell(args.backbone, args.size, args.jit_infer, False, 8 * args.steps)
    logdir = Path(tempfile.mkdtemp(prefix="peer-prof-"))
    tf.profiler.experimental.start(str(logdir))
    t0 = time.perf_counter()
    cell.train(args.steps) if args.task == "train" else cell.infer()
    wall = time.perf_counter() - t0
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    space.ParseFromString(next(logdir.rglob("*.xplane.pb")).read_bytes())
    by_type: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    by_layer: collections.Counter = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # A kernel's event is named "layer/op:Type"; executor and function-call events
                # ("ExecutorState::Process", "EagerExecute", ...) enclose the kernels and have no
                # such name: counting them would count the time twice.
                if ":" not in name or "::" in name:
                    continue
                layer, op_type = name.rsplit(":", 1)
                if not op_type.isidentifier():  # "EagerLocalExecute: __inference_..." encloses all
                    continue
                parts = [p for p in layer.split("/") if p != "gradient_tape" and not p.startswith("model")]
                grad = "gradient of " if layer.startswith("gradient_tape") else ""
                by_layer[grad + (parts[0] if parts else layer)] += event.duration_ps / 1e12
                by_type[op_type] += event.duration_ps / 1e12
                count[op_type] += 1
    del worker_tf
    shutil.rmtree(logdir, ignore_errors=True)
    total = sum(by_type.values())
    return {
        "wall_s": wall,
        "op_seconds_total": total,
        "note": "kernel events of TF's host threads, by op type",
        "ops": [
            {"op": k, "seconds": v, "share": v / total, "calls": count[k]} for k, v in by_type.most_common(args.top)
        ],
        "layers": [{"layer": k, "seconds": v, "share": v / total} for k, v in by_layer.most_common(args.top)],
    }


def profile_torch(args) -> dict:
    import torch
    import worker_torch  # noqa: E402
    from worker_torch import Cell

    backbone = {"efficientnetb0": "efficientnet-b0"}.get(args.backbone, args.backbone)
    cell = Cell(backbone, args.size, 8 * args.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        cell.train(args.steps) if args.task == "train" else cell.infer()
        wall = time.perf_counter() - t0
    del worker_torch
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e6
    return {
        "wall_s": wall,
        "op_seconds_total": total,
        "ops": [
            {
                "op": e.key,
                "seconds": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / 1e6 / total,
                "calls": e.count,
            }
            for e in rows[: args.top]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["tf", "torch"])
    parser.add_argument("backbone")
    parser.add_argument("size", type=int)
    parser.add_argument("task", choices=["train", "infer"])
    parser.add_argument("--steps", type=int, default=2, help="training steps, or batches of 8 inferred")
    parser.add_argument("--jit-infer", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    out = (profile_tf if args.side == "tf" else profile_torch)(args)
    out = {
        "side": args.side,
        "backbone": args.backbone,
        "size": args.size,
        "task": args.task,
        "jit_infer": args.jit_infer,
        **out,
    }
    name = f"profile-{args.side}-{args.backbone}-{args.size}-{args.task}{'-xla' if args.jit_infer else ''}.json"
    (HERE / name).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
