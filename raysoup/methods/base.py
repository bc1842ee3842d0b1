"""What every merge method gets (a pool, a validation judge, the ranking, the components,
a search, the pretrained weights, the data passes on the evaluators, a step checkpoint) and
returns: ``METHODS[name](ctx, config) -> MethodResult``. ``METHOD_INFO[name]`` holds the
method's hooks: its config section, what it needs before a run starts (the pretrained
weights, a check of the pool), its line of the plan, and the files it writes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar

import numpy as np
from pydantic import Field

from ..components import Components
from ..errors import RaysoupError
from ..inputs.pool import IngredientPool
from ..mixing import StateDict
from ..search import Mixer, Search
from ..typed import Interval, Optimizer, section_config

if TYPE_CHECKING:
    from ..checkpoint import StepCheckpoint

logger = logging.getLogger(__name__)


class ValidationJudge:
    """Validation accuracy of a state dict: the only signal any method may select on.
    `rows`: the validation images behind it, where known (one image is 1 / rows)."""

    def __init__(self, accuracy: Callable[[StateDict], float], rows: int | None = None):
        self._accuracy = accuracy
        self.rows = rows
        self.evaluations = 0

    def __call__(self, state_dict: StateDict) -> float:
        self.evaluations += 1
        return self._accuracy(state_dict)


def closeness(accuracy: float, best: float, rows: int | None) -> str | None:
    """How close an accept/reject decision against the best so far was: "tie" (the same
    count of correct images, where a non-strict rule accepts and a strict one rejects),
    "one image" (one image either way: one flipped image on another CPU, or a run on
    another numeric domain, would change it), else None."""
    if accuracy == best:
        return "tie"
    if rows and round(abs(accuracy - best) * rows) <= 1:
        return "one image"
    return None


def count_close(history: Sequence[dict]) -> dict[str, int]:
    """How many of a method's decisions were a tie or one image (its history rows'
    `closeness`)."""
    return {
        kind: sum(step.get("closeness") == kind for step in history)
        for kind in ("tie", "one image")
    }


@dataclass
class SoupContext:
    pool: IngredientPool
    judge: ValidationJudge
    ranking: list[tuple[str, float]]  # (ingredient, val accuracy), best first
    components: Components | None = None  # the weights' partition, for per-component mixing
    search: Search | None = None  # evaluates and optimises mixing points
    pretrained: StateDict | None = None  # the manifest's `pretrained` (task-vector methods)
    # The data passes of methods that read the validation images, run where the evaluators
    # are (on Ray, in the evaluator actors; in-process in tests). `learn(fn, models,
    # config)`: fn(evaluator, "val", models, components, config) in one evaluator holding
    # all of val (gradient methods: learned soup, AdaMerging). `statistic(fn, state_dict,
    # config)`: fn(evaluator, "val", state_dict, config, stream) -> (sums per key, rows) on
    # every validation shard, the sums added up and divided by the rows (Fisher, Gram).
    learn: Callable[[Callable, Sequence[StateDict], object], object] | None = None
    statistic: Callable[[Callable, StateDict, object], dict[str, np.ndarray]] | None = None
    # A method that works in steps saves each completed one here and resumes from the last
    # (raysoup.checkpoint.StepCheckpoint; None: nothing is kept, as in tests).
    checkpoint: StepCheckpoint | None = None
    # Per-step metrics to the run's trackers: track(step, {name: number or text}).
    track: Callable[[int, dict], None] | None = None

    @classmethod
    def rank(cls, pool: IngredientPool, judge: ValidationJudge, **rest) -> SoupContext:
        scores = [(name, judge(pool.load(name))) for name in pool.names]
        # Stable sort: ties keep pool order, so the ranking is deterministic.
        return cls(pool, judge, sorted(scores, key=lambda s: -s[1]), **rest)


@dataclass
class MethodResult:
    state_dict: StateDict
    ingredients: list[str]
    evaluations: int  # validation evaluations the method spent beyond the ranking
    ranked: bool = True  # used the shared ranking (its cost is charged to the method)
    details: object | None = None  # a method's own typed record (a dataclass), if any

    def details_dict(self) -> dict:
        return asdict(self.details) if self.details is not None else {}


Method = Callable[..., MethodResult]
METHODS: dict[str, Method] = {}


@dataclass(frozen=True)
class MethodInfo:
    """A method's hooks. Before any cluster work: its config (the TOML section of its name),
    whether it needs the manifest's `pretrained`, a check of the pool and config, and its
    line of `raysoup check`'s plan, plan(config, ingredients, components). `resumable`: it
    saves its steps in `ctx.checkpoint`, which `--resume` continues. `write(out, row,
    state_dict)`: its own files beside the report from its report row (and its merged
    weights; None when `raysoup report` redraws figures), returning their names."""

    config: type | None = None
    needs_pretrained: bool = False
    check: Callable[[IngredientPool, object], None] | None = None
    plan: Callable[[object, int, int], str] | None = None
    resumable: bool = False
    write: Callable[[Path, dict, StateDict | None], list[str]] | None = None

    def plan_line(self, config, ingredients: int, components: int) -> str:
        if self.plan is not None:
            return self.plan(config, ingredients, components)
        if hasattr(config, "budget"):
            return f"{config.optimizer}, {config.budget} evaluations"
        return "no validation search"


METHOD_INFO: dict[str, MethodInfo] = {}


def register(name: str, **info) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name], METHOD_INFO[name] = fn, MethodInfo(**info)
        return fn

    return wrap


# KnobSearch's budget, for a subclass that gives it another default.
Budget = Annotated[int, Field(ge=1, description="validation evaluations of the search")]
ScaleBounds = Interval()  # the range of a merge's scale (lambda, alpha): any lower < upper


@section_config
class KnobSearch:
    """A merge method's continuous knobs chosen on val by the run's search (Tune +
    nevergrad on the evaluator pool, as ManifoldMix's passes). Subclasses name their TOML
    section (SECTION) and say what it does in a line (SUMMARY, its comment in the example
    config); their keys' bounds are their types'."""

    SECTION: ClassVar[str] = ""
    SUMMARY: ClassVar[str] = ""
    optimizer: Annotated[Optimizer, Field(description="the search's nevergrad optimizer")] = "NGOpt"
    budget: Budget = 10
    seed: Annotated[int, Field(ge=0, description="the search's seed")] = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class KnobDetails:
    knobs: dict[str, float]  # the chosen values
    val_accuracy: float
    optimizer: str
    trace: list[float]  # val accuracy per evaluation, in tell order


def tune_knobs(
    ctx: SoupContext,
    models: Sequence[StateDict],
    mixer: Mixer,
    names: list[str],
    start: Sequence[float],
    lower: Sequence[float],
    upper: Sequence[float],
    search: KnobSearch,
) -> tuple[StateDict, KnobDetails]:
    """The merged model at the best knob values the search finds for `mixer` over `models`
    within the bounds, and the search's record."""
    if ctx.search is None:
        raise RaysoupError("tuning a merge method's knobs needs the context's search")
    ctx.search.set_models(models, mixer)
    result = ctx.search.optimise(
        np.asarray(start, dtype=np.float64),
        np.asarray(lower),
        np.asarray(upper),
        search.budget,
        search.seed,
        search.optimizer,
    )
    knobs = {n: float(v) for n, v in zip(names, result.x)}
    logger.info(
        f"[{search.SECTION}] {result.evaluations} evaluations ({result.optimizer}): "
        + ", ".join(f"{n} {v:.4g}" for n, v in knobs.items())
        + f", val {100 * result.accuracy:.2f}"
    )
    return mixer(models, np.asarray(result.x), ctx.components), KnobDetails(
        knobs, result.accuracy, result.optimizer, [float(a) for a in result.trace]
    )
