"""Procedural, seeded 2D microscopy-like images with binary masks (no download needed).

Each image is either fluorescence-like (bright textured nuclei on a dark background) or
brightfield/H&E-like (purple nuclei on a pink background), with uneven illumination, blur
and noise. Files are written in the same layout as user data (``train_images/``,
``train_masks/``) so users can open them and swap in their own folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from segx.errors import SegxError

GENERATOR_VERSION = 1


def synth_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (size, size, 3), mask uint8 (size, size) in {0, 255}) pair."""
    scale = size / 128.0
    mask = np.zeros((size, size), np.uint8)
    intensity = np.zeros((size, size), np.float32)
    n_nuclei = int(rng.integers(4, 22))
    for _ in range(n_nuclei):
        center = tuple(int(v) for v in rng.integers(0, size, 2))
        a = max(2, int(rng.uniform(4, 12) * scale))
        b = max(2, int(a * rng.uniform(0.55, 1.0)))
        angle = float(rng.uniform(0, 180))
        blob = np.zeros_like(mask)
        cv2.ellipse(blob, center, (a, b), angle, 0, 360, 1, -1)
        mask |= blob
        intensity = np.maximum(intensity, blob * rng.uniform(0.45, 1.0))
    # Chromatin-like texture inside nuclei, soft edges from the optics.
    texture = cv2.GaussianBlur(rng.normal(1.0, 0.35, (size, size)).astype(np.float32), (0, 0), 1.2)
    signal = cv2.GaussianBlur(intensity * np.clip(texture, 0.3, 1.6), (0, 0), 1.0 * scale + 0.3)
    # Uneven illumination: a tilted plane times a broad vignette.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tilt = 1.0 + rng.uniform(-0.35, 0.35) * (xx - 0.5) + rng.uniform(-0.35, 0.35) * (yy - 0.5)
    vignette = 1.0 - rng.uniform(0.0, 0.35) * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 2
    light = tilt * vignette
    if rng.random() < 0.7:  # fluorescence-like
        gray = (0.06 + 0.8 * signal) * light
        gray = rng.poisson(np.clip(gray, 0, 1) * 60) / 60.0 + rng.normal(0, 0.02, gray.shape)
        image = np.repeat(gray[:, :, None], 3, axis=2)
    else:  # brightfield / H&E-like
        background = np.array([0.93, 0.78, 0.86], np.float32)
        nucleus = np.array([0.35, 0.22, 0.55], np.float32)
        alpha = np.clip(signal * 1.2, 0, 1)[:, :, None]
        image = (background * (1 - alpha) + nucleus * alpha) * light[:, :, None]
        image += rng.normal(0, 0.025, image.shape)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    return image, mask * 255


def generate(root: str | os.PathLike, n_images: int = 60, size: int = 128, seed: int = 0) -> Path:
    """Write ``n_images`` synthetic cases under ``root`` unless the same set is already there."""
    root = Path(root)
    params = {"version": GENERATOR_VERSION, "n_images": n_images, "size": size, "seed": seed}
    record = root / "GENERATOR.json"
    if record.exists():
        if json.loads(record.read_text()) == params:
            return root
        raise SegxError(
            f"{root} holds synthetic data made with other settings ({record}); delete the "
            "folder or set data.root to a new one"
        )
    if root.exists() and any(root.iterdir()):
        raise SegxError(f"{root} is not empty and is not synthetic data; set data.root elsewhere")
    rng = np.random.default_rng(seed)
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    (root / "train_masks").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        image, mask = synth_case(rng, size)
        stem = f"case_{i:04d}"
        cv2.imwrite(str(root / "train_images" / f"{stem}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "train_masks" / f"{stem}.png"), mask)
    record.write_text(json.dumps(params, indent=1))  # written last: marks the set complete
    return root
