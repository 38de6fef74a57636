"""Test-time augmentation modes, named once: a member caches probabilities per mode, an
ensemble records the mode its weights were chosen for, and prediction repeats it."""

TTA_MODES = ("none", "flip")
