"""Orthogonality regularisers (``regularizer=<name>``): one file registers each in
``REGULARIZERS`` (found by discovery), one yaml in ``conf/regularizer/`` selects it."""

from ortho_run.regularizers.base import (REGULARIZERS, Regularizer, RegularizerConfig,
                                         build_regularizer)

__all__ = ["REGULARIZERS", "Regularizer", "RegularizerConfig", "build_regularizer"]
