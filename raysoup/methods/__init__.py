"""Merge methods behind one registry: ``METHODS[name](ctx, **options) -> MethodResult``."""

# Registration order is the configuration reference's order of sections.
from . import (  # noqa: F401, I001  (register)
    baselines, fisher_merging, iso_c, learned_soup, manifold_mix, model_stock,
    task_arithmetic, ties_merging, tsv_merge, regmean, adamerging,
)
from .base import METHOD_INFO, METHODS, MethodResult, SoupContext, ValidationJudge, register

__all__ = ["METHODS", "METHOD_INFO", "MethodResult", "SoupContext", "ValidationJudge",
           "register"]
