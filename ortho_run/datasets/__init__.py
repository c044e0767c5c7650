"""Data sources (``data=<name>``) and loaders.

Every module of this package that registers a source in ``SOURCES`` is found by discovery:
adding a source is one file here plus one yaml in ``conf/data/``.
"""

from ortho_run.datasets.base import SOURCES, DataSet, Split, load_dataset

__all__ = ["SOURCES", "DataSet", "Split", "load_dataset"]
