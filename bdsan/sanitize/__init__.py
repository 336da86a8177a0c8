"""Defenses (one file per method) and the shared sanitize pipeline."""
from .context import Context, DefenseResult
from .registry import get_method, list_methods, register_method

__all__ = ["Context", "DefenseResult", "get_method", "list_methods", "register_method"]
