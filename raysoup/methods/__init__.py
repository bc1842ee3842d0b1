"""Merge methods behind one registry: ``METHODS[name](ctx, **options) -> MethodResult``."""

from . import (adamerging, baselines, fisher_merging, iso_c,  # noqa: F401  (register)
               learned_soup, manifold_mix, model_stock, regmean, task_arithmetic,
               ties_merging, tsv_merge)
from .base import METHOD_INFO, METHODS, MethodResult, SoupContext, ValidationJudge, register

__all__ = ["METHODS", "METHOD_INFO", "MethodResult", "SoupContext", "ValidationJudge",
           "register"]
