"""Ensembling members from their cached validation probabilities (numpy only, no TensorFlow):
the cache format and the one arithmetic that combines members, member selection and
compatibility, the weight/threshold search, and the ensemble record."""
