"""segx: config-driven experiments for 2D medical image segmentation ensembles."""

__version__ = "0.1.0"
