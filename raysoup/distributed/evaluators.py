"""The evaluator pool: actors that hold the model and their validation rows, and the
pool that judges whole models on every evaluation set through them."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import RayTaskError

from ..cache import JudgementCache, set_key
from ..components import Components
from ..errors import RaysoupError
from ..evaluate import VAL
from ..inputs.data import EvalSetSource
from ..inputs.model import ModelSpec
from ..metrics import Metric
from ..mixing import StateDict, to_numpy
from ..numerics import Numerics, runtime_env
from ..search import first_model
from .workers import EvaluatorActor


@dataclass(frozen=True)
class EvaluatorSpec:
    """Where evaluator actors run and what they hold."""

    count: int
    mode: str  # "sharded": every trial uses all; "whole": one per trial
    cpus: float = 1.0
    gpus: float = 0.0
    autocast_bf16: bool = False
    timeout_s: float = 600.0  # one evaluation; past it the trial fails loudly and is retried
    numerics: Numerics = "portable"  # which CPU kernels compute (raysoup.numerics)
    metric: Metric | None = None  # what a model is judged by; None: top-1 correctness


def start_evaluators(
    spec: ModelSpec,
    sources: Mapping[str, EvalSetSource],
    components: Components,
    evaluators: EvaluatorSpec,
    start_timeout_s: float = 600.0,
) -> list:
    """The evaluator actors: each holds its validation rows (all of them in "whole" mode)
    and streams its share of every other set's rows when a model is judged."""
    val_shards = evaluators.count if evaluators.mode == "sharded" else 1
    actors = [
        EvaluatorActor.options(
            num_cpus=evaluators.cpus,
            num_gpus=evaluators.gpus,
            runtime_env=runtime_env(evaluators.numerics),
        ).remote(
            spec,
            dict(sources),
            i % val_shards,
            val_shards,
            i,
            evaluators.count,
            components,
            int(max(1, evaluators.cpus)),
            evaluators.autocast_bf16,
            evaluators.numerics,
            evaluators.metric,
        )
        for i in range(evaluators.count)
    ]
    ready, pending = ray.wait(
        [a.ready.remote() for a in actors], num_returns=len(actors), timeout=start_timeout_s
    )
    if pending:
        for actor in actors:
            ray.kill(actor)
        raise RaysoupError(
            f"only {len(ready)} of {len(actors)} evaluator actors started "
            f"within {start_timeout_s:g} s (each asks for {evaluators.cpus:g} "
            f"CPU, {evaluators.gpus:g} GPU); check the cluster's resources"
        )
    try:
        ray.get(ready)  # surfaces a failed start (e.g. an unreadable validation file)
    except RayTaskError as e:
        for actor in actors:
            ray.kill(actor)
        if isinstance(e.cause, RaysoupError):  # one clear line: a CPU the numerics refuse
            raise e.cause from None
        raise
    return actors


def evaluator_domain(actors: list) -> str:
    """The numeric domain the evaluators compute in; one, or they would not agree on a
    model's results."""
    domains = sorted(set(ray.get([a.ready.remote() for a in actors])))
    if len(domains) > 1:
        raise RaysoupError(
            f"the evaluators compute in {len(domains)} numeric domains "
            f"({'; '.join(domains)}): their results would depend on which "
            f'node judged which rows; use resources.numerics = "portable" '
            f"or nodes of one CPU model"
        )
    return domains[0]


@contextmanager
def timeout_as_error(timeout_s: float, what: str):
    """An evaluation past resources.eval_timeout_s outside a Tune trial (which would retry
    it): one clear error instead of Ray's traceback."""
    try:
        yield
    except ray.exceptions.GetTimeoutError:
        raise RaysoupError(
            f"{what} took longer than resources.eval_timeout_s = {timeout_s:g} "
            f"s; raise it for slow evaluators or large sets"
        ) from None


class EvaluatorPool:
    """The evaluator actors as one judge of whole models: per-image correctness on any
    evaluation set, every set's rows split across all actors and joined here in row order,
    through the judgement cache. No model is ever built in the calling process."""

    def __init__(
        self,
        actors: list,
        evaluators: EvaluatorSpec,
        spec: ModelSpec,
        sources: Mapping[str, EvalSetSource],
        cache: JudgementCache | None = None,
    ):
        self.actors, self.evaluators, self.cache = actors, evaluators, cache
        self.sources = dict(sources)
        self.domain = evaluator_domain(actors)
        self.set_keys = {
            name: key
            for name, source in self.sources.items()
            if (
                key := set_key(
                    source.sha256,
                    spec,
                    source.class_map,
                    evaluators.autocast_bf16 and evaluators.gpus > 0,
                    self.domain,
                    evaluators.metric,
                )
            )
        }

    @property
    def set_names(self) -> list[str]:
        return list(self.sources)

    def _judge(self, state_dict: StateDict, sets: list[str]) -> dict[str, np.ndarray]:
        refs = [ray.put(to_numpy(state_dict)), ray.put(first_model)]
        whole_val = self.evaluators.mode != "sharded"
        calls = {
            name: [
                a.judge.remote(refs, np.zeros(0), name)
                for a in (self.actors[:1] if name == VAL and whole_val else self.actors)
            ]
            for name in sets
        }
        with timeout_as_error(self.evaluators.timeout_s, f"judging a model on {sets}"):
            return {
                name: np.concatenate(ray.get(parts, timeout=self.evaluators.timeout_s))
                for name, parts in calls.items()
            }

    def correctness(
        self, state_dict: StateDict, sets: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        sets = self.set_names if sets is None else sets
        if self.cache is None:
            return self._judge(state_dict, sets)
        return self.cache.correctness(
            state_dict, self.set_keys, sets, lambda missing: self._judge(state_dict, missing)
        )

    def accuracy(self, state_dict: StateDict, set_name: str = VAL) -> float:
        return float(self.correctness(state_dict, [set_name])[set_name].mean())

    def learn(self, fn, models: list[StateDict], config):
        """fn(evaluator, "val", models, components, config) in the first evaluator, on all
        of val (`fn` travels by reference: a function of a raysoup.methods module)."""
        refs = [ray.put(to_numpy(m)) for m in models]
        return ray.get(self.actors[0].learn.remote(fn, refs, config))

    def statistic(self, fn, state_dict: StateDict, config) -> dict[str, np.ndarray]:
        """A per-row statistic of a model on all of val: each actor's sums over its shard
        (one actor's, when each holds all of val), added up and divided by the rows."""
        ref = ray.put(to_numpy(state_dict))
        actors = self.actors if self.evaluators.mode == "sharded" else self.actors[:1]
        with timeout_as_error(self.evaluators.timeout_s, f"{fn.__name__} of a model on val"):
            parts = ray.get(
                [a.statistic.remote(fn, ref, config) for a in actors],
                timeout=self.evaluators.timeout_s,
            )
        rows = sum(n for _, n in parts)
        return {k: sum(p[k] for p, _ in parts) / rows for k in parts[0][0]}
