"""What TF op determinism (`trainer.deterministic=true`) costs in training speed on this machine.

    python experiments/determinism_cost.py [--backbones resnet18,efficientnetb0] [--size 96]
                                            [--steps 20] [--repeats 5]

Op determinism is process-wide once enabled, so every timing runs in a fresh subprocess. The two
settings alternate (on, off, on, off, ...) so that drift in the machine's load hits both alike;
each pair gives one ratio, and the table reports the median ratio with its range over pairs, next
to the median and range of each setting's images per second. Writes
experiments/determinism_cost/results.json (every timing) and RESULTS.md (the table; rewrite it
with ``--report-only``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from segx.benchmark.helpers import read_results, spread, write_results

OUT = Path(__file__).resolve().parent / "determinism_cost"

CHILD = r"""
import json, time
import numpy as np
from segx import models
deterministic, backbone, size, steps = {deterministic}, {backbone!r}, {size}, {steps}
models.set_determinism(0, deterministic)
model = models.build_model("unet", backbone, size)
models.compile_model(model, models.keras.optimizers.Adam(1e-3), {{"dice": 1, "bce": 1}})
rng = np.random.default_rng(0)
x = rng.random((8, size, size, 3), np.float32) * 255
y = (rng.random((8, size, size, 1)) > 0.7).astype(np.float32)
ds = models.tf.data.Dataset.from_tensors((x, y)).repeat()
model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # graph building and warm-up
t0 = time.perf_counter()
model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
print(json.dumps({{"img_s": steps * 8 / (time.perf_counter() - t0)}}))
"""


def time_one(backbone: str, deterministic: bool, size: int, steps: int) -> float:
    code = CHILD.format(deterministic=deterministic, backbone=backbone, size=size, steps=steps)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["img_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", default="resnet18,efficientnetb0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="alternating (on, off) pairs per backbone")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    if args.report_only:
        write_report()
        return
    started = time.strftime("%Y-%m-%d %H:%M")
    results: dict[str, dict[str, list[float]]] = {}
    for backbone in args.backbones.split(","):
        on, off = [], []
        for pair in range(args.repeats):
            # Alternate which setting goes first, so neither always runs on a warmer machine.
            order = (True, False) if pair % 2 == 0 else (False, True)
            for deterministic in order:
                value = time_one(backbone, deterministic, args.size, args.steps)
                (on if deterministic else off).append(value)
                print(f"{backbone} deterministic={deterministic}: {value:.1f} img/s", flush=True)
        results[backbone] = {"deterministic": on, "non_deterministic": off}
    OUT.mkdir(parents=True, exist_ok=True)
    write_results(OUT, {"args": vars(args), "started": started, "img_s": results})
    write_report()


def write_report() -> None:
    """RESULTS.md from results.json (``--report-only`` rewrites it without timing anything)."""
    saved = read_results(OUT)
    args, started, results = saved["args"], saved["started"], saved["img_s"]
    rows = []
    for backbone, r in results.items():
        on, off = r["deterministic"], r["non_deterministic"]
        ratios = [a / b for a, b in zip(on, off, strict=True)]
        # This machine's timings can fall into two modes (seen: ~15.6 img/s or 25-28 img/s in
        # either setting); a timing is 'slow' when it is nearer the slowest than the fastest.
        middle = (min(on + off) + max(on + off)) / 2
        fast_on, fast_off = [v for v in on if v > middle], [v for v in off if v > middle]
        fast = f"{statistics.median(fast_on) / statistics.median(fast_off):.3f}" if fast_on and fast_off else "n/a"
        rows.append(
            f"| {backbone} | {spread(on, 1)} | {spread(off, 1)} | {spread(ratios, 3)} | "
            f"{len(on) - len(fast_on)}/{len(on)} | {len(off) - len(fast_off)}/{len(off)} | {fast} |"
        )
    text = (
        "# Cost of TF op determinism\n\n"
        f"`python experiments/determinism_cost.py --backbones {args['backbones']} --size {args['size']} "
        f"--steps {args['steps']} --repeats {args['repeats']}` ({started}): Unet, batch 8, {args['size']} px, "
        f"tensors in memory, {args['steps']} timed steps after 3 warm-up steps, one fresh process per "
        f"timing, {args['repeats']} alternating pairs per backbone. Median (min-max) over the timings; the "
        "ratio is deterministic / non-deterministic within each pair (below 1: determinism is slower). "
        "'Slow timings' counts timings nearer the backbone's slowest than its fastest; the last column "
        "compares the medians of the remaining (fast) timings of each setting.\n\n"
        "| backbone | deterministic img/s | non-deterministic img/s | ratio | slow timings, deterministic "
        "| slow timings, non-deterministic | ratio of fast-timing medians |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    write_results(OUT, report=text)
    print(text)


if __name__ == "__main__":
    main()
