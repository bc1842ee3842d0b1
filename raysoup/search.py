"""The search interface ManifoldMix calls, and its plain in-process implementation.

A search holds a few resident models (the accumulator A and the candidate C in phase 1;
the accepted ingredients in phase 2) and a *mixer* that turns a point x into one mixed
state dict of them. It answers two questions: the validation accuracy at one point, and
the best point a nevergrad optimiser finds within bounds and a budget. ``LocalSearch``
does both in this process; ``raysoup.distributed.TuneSearch`` does them on a Ray cluster.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import nevergrad as ng
import numpy as np

from .components import Components
from .errors import RaysoupError
from .mixing import StateDict, mix, weighted_sum
from .typed import known_optimizer

# scipy's Cobyla (behind nevergrad) warns that its final trust radius is below the default
# for our small bounded ranges and adjusts it itself; nothing for users to act on.
warnings.filterwarnings("ignore", message="COBYLA: Invalid", category=UserWarning)

# x -> mixed state dict of the resident models
Mixer = Callable[[Sequence[StateDict], np.ndarray, Components], StateDict]
Bound = float | np.ndarray  # an optimiser bound: one for every coordinate, or one each


def lerp_mixer(models: Sequence[StateDict], x: np.ndarray, components: Components) -> StateDict:
    """Phase 1: x are per-component lambdas, A' = lambda A + (1 - lambda) C."""
    accumulator, candidate = models
    return mix(accumulator, candidate, x, components)


@dataclass(frozen=True)
class ScaledBetaMixer:
    """Phase 2: x are per-(ingredient, component) scales mu of beta, renormalised per
    component so that every column still sums to 1."""

    betas: np.ndarray

    def weights(self, x: np.ndarray) -> np.ndarray:
        scaled = self.betas * np.asarray(x, dtype=np.float64).reshape(self.betas.shape)
        return scaled / scaled.sum(axis=0, keepdims=True)

    def __call__(
        self, models: Sequence[StateDict], x: np.ndarray, components: Components
    ) -> StateDict:
        return weighted_sum(lambda j: models[j], self.weights(x), components)


@dataclass
class PassResult:
    """The outcome of one optimiser pass: the best point seen and its accuracy."""

    x: np.ndarray
    accuracy: float
    evaluations: int
    optimizer: str
    trace: list[float] = field(default_factory=list)  # accuracy per evaluation, in tell order
    points: list[np.ndarray] = field(default_factory=list)  # the evaluated points, same order


class Search(Protocol):
    def set_models(self, models: Sequence[StateDict], mixer: Mixer) -> None: ...

    def accuracy(self, x: np.ndarray) -> float: ...

    def optimise(
        self, start: np.ndarray, lower: Bound, upper: Bound, budget: int, seed: int, name: str
    ) -> PassResult: ...


def check_optimizer(name: str, num_workers: int) -> None:
    """Fail early, before any cluster work, on a name nevergrad does not know or a
    strictly sequential optimiser asked to run trials in parallel."""
    try:
        known_optimizer(name)
    except ValueError as e:
        raise RaysoupError(str(e)) from None
    if num_workers < 1:
        raise RaysoupError(f"num_workers must be at least 1, got {num_workers}")
    if num_workers > 1 and getattr(ng.optimizers.registry[name], "no_parallelization", False):
        raise RaysoupError(
            f"optimizer {name!r} is strictly sequential; use num_workers = 1 "
            "or a parallel optimizer such as TwoPointsDE or CMA"
        )


def make_optimizer(
    name: str,
    start: np.ndarray,
    lower: Bound,
    upper: Bound,
    budget: int,
    num_workers: int,
    seed: int,
) -> ng.optimizers.base.Optimizer:
    """A seeded optimiser over one bounded vector x, starting at `start`; the bounds are
    one value for every coordinate or one per coordinate.

    Pickling is enabled before the first ask: Tune checkpoints its searcher, and the
    scipy-backed sequential optimisers (Cobyla, the one NGOpt picks for small budgets)
    can only be pickled when they record their history from the start.
    """
    start = np.clip(np.asarray(start, dtype=np.float64), lower, upper)
    space = ng.p.Instrumentation(x=ng.p.Array(init=start, lower=lower, upper=upper))
    space.random_state.seed(seed)
    optimizer = ng.optimizers.registry[name](
        parametrization=space, budget=budget, num_workers=num_workers
    )
    optimizer.enable_pickling()
    return optimizer


def chosen_name(optimizer: ng.optimizers.base.Optimizer) -> str:
    """The algorithm actually running (NGOpt delegates to one it picks)."""
    inner = getattr(optimizer, "optim", None)
    return f"{optimizer.name}->{inner.name}" if inner is not None else optimizer.name


def best_index(accuracies: list[float]) -> int:
    """Index of the best evaluation; ties go to the earliest, so results are reproducible."""
    return int(np.argmax(accuracies))


class LocalSearch:
    """Evaluations and optimiser passes in this process: a plain nevergrad ask/tell loop."""

    def __init__(
        self, judge: Callable[[StateDict], float], components: Components, num_workers: int = 1
    ):
        self.judge = judge
        self.components = components
        self.num_workers = num_workers
        self.models: Sequence[StateDict] = ()
        self.mixer: Mixer = lerp_mixer

    def set_models(self, models: Sequence[StateDict], mixer: Mixer) -> None:
        self.models, self.mixer = models, mixer

    def accuracy(self, x: np.ndarray) -> float:
        return self.judge(self.mixer(self.models, np.asarray(x), self.components))

    def optimise(
        self, start: np.ndarray, lower: Bound, upper: Bound, budget: int, seed: int, name: str
    ) -> PassResult:
        optimizer = make_optimizer(name, start, lower, upper, budget, self.num_workers, seed)
        points, accuracies = [], []
        while len(points) < budget:
            # Ask a batch of num_workers points before telling any, as parallel workers would.
            batch = [optimizer.ask() for _ in range(min(self.num_workers, budget - len(points)))]
            for candidate in batch:
                x = candidate.kwargs["x"]
                acc = self.accuracy(x)
                # -accuracy, as Tune's NevergradSearch tells in mode "max": the same
                # losses keep this loop and the Tune path bit-identical.
                optimizer.tell(candidate, -acc)
                points.append(x)
                accuracies.append(acc)
        best = best_index(accuracies)
        return PassResult(
            points[best], accuracies[best], len(points), chosen_name(optimizer), accuracies, points
        )


def first_model(models: Sequence[StateDict], x: np.ndarray, components: Components) -> StateDict:
    """No mixing: scores a single resident model (ranking the ingredients)."""
    return models[0]
