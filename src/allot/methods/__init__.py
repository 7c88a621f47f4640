"""Registered methods (importing this package registers the built-in recipes)."""

from allot.methods import alds, baselines, cet, joint, lc, lowrank  # noqa: F401  (register)
from allot.methods.base import METHODS, Method, get_method, register_method

__all__ = ["METHODS", "Method", "get_method", "register_method"]
