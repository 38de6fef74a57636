"""Prediction with a recorded ensemble: the predictor, post-processing, and writing a folder."""
