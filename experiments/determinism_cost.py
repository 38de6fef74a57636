"""What TF op determinism costs in training speed on this machine (issue: reproducibility).

    python experiments/determinism_cost.py [--backbone resnet18] [--size 96] [--steps 30]

Op determinism is process-wide once enabled, so each setting runs in its own subprocess, twice,
alternating. Prints a table and writes experiments/determinism_cost/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "determinism_cost"
ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from segx import models
deterministic, backbone, size, steps = {deterministic}, {backbone!r}, {size}, {steps}
models.set_determinism(0, deterministic)
model = models.build_model("unet", backbone, size)
models.compile_model(model, models.keras.optimizers.Adam(1e-3), {{"dice": 1, "bce": 1}})
rng = np.random.default_rng(0)
x = rng.random((8, size, size, 3), np.float32) * 255
y = (rng.random((8, size, size, 1)) > 0.7).astype(np.float32)
ds = models.tf.data.Dataset.from_tensors((x, y)).repeat()
model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)
t0 = time.perf_counter()
model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
print(json.dumps({{"img_s": steps * 8 / (time.perf_counter() - t0)}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", default="resnet18,efficientnetb0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for backbone in args.backbones.split(","):
        results = {True: [], False: []}
        for _ in range(2):
            for deterministic in (True, False):
                code = CHILD.format(root=str(ROOT), deterministic=deterministic, backbone=backbone, size=args.size, steps=args.steps)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                results[deterministic].append(json.loads(out.stdout.strip().splitlines()[-1])["img_s"])
                print(f"{backbone} deterministic={deterministic}: {results[deterministic][-1]:.1f} img/s", flush=True)
        on, off = max(results[True]), max(results[False])
        rows.append(f"| {backbone} | {on:.1f} | {off:.1f} | {on / off:.3f} |")
    OUT.mkdir(parents=True, exist_ok=True)
    text = (
        "# Cost of TF op determinism\n\n"
        f"`python experiments/determinism_cost.py --backbones {args.backbones} --size {args.size} --steps {args.steps}`: "
        f"Unet, batch 8, {args.size} px, tensors in memory, best of 2 alternating runs each, one process per run.\n\n"
        "| backbone | deterministic img/s | non-deterministic img/s | ratio |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    (OUT / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
