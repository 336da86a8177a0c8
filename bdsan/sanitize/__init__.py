"""Defenses (one file per method) and the shared sanitize pipeline.

The package and the API function share the name ``bdsan.sanitize`` (importing any submodule makes Python bind the
package there), so the package itself is callable: ``bdsan.sanitize(model, holdout, ...)`` runs
``bdsan.sanitize.pipeline.sanitize``.
"""
import sys
import types

from .context import Context, DefenseResult
from .registry import get_method, list_methods, register_method

__all__ = ["Context", "DefenseResult", "get_method", "list_methods", "register_method"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .pipeline import sanitize

        return sanitize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
