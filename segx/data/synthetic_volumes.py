"""Synthetic CT-like volumes in an nnU-Net v2 folder (no download): ``data=synthetic_volumes``.

Each case is an anisotropic volume (thick slices, fine in-plane pixels, like a clinical CT) in
Hounsfield-like units: air outside a body ellipse of soft tissue (about 40 HU), a left and a
right kidney-like ellipsoid (about 150 HU, alike, told apart only by their side) and a central
liver-like organ (about 60 HU), with noise. Written as ``imagesTr/<case>_0000.nii.gz`` and
``labelsTr/<case>.nii.gz`` with ``dataset.json`` (channel "CT"), and the orientation of a real
scan (L-P-S direction cosines), so every stage sees what it will see on user data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segx.errors import SegxError

GENERATOR_VERSION = 1
LABELS = {"background": 0, "liver": 1, "kidney_left": 2, "kidney_right": 3}


def synth_volume(rng: np.random.Generator, size: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (depth, size, size) in HU, label uint8 same shape) of one case."""
    z, y, x = np.meshgrid(np.linspace(-1, 1, depth), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    label = np.zeros((depth, size, size), np.uint8)
    body = (x / rng.uniform(0.8, 0.95)) ** 2 + (y / rng.uniform(0.6, 0.75)) ** 2 <= 1
    liver = ((x - rng.uniform(-0.05, 0.05)) / 0.35) ** 2 + ((y + 0.25) / 0.22) ** 2 + (z / 0.8) ** 2 <= 1
    label[liver & body] = 1
    for value, side in ((2, 1.0), (3, -1.0)):  # L-P-S: +x is the patient's left
        cx = side * rng.uniform(0.42, 0.5)
        kidney = ((x - cx) / rng.uniform(0.1, 0.14)) ** 2 + ((y - 0.2) / rng.uniform(0.14, 0.18)) ** 2
        kidney = kidney + ((z - rng.uniform(-0.2, 0.2)) / rng.uniform(0.45, 0.6)) ** 2 <= 1
        label[kidney & body] = value
    image = np.full(label.shape, -1000.0, np.float32)
    image[body] = 40
    image[label == 1] = 60 + rng.uniform(-10, 10)
    image[(label == 2) | (label == 3)] = 150 + rng.uniform(-15, 15)
    image += rng.normal(0, 20, image.shape).astype(np.float32)
    return image, label


def generate_volumes(
    root: str | os.PathLike, n_cases: int = 12, size: int = 64, depth: int = 16, seed: int = 0,
    spacing: tuple[float, float, float] = (0.8, 0.8, 3.0),
) -> Path:  # fmt: skip
    """Write ``n_cases`` synthetic volumes under ``root`` unless the same set is already there."""
    root = Path(root)
    params = {"version": GENERATOR_VERSION, "n_cases": n_cases, "size": size, "depth": depth, "seed": seed,
              "spacing": list(spacing)}  # fmt: skip
    record = root / "GENERATOR.json"
    if record.exists():
        if json.loads(record.read_text()) == params:
            return root
        raise SegxError(
            f"{root} holds synthetic volumes made with other settings ({record}); delete it or move data.root"
        )
    if root.exists() and any(root.iterdir()):
        raise SegxError(f"{root} is not empty and is not synthetic volumes; set data.root elsewhere")
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        image, label = synth_volume(rng, size, depth)
        for array, path in ((image.astype(np.int16), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                            (label, root / "labelsTr" / f"case_{i:03d}.nii.gz")):  # fmt: skip
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing(spacing)
            volume.SetOrigin((-size * spacing[0] / 2, -size * spacing[1] / 2, -depth * spacing[2] / 2))
            volume.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # ITK's LPS+: the identity is L-P-S
            sitk.WriteImage(volume, str(path), useCompression=True)
    dataset = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": n_cases, "file_ending": ".nii.gz",
               "name": "segx synthetic volumes"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(dataset, indent=1))
    record.write_text(json.dumps(params, indent=1))  # written last: marks the set complete
    return root
