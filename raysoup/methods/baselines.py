"""The model soups baselines: best individual, uniform soup, greedy soup (arXiv 2203.05482)."""

from __future__ import annotations

from ..mixing import RunningSum, average
from .base import MethodResult, SoupContext, register


@register("best_individual")
def best_individual(ctx: SoupContext) -> MethodResult:
    name, _ = ctx.ranking[0]
    return MethodResult(ctx.pool.load(name), [name], 0)


@register("uniform_soup")
def uniform_soup(ctx: SoupContext) -> MethodResult:
    names = ctx.pool.names
    return MethodResult(average(ctx.pool.load(n) for n in names), names, 0, ranked=False)


@register("greedy_soup")
def greedy_soup(ctx: SoupContext, strict: bool = False) -> MethodResult:
    """Add a candidate when the soup with it scores >= on val (the paper's rule), or > with
    ``strict`` (the model soups code's rule)."""
    names = [ctx.ranking[0][0]]
    soup, best = ctx.pool.load(names[0]), ctx.ranking[0][1]
    running = RunningSum()
    running.add(soup)
    evaluations = 0
    for candidate, _ in ctx.ranking[1:]:
        weights = ctx.pool.load(candidate)
        trial = running.mean(extra=weights)
        acc = ctx.judge(trial)
        evaluations += 1
        if acc > best or (acc == best and not strict):
            running.add(weights)
            names, soup, best = [*names, candidate], trial, acc
    return MethodResult(soup, names, evaluations)
