"""MONAI's side of the peer benchmark: a worker driven by experiments/peer/peer.py.

    .venv-peer/bin/python experiments/peer/worker_torch.py   # made by experiments/peer/setup.sh

Run with the peer venv (CPU torch + MONAI, no segx). What a MONAI user writes by default:
``FlexibleUNet(3, 1, backbone, pretrained=False, spatial_dims=2)`` (a U-Net with a 256-128-64-32-16
decoder, like segx's ``arch=unet``), ``DiceCELoss(sigmoid=True)`` (Dice + BCE on logits, equal
weights), Adam 1e-3, a plain training loop; inference in ``model.eval()`` under
``torch.inference_mode()``, uint8 images converted and normalised in torch, batches of 8,
sigmoid, probabilities back as numpy (the same input and output as ``segx.models.predict_probs``).
Start-up and warm-up are excluded; each request's work is timed inside the worker.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)

import torch  # noqa: E402

THREADS = json.loads(os.environ.get("PEER_THREADS", '{"intra_op": 2, "inter_op": 2}'))
torch.set_num_threads(int(THREADS["intra_op"]))
torch.set_num_interop_threads(int(THREADS["inter_op"]))

import monai  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.networks.nets import FlexibleUNet  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

SEED = 1
BATCH = 8
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


class Cell:
    def __init__(self, backbone: str, size: int, images: int):
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        self.model = FlexibleUNet(3, 1, backbone, pretrained=False, spatial_dims=2)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.001)
        self.loss = DiceCELoss(sigmoid=True)
        rng = np.random.default_rng(SEED)
        self.x = (torch.from_numpy(rng.integers(0, 256, (BATCH, 3, size, size)).astype(np.float32)) - MEAN) / STD
        self.y = torch.from_numpy((rng.random((BATCH, 1, size, size)) > 0.5).astype(np.float32))
        self.images = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
        self.size = size
        self.build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(2):
            self.train(1)
        self.infer()
        self.warmup_s = time.perf_counter() - t0

    def flops(self) -> dict:
        self.model.eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.model(torch.zeros(1, 3, self.size, self.size))
        parts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        return {"flops": float(counter.get_total_flops()), "flops_parts": parts}

    def train(self, steps: int) -> float:
        self.model.train()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(self.model(self.x), self.y)
            loss.backward()
            self.optimizer.step()
            loss.item()
        return time.perf_counter() - t0

    def infer(self) -> float:
        self.model.eval()
        t0 = time.perf_counter()
        out = np.zeros(self.images.shape[:3], np.float32)
        with torch.inference_mode():
            for start in range(0, len(self.images), BATCH):
                batch = torch.from_numpy(self.images[start : start + BATCH]).permute(0, 3, 1, 2).float()
                probs = torch.sigmoid(self.model((batch - MEAN) / STD))
                out[start : start + len(batch)] = probs[:, 0].numpy()
        return time.perf_counter() - t0


def matmul(n: int, reps: int) -> dict:
    rng = np.random.default_rng(SEED)
    a_np, b_np = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    a, b = torch.from_numpy(a_np), torch.from_numpy(b_np)
    out = {}
    with torch.inference_mode():
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        out["torch"] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    a_np @ b_np
    t0 = time.perf_counter()
    for _ in range(reps):
        a_np @ b_np
    out["numpy_peer_venv"] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return out


def main() -> None:
    cells: dict[str, Cell] = {}
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request["cmd"]
        if cmd == "quit":
            break
        if cmd == "options":
            reply = {
                "framework": "monai",
                "torch": torch.__version__,
                "monai": monai.__version__,
                "intra_op": torch.get_num_threads(),
                "inter_op": torch.get_num_interop_threads(),
                "mkldnn": torch.backends.mkldnn.is_available(),
            }
        elif cmd == "setup":
            backbone = {"efficientnetb0": "efficientnet-b0"}.get(request["backbone"], request["backbone"])
            cell = Cell(backbone, int(request["size"]), int(request["images"]))
            cells[request["key"]] = cell
            params = sum(p.numel() for p in cell.model.parameters())
            buffers = sum(b.numel() for b in cell.model.buffers() if b.is_floating_point())
            reply = {
                "params": int(params),
                "params_all": int(params + buffers),
                "build_s": cell.build_s,
                "warmup_s": cell.warmup_s,
                **cell.flops(),
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
