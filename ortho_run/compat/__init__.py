"""Backward compatibility as a service: methods declare what they need (``Method.needs``), the
runner plans a run's chain of earlier models (``plan_compat``), builds a ``CompatService``
with a job-launching function and prepares it, and the service provides
exactly that and evaluates old/new retrieval on embeddings already computed."""

from ortho_run.compat.artifacts import FrozenNet, class_means
from ortho_run.compat.evaluate import compat_matrix
from ortho_run.compat.provider import CompatPlan, CompatService, old_config, plan_compat
from ortho_run.methods.base import CompatArtifacts

__all__ = ["CompatArtifacts", "CompatPlan", "CompatService", "FrozenNet", "class_means",
           "compat_matrix", "old_config", "plan_compat"]
