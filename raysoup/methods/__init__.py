"""Merge methods behind one registry: ``METHODS[name](ctx, **options) -> MethodResult``."""

from . import (baselines, learned_soup, manifold_mix, model_stock,  # noqa: F401  (register)
               task_arithmetic, ties_merging)
from .base import METHOD_INFO, METHODS, MethodResult, SoupContext, ValidationJudge, register

__all__ = ["METHODS", "METHOD_INFO", "MethodResult", "SoupContext", "ValidationJudge",
           "register"]
