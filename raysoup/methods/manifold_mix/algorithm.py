"""ManifoldMixMS (arXiv 2309.08610), read top to bottom like the paper's algorithm box.

Input: ingredients ranked by validation accuracy (best first), a partition of the weights
into m components, and a Search that evaluates and optimises mixing points (in-process or
on a Ray cluster: the algorithm does not know which).

Phase 1
  A <- best ingredient, K <- 1
  for each candidate C, in ranking order:
      promise test: acc(K/(K+1) A + 1/(K+1) C) >= tau * acc(A), else skip C
      pass 1: optimise lambda in R^m from lambda0 = K/(K+1), bounds lambda0 +- delta (1 - lambda0),
              maximising acc(lambda A + (1 - lambda) C) per component
      if best acc >= acc(A):                               (accept; strict > as an option)
          pass 2 from the found lambda, bounds [0.3, 1]
          pass 3 likewise, if pass 2 gained a factor >= 1 + 0.3 (1 - tau)
          A <- lambda A + (1 - lambda) C, K <- K + 1, keep the lambda row
  unroll the lambda rows into beta (ingredients x components)
Phase 2 (optional): scale beta by mu in [0.7, 1.4] per cell, renormalise per component,
  optimise mu; keep it if it is at least as good on val.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, ClassVar

import numpy as np
from pydantic import Field

from ...components import Components
from ...errors import RaysoupError
from ...mixing import StateDict, lambdas_to_betas, mix, weighted_sum
from ...search import ScaledBetaMixer, Search, lerp_mixer
from ...typed import Interval, Optimizer, section_config
from ..base import MethodResult, SoupContext, closeness, count_close

logger = logging.getLogger(__name__)
WeightBounds = Interval(0, 1)  # bounds on a mixing weight lambda
ScaleBounds = Interval(0)  # bounds on a scale mu of beta


@section_config
class ManifoldMixConfig:
    """Every knob of the method; the defaults are the reference's published run. (The
    components and the points in flight are the run's [search].)"""

    SECTION: ClassVar[str] = "manifold_mix"
    SUMMARY: ClassVar[str] = "ManifoldMixMS (arXiv 2309.08610)"
    optimizer: Annotated[
        Optimizer, Field(description="any nevergrad name: Cobyla, CMA, TwoPointsDE, ...")
    ] = "NGOpt"
    evals_per_component: Annotated[
        int, Field(ge=1, description="budget per pass = components x this")
    ] = 30
    tau: Annotated[
        float, Field(gt=0, le=1, description="promise test: try C if acc(lerp) >= tau * acc(A)")
    ] = 0.998
    bounds_delta: Annotated[
        float, Field(gt=0, le=1, description="pass 1 bounds: lambda0 +- delta (1 - lambda0)")
    ] = 0.5
    later_pass_bounds: Annotated[WeightBounds, Field(description="bounds of passes 2 and 3")] = (
        0.3,
        1.0,
    )
    later_passes: Annotated[bool, Field(description="passes 2 and 3 after an acceptance")] = True
    third_pass_gain: Annotated[
        float, Field(ge=0, description="pass 3 if pass 2 gained >= 1 + this (1 - tau)")
    ] = 0.3
    strict: Annotated[bool, Field(description="accept on > instead of >=")] = False
    seed: Annotated[int, Field(ge=0, description="optimiser seed (the same for every pass)")] = 0
    phase2: Annotated[bool, Field(description="optional mu refinement of beta")] = False
    mu_bounds: Annotated[ScaleBounds, Field(description="phase 2: bounds of each mu")] = (0.7, 1.4)
    phase2_evals_per_weight: Annotated[
        int, Field(ge=1, description="phase 2 budget = ingredients x components x this")
    ] = 50

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MixState:
    """The sequential fused-model state: what a driver checkpoints after every step."""

    accumulator: StateDict
    accepted: list[str]
    accuracy: float
    lambda_rows: list[list[float]] = field(default_factory=list)
    next_candidate: int = 1  # position in the ranking of the next candidate to try
    history: list[dict] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return sum(step["evaluations"] for step in self.history)

    def summary(self) -> dict:
        """Everything but the weights (JSON-friendly)."""
        # Not asdict(): it would deep-copy the accumulator's tensors first.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "accumulator"}


def run_pass(
    search: Search,
    config: ManifoldMixConfig,
    start: np.ndarray,
    lower: float,
    upper: float,
    budget: int,
) -> dict:
    result = search.optimise(start, lower, upper, budget, config.seed, config.optimizer)
    return {
        "bounds": [lower, upper],
        "optimizer": result.optimizer,
        "evaluations": result.evaluations,
        "accuracy": result.accuracy,
        "x": [float(v) for v in result.x],
        "trace": [float(a) for a in result.trace],
    }  # accuracy per evaluation


def try_candidate(
    state: MixState,
    name: str,
    candidate: StateDict,
    search: Search,
    components: Components,
    config: ManifoldMixConfig,
    rows: int | None = None,
) -> tuple[dict, StateDict | None]:
    """One step of phase 1. Returns the history row and the new accumulator if accepted.
    `rows`: the validation images, to mark a verdict within one image of the best."""
    m = len(components)
    K = len(state.accepted)
    lambda0 = K / (K + 1)
    search.set_models([state.accumulator, candidate], lerp_mixer)

    promise = search.accuracy(np.full(m, lambda0))
    step = {
        "candidate": name,
        "promise_accuracy": promise,
        "passes": [],
        "evaluations": 1,
        "accuracy_before": state.accuracy,
        "accepted": False,
    }
    if promise < config.tau * state.accuracy:
        return step, None

    budget = m * config.evals_per_component
    delta = config.bounds_delta * (1.0 - lambda0)
    best = run_pass(search, config, np.full(m, lambda0), lambda0 - delta, lambda0 + delta, budget)
    step["passes"].append(best)
    accepted = best["accuracy"] > state.accuracy or (
        best["accuracy"] == state.accuracy and not config.strict
    )
    step["closeness"] = closeness(best["accuracy"], state.accuracy, rows)
    if accepted and config.later_passes:
        lo, hi = config.later_pass_bounds
        second = run_pass(search, config, np.array(best["x"]), lo, hi, budget)
        step["passes"].append(second)
        if (
            second["accuracy"]
            >= (1.0 + config.third_pass_gain * (1.0 - config.tau)) * best["accuracy"]
        ):
            step["passes"].append(run_pass(search, config, np.array(second["x"]), lo, hi, budget))
        # A later pass starts at the earlier optimum, so keeping the best loses nothing.
        best = max(step["passes"], key=lambda p: p["accuracy"])
    step["evaluations"] += sum(p["evaluations"] for p in step["passes"])
    step["accuracy"] = best["accuracy"]
    if not accepted:
        return step, None
    step.update(accepted=True, lambdas=best["x"])
    return step, mix(state.accumulator, candidate, best["x"], components)


def phase1(
    ranking: list[tuple[str, float]],
    load: Callable[[str], StateDict],
    components: Components,
    search: Search,
    config: ManifoldMixConfig,
    state: MixState | None = None,
    on_step: Callable[[MixState], None] | None = None,
    rows: int | None = None,
) -> MixState:
    if state is None:
        best, accuracy = ranking[0]
        state = MixState(load(best), [best], accuracy)
    for position in range(state.next_candidate, len(ranking)):
        name = ranking[position][0]
        step, accumulator = try_candidate(state, name, load(name), search, components, config, rows)
        if accumulator is not None:
            state.accumulator, state.accuracy = accumulator, step["accuracy"]
            state.accepted.append(name)
            state.lambda_rows.append(step["lambdas"])
        state.history.append(step)
        state.next_candidate = position + 1
        logger.info(progress_line(position, len(ranking), step, state))
        if on_step is not None:
            on_step(state)
    return state


def progress_line(position: int, total: int, step: dict, state: MixState) -> str:
    passes = " ".join(
        f"pass{i + 1} {100 * p['accuracy']:.2f}" for i, p in enumerate(step["passes"])
    )
    verdict = (
        "accepted" if step["accepted"] else ("rejected" if step["passes"] else "skipped (promise)")
    )
    if step.get("closeness"):
        verdict += f" (by {'a tie' if step['closeness'] == 'tie' else 'one image'})"
    return (
        f"[manifold_mix] {position}/{total - 1} {step['candidate']}: promise "
        f"{100 * step['promise_accuracy']:.2f}"
        + (f", {passes}" if passes else "")
        + f" -> {verdict}; best {100 * state.accuracy:.2f} with {len(state.accepted)} "
        f"ingredient(s), {state.evaluations} evals"
    )


def betas_of(state: MixState, m: int) -> np.ndarray:
    """Ingredients x components weights of the accepted ingredients (columns sum to 1)."""
    if not state.lambda_rows:
        return np.ones((1, m))
    return lambdas_to_betas(np.array(state.lambda_rows))


def phase2(
    state: MixState,
    betas: np.ndarray,
    load: Callable[[str], StateDict],
    components: Components,
    search: Search,
    config: ManifoldMixConfig,
) -> tuple[np.ndarray, dict]:
    """Refine beta by per-cell scales mu; keeps every accepted ingredient resident."""
    models = [load(n) for n in state.accepted]
    mixer = ScaledBetaMixer(betas)
    search.set_models(models, mixer)
    budget = betas.size * config.phase2_evals_per_weight
    result = run_pass(search, config, np.ones(betas.size), *config.mu_bounds, budget)
    improved = result["accuracy"] >= state.accuracy
    logger.info(
        f"[manifold_mix] phase 2: {100 * result['accuracy']:.2f} vs "
        f"{100 * state.accuracy:.2f} -> {'kept' if improved else 'discarded'}"
    )
    if improved:
        betas, state.accuracy = mixer.weights(np.array(result["x"])), result["accuracy"]
    return betas, {**result, "kept": improved}


@dataclass
class ManifoldMixDetails:
    components: list[str]
    betas: list[list[float]]  # accepted ingredients x components, columns sum to 1
    history: list[dict]  # one row per candidate step
    lambda_rows: list[list[float]]
    val_accuracy: float
    close_decisions: dict[str, int]  # how many verdicts were a tie or one image
    phase2: dict | None = None


def manifold_mix(
    ctx: SoupContext,
    config: ManifoldMixConfig,
    state: MixState | None = None,
    on_step: Callable[[MixState], None] | None = None,
) -> MethodResult:
    """`ctx` carries the components and the search; `state` and `on_step` resume from and
    write step checkpoints."""
    components, search = ctx.components, ctx.search
    if components is None or search is None:
        raise RaysoupError("manifold_mix needs the context's components and search")
    state = phase1(
        ctx.ranking, ctx.pool.load, components, search, config, state, on_step, ctx.judge.rows
    )
    betas = betas_of(state, len(components))
    fused, evaluations, phase2_record = state.accumulator, state.evaluations, None
    if config.phase2 and len(state.accepted) > 1:
        betas, phase2_record = phase2(state, betas, ctx.pool.load, components, search, config)
        evaluations += phase2_record["evaluations"]
        if phase2_record["kept"]:
            fused = weighted_sum(lambda j: ctx.pool.load(state.accepted[j]), betas, components)
    details = ManifoldMixDetails(
        list(components.names),
        betas.tolist(),
        state.history,
        state.lambda_rows,
        state.accuracy,
        count_close(state.history),
        phase2_record,
    )
    return MethodResult(fused, list(state.accepted), evaluations, details=details)
