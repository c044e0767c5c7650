"""The models a compatibility run trains besides its own, one table: each role's seed (an old
model is trained at another time, from another init: with the run's seed the "independent"
spaces would share their initialisation and partly align) and the tag its runs carry in
summary.json, by which ``ortho-report`` knows a cached model from a result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: a role's seed is the run's seed + SEED_STRIDE × its offset
SEED_STRIDE = 10_007


@dataclass(frozen=True)
class ModelRole:
    name: str
    seed_offset: int
    tag_format: str  # "{step}" is the step's index, for the models of a multi-step update

    def seed(self, run_seed: int) -> int:
        return run_seed + SEED_STRIDE * self.seed_offset

    def tag(self, step: Optional[int] = None) -> str:
        return self.tag_format.format(step=step)


OLD = ModelRole("old", 1, "old-model")  # the model a run is made compatible with (step 0)
INDEPENDENT = ModelRole("independent", 2, "independent-model")  # trained alone on the new data
STEP = ModelRole("step", 3, "step-{step}-model")  # an earlier step of a multi-step update
ROLES = (OLD, INDEPENDENT, STEP)


def role_of(tag: str) -> Optional[ModelRole]:
    """The role whose runs carry ``tag`` (None: a run of its own, a result)."""
    for role in ROLES:
        head, _, tail = role.tag_format.partition("{step}")
        if tag == role.tag_format or (tail and tag.startswith(head) and tag.endswith(tail)
                                      and tag[len(head):-len(tail)].isdigit()):
            return role
    return None
