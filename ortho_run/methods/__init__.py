"""Method plugins. Every module in this package registers itself in ``METHODS`` (discovery).

Adding a method = one file here (a ``Method`` subclass decorated with ``@register``) plus one
yaml in ``conf/method/``; nothing else changes.
"""

from ortho_run.methods.base import (METHODS, Batch, LinearHead, Method, MethodContext,
                                    MethodOutput, Needs, register)

__all__ = ["METHODS", "Batch", "LinearHead", "Method", "MethodContext", "MethodOutput", "Needs",
           "register"]
