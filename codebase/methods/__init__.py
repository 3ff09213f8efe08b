"""Compression methods; importing this package registers them."""

from codebase.methods import plain  # noqa: F401  (registers "none")
from codebase.methods.base import Method, Stage, get_method, method_names, register

__all__ = ["Method", "Stage", "get_method", "method_names", "register"]
