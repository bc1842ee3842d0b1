"""The model soups baselines: best individual, uniform soup, greedy soup (arXiv 2203.05482)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from ..mixing import RunningSum, average
from ..typed import section_config
from .base import MethodResult, SoupContext, closeness, count_close, register


@register("best_individual")
def best_individual(ctx: SoupContext) -> MethodResult:
    name, _ = ctx.ranking[0]
    return MethodResult(ctx.pool.load(name), [name], 0)


@register("uniform_soup")
def uniform_soup(ctx: SoupContext) -> MethodResult:
    names = ctx.pool.names
    return MethodResult(average(ctx.pool.load(n) for n in names), names, 0, ranked=False)


@section_config
class GreedySoupConfig:
    """The defaults are the paper's rule and raysoup's shared ranking."""

    SECTION: ClassVar[str] = "greedy_soup"
    SUMMARY: ClassVar[str] = ""
    strict: Annotated[bool, Field(description="accept on > instead of >=")] = False
    rank_ties: Annotated[
        Literal["pool_order", "reverse"],
        Field(
            description=(
                'ingredients tied on val: in pool order (the shared ranking), or "reverse" pool '
                "order (the model soups code: an ascending stable sort, reversed)"
            )
        ),
    ] = "pool_order"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GreedySoupDetails:
    history: list[dict]  # one row per candidate: accuracy, verdict, closeness
    close_decisions: dict[str, int]  # how many verdicts were a tie or one image


@register("greedy_soup", config=GreedySoupConfig, plan=lambda config, n, m: f"{n - 1} evaluations")
def greedy_soup(ctx: SoupContext, config: GreedySoupConfig = GreedySoupConfig()) -> MethodResult:
    """From the best ingredient, in ranking order, add a candidate when the soup with it
    scores >= on val (the paper's rule), or > with `strict` (the model soups code's)."""
    # Reversed before a stable sort: ties end in reverse pool order.
    reverse = sorted(ctx.ranking[::-1], key=lambda s: -s[1])  # noqa: C415
    ranking = ctx.ranking if config.rank_ties == "pool_order" else reverse
    names = [ranking[0][0]]
    soup, best = ctx.pool.load(names[0]), ranking[0][1]
    running = RunningSum()
    running.add(soup)
    evaluations, history = 0, []
    for candidate, _ in ranking[1:]:
        weights = ctx.pool.load(candidate)
        trial = running.mean(extra=weights)
        acc = ctx.judge(trial)
        evaluations += 1
        accepted = acc > best or (acc == best and not config.strict)
        history.append(
            {
                "candidate": candidate,
                "accuracy": acc,
                "accuracy_before": best,
                "accepted": accepted,
                "closeness": closeness(acc, best, ctx.judge.rows),
            }
        )
        if accepted:
            running.add(weights)
            names, soup, best = [*names, candidate], trial, acc
    return MethodResult(
        soup, names, evaluations, details=GreedySoupDetails(history, count_close(history))
    )
