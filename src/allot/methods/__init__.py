"""Registered methods (importing this package registers the built-in recipes)."""

from allot.methods import baselines  # noqa: F401  (registers the baseline recipes)
from allot.methods.base import METHODS, Method, get_method, register_method

__all__ = ["METHODS", "Method", "get_method", "register_method"]
