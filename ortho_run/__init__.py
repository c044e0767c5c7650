"""ortho-run: train and compare orthogonality methods on one reproducible pipeline."""

__version__ = "0.2.0"
