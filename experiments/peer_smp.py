"""segx (TF/tf-keras + segmentation-models) against segmentation_models_pytorch on CPU PyTorch.

    python -m venv .venv-peer && .venv-peer/bin/pip install torch segmentation-models-pytorch==0.6.0
    python experiments/peer_smp.py [--backbone resnet18] [--size 96] [--steps 20]

Same architecture (Unet), encoder, input size, batch and loss (Dice + BCE), random init, tensors
already in memory; training and inference images per second, each side in its own process,
alternating twice; best run of each. Writes experiments/peer_smp/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "peer_smp"

SEGX = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from segx import models
models.set_determinism(0, False)
size, bs, steps, backbone = {size}, {batch}, {steps}, {backbone!r}
model = models.build_model("unet", backbone, size)
models.compile_model(model, models.keras.optimizers.Adam(1e-3), {{"dice": 1, "bce": 1}})
rng = np.random.default_rng(0)
x = (rng.random((bs, size, size, 3)) * 255).astype(np.float32)
y = (rng.random((bs, size, size, 1)) > 0.7).astype(np.float32)
ds = models.tf.data.Dataset.from_tensors((x, y)).repeat()
model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)
t0 = time.perf_counter(); model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0); train = steps * bs / (time.perf_counter() - t0)
xt = models.tf.constant(x); model(xt, training=False)
t0 = time.perf_counter()
for _ in range(steps): model(xt, training=False).numpy()
infer = steps * bs / (time.perf_counter() - t0)
print(json.dumps({{"train": train, "infer": infer, "params": model.count_params()}}))
"""

PEER = r"""
import json, time
import torch, segmentation_models_pytorch as smp
torch.manual_seed(0); torch.set_num_threads({threads})
size, bs, steps, backbone = {size}, {batch}, {steps}, {backbone!r}
model = smp.Unet(backbone, encoder_weights=None, classes=1)
opt = torch.optim.Adam(model.parameters(), 1e-3)
dice, bce = smp.losses.DiceLoss("binary"), torch.nn.BCEWithLogitsLoss()
x = torch.rand(bs, 3, size, size); y = (torch.rand(bs, 1, size, size) > 0.7).float()
def step():
    opt.zero_grad(); out = model(x); loss = dice(out, y) + bce(out, y); loss.backward(); opt.step()
model.train()
for _ in range(3): step()
t0 = time.perf_counter()
for _ in range(steps): step()
train = steps * bs / (time.perf_counter() - t0)
model.eval()
with torch.inference_mode():
    model(x)
    t0 = time.perf_counter()
    for _ in range(steps): torch.sigmoid(model(x))
    infer = steps * bs / (time.perf_counter() - t0)
print(json.dumps({{"train": train, "infer": infer, "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__, "smp": smp.__version__}}))
"""


def run(python: Path, code: str) -> dict:
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peer-python", type=Path, default=ROOT / ".venv-peer" / "bin" / "python")
    args = parser.parse_args()
    if not args.peer_python.exists():
        sys.exit(f"peer environment missing: {args.peer_python}; create it as the docstring says")
    params = dict(root=str(ROOT), size=args.size, batch=args.batch, steps=args.steps, backbone=args.backbone)
    import os

    results = {"segx": [], "smp": []}
    for _ in range(2):
        results["segx"].append(run(Path(sys.executable), SEGX.format(**params)))
        results["smp"].append(run(args.peer_python, PEER.format(threads=os.cpu_count(), **params)))
        print(results["segx"][-1], results["smp"][-1], flush=True)
    best = {k: {m: max(r[m] for r in v) for m in ("train", "infer")} for k, v in results.items()}
    meta = results["smp"][0]
    OUT.mkdir(parents=True, exist_ok=True)
    text = (
        "# Peer comparison: segx vs segmentation_models_pytorch (CPU)\n\n"
        f"`python experiments/peer_smp.py --backbone {args.backbone} --size {args.size} --steps {args.steps}` on "
        f"{platform.processor() or platform.machine()} with {os.cpu_count()} cores. Unet-{args.backbone}, random init, "
        f"batch {args.batch}, {args.size} px, Dice + BCE, tensors in memory; best of 2 alternating runs.\n"
        f"Parameters: segx {results['segx'][0]['params']:,}, smp {meta['params']:,} (torch {meta['torch']}, smp {meta['smp']}).\n\n"
        "| | segx img/s | smp img/s | smp / segx |\n|---|---|---|---|\n"
        f"| training | {best['segx']['train']:.1f} | {best['smp']['train']:.1f} | {best['smp']['train'] / best['segx']['train']:.2f} |\n"
        f"| inference | {best['segx']['infer']:.1f} | {best['smp']['infer']:.1f} | {best['smp']['infer'] / best['segx']['infer']:.2f} |\n"
    )
    (OUT / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
