"""Ensembling members from their cached validation probabilities (no TensorFlow; the search is numpy):
the cache format and the one arithmetic that combines members, member selection and
compatibility, the weight/threshold search, and the ensemble record."""
