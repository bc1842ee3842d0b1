"""Merge methods behind one registry: ``METHODS[name](ctx, **options) -> MethodResult``."""

from . import baselines, manifold_mix  # noqa: F401  (registers the methods)
from .base import METHODS, MethodResult, SoupContext, ValidationJudge, register

__all__ = ["METHODS", "MethodResult", "SoupContext", "ValidationJudge", "register"]
