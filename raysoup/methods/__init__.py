"""Merge methods behind one registry: ``METHODS[name](ctx, config) -> MethodResult``.

Every module (or package) in this folder is imported here, so a method registers itself
by being in it (docs/adding_a_method.md)."""

import importlib
import pkgutil

from .base import METHOD_INFO, METHODS, MethodResult, SoupContext, ValidationJudge, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "METHOD_INFO", "MethodResult", "SoupContext", "ValidationJudge", "register"]
