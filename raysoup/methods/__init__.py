"""Merge methods behind one registry: ``METHODS[name](ctx, **options) -> MethodResult``."""

from . import (baselines, iso_c, learned_soup, manifold_mix,  # noqa: F401  (register)
               model_stock, task_arithmetic, ties_merging, tsv_merge)
from .base import METHOD_INFO, METHODS, MethodResult, SoupContext, ValidationJudge, register

__all__ = ["METHODS", "METHOD_INFO", "MethodResult", "SoupContext", "ValidationJudge",
           "register"]
