"""Data layer: reading images and masks, pairing, splitting, synthetic data. No TensorFlow."""

from segx.data.folder import Case, Dataset, discover_cases, load_cases
from segx.data.io import read_image, read_mask
from segx.data.split import fingerprint, load_or_create_split

__all__ = [
    "Case",
    "Dataset",
    "discover_cases",
    "load_cases",
    "read_image",
    "read_mask",
    "fingerprint",
    "load_or_create_split",
]
