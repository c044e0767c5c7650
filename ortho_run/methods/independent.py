"""``independent``: the new model trained with plain CE, evaluated against the old model.

The motivating baseline of backward compatibility: independently trained spaces do not match,
so new-query / old-gallery retrieval is near chance (ECC fails).
"""

from __future__ import annotations

from dataclasses import dataclass

from ortho_run.methods.base import Needs, register
from ortho_run.methods.ce import CE, CEConfig


@dataclass
class IndependentConfig(CEConfig):
    name: str = "independent"


@register("independent")
class Independent(CE):
    reference = True
    Config = IndependentConfig

    @classmethod
    def needs(cls, cfg):
        return Needs(old_model=True)
