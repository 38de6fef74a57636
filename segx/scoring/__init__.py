"""Scores and the post-processing they choose: Dice, IoU, HD95 per case, and the mask clean-ups
(as MONAI's metrics and nnU-Net's postprocessing). NumPy, SciPy and OpenCV only."""
