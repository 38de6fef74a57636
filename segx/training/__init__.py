"""Training one member: the fit loop, augmentation, the member run, and sweep summaries."""
