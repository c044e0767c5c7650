"""Backward compatibility as a service: methods declare what they need (``Method.needs``), the
runner builds a ``CompatService`` with a job-launching function, and the service provides
exactly that and evaluates old/new retrieval on embeddings already computed."""

from ortho_run.compat.artifacts import FrozenNet, class_means
from ortho_run.compat.evaluate import compat_matrix
from ortho_run.compat.provider import CompatService, old_config, train_or_load
from ortho_run.methods.base import CompatArtifacts

__all__ = ["CompatArtifacts", "CompatService", "FrozenNet", "class_means", "compat_matrix",
           "old_config", "train_or_load"]
