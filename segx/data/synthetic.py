"""Procedural, seeded 2D images with masks (no download needed).

Two scenes. ``nuclei`` (the default): microscopy-like images with binary masks.
``lateral``: a multi-class scene with label maps (0 background, 1 left_lobe, 2 right_lobe,
3 vessel): two organs of the same look, one in each half of the image (only their side tells
them apart, as left and right lungs), and a rare, thin, curved vessel; see :data:`LATERAL_LABELS`.

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


# The lateral scene's classes and their mask values (conf/data/synthetic_multiclass.yaml).
LATERAL_LABELS = {"background": 0, "left_lobe": 1, "right_lobe": 2, "vessel": 3}


def lateral_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (size, size, 3), label map uint8 (size, size)) of the lateral scene.

    The two lobes are drawn alike (texture, brightness), each in its own half: a network can
    only tell them apart by where they are, so a horizontal flip that does not swap the two
    classes teaches it the wrong side. The vessel is a thin (2 px at 128 px) curve, about 3% of
    the pixels: the rare class that class-uniform patch sampling is for."""
    labels = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for label, cx in ((1, 0.27), (2, 0.73)):
        center = (int((cx + rng.uniform(-0.05, 0.05)) * size), int(rng.uniform(0.4, 0.6) * size))
        axes = (max(3, int(rng.uniform(0.12, 0.18) * size)), max(4, int(rng.uniform(0.22, 0.32) * size)))
        cv2.ellipse(labels, center, axes, float(rng.uniform(-15, 15)), 0, 360, int(label), -1)
    # The vessel: a sine-like curve across the image, drawn over the lobes.
    x0 = rng.uniform(0, 2 * np.pi)
    xs = np.arange(0, size, 2)
    ys = size * (0.5 + 0.3 * np.sin(x0 + xs / size * rng.uniform(2.5, 4.5)))
    points = np.stack([xs, ys], axis=1).astype(np.int32).reshape(-1, 1, 2)
    # 2 px at 128 (about 3 % of the pixels): thin, and still a line after resizing to 96 px.
    cv2.polylines(labels, [points], False, 3, thickness=max(2, round(size / 64)))
    organ = np.isin(labels, (1, 2)).astype(np.float32)
    texture = cv2.GaussianBlur(rng.normal(1.0, 0.3, (size, size)).astype(np.float32), (0, 0), 1.5)
    gray = 0.15 + 0.45 * organ * np.clip(texture, 0.4, 1.6) + 0.35 * (labels == 3)
    gray = cv2.GaussianBlur(gray, (0, 0), 0.6) * (1.0 + rng.uniform(-0.2, 0.2) * (xx / size - 0.5))
    gray = gray + rng.normal(0, 0.03, gray.shape)
    image = np.repeat(np.clip(gray * 255, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return image, labels


SCENES = {"nuclei": synth_case, "lateral": lateral_case}


def generate(
    root: str | os.PathLike, n_images: int = 60, size: int = 128, seed: int = 0, scene: str = "nuclei"
) -> Path:
    """Write ``n_images`` synthetic cases of ``scene`` under ``root`` unless the same set is already there."""
    root = Path(root)
    if scene not in SCENES:
        raise SegxError(f"data.scene={scene!r} is not a synthetic scene; use one of {', '.join(SCENES)}")
    params = {"version": GENERATOR_VERSION, "n_images": n_images, "size": size, "seed": seed}
    if scene != "nuclei":  # the default scene's record is as it always was, so existing sets stay valid
        params["scene"] = scene
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
        image, mask = SCENES[scene](rng, size)
        stem = f"case_{i:04d}"
        cv2.imwrite(str(root / "train_images" / f"{stem}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "train_masks" / f"{stem}.png"), mask)
    record.write_text(json.dumps(params, indent=1))  # written last: marks the set complete
    return root
