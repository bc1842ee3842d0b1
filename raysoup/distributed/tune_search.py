"""The Search of raysoup.search on Ray: one Tune run per optimiser pass, whose trials are
mixing points scored by the evaluator actors."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import ray
from ray import tune
from ray.tune.search import Searcher
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..cache import PointCache
from ..errors import RaysoupError
from ..inputs.pool import state_dict_sha256
from ..mixing import StateDict, to_numpy
from ..search import Bound, Mixer, PassResult, best_index, chosen_name, make_optimizer
from .evaluators import EvaluatorSpec, timeout_as_error
from .racing import Racing, RacingScheduler
from .workers import (
    METRIC,
    ResidentModels,
    evaluate_points,
    mixing_trial,
    racing_trial,
    told_accuracies,
)

logger = logging.getLogger(__name__)


def quiet_tune() -> None:
    """Before the first Tune run: Tune's per-trial loggers (CSV, JSON, TensorBoard) cost
    tens of ms per trial, and our history and report carry everything they would write;
    Tune's own output stays quiet (the driver prints one line per candidate step), and its
    "could not fetch metrics" warnings only say that those loggers are off."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)


PENALTY = 0.0  # accuracy told to the optimiser for a trial that failed for good


class BatchNevergradSearch(Searcher):
    """A nevergrad optimiser behind Tune, one trial per batch of points asked together.

    Each trial is `batch` points asked before any is told (the optimiser's num_workers),
    evaluated at once on the evaluators and told back point by point in ask order, and
    trials run one at a time. The optimiser thus sees exactly the asks and tells of
    LocalSearch's plain loop with the same num_workers, and Tune starts one trial (not one
    actor) per batch: parallel optimisers pay no trial start-up per point.

    A trial that failed for good is told the worst accuracy for each of its points:
    sequential optimisers (Cobyla, and NGOpt when it picks Cobyla) block the next ask()
    until the previous point is told, and would otherwise wait forever.

    Racing (batches of one): each trial gets the incumbent, the best point evaluated in
    full so far with its per-image results; a trial stopped early is told its paired
    estimate (raysoup.distributed.racing).
    """

    def __init__(self, optimizer, budget: int, batch: int, val_rows: int, racing: bool = False):
        super().__init__(metric=METRIC, mode="max")
        self.optimizer, self.budget, self.batch = optimizer, budget, batch
        self.val_rows, self.racing = val_rows, racing
        self.asked: dict[str, list] = {}  # trial id -> its candidates, in ask order
        self.suggested = 0
        self.told: list[tuple[np.ndarray, float]] = []  # (x, accuracy) in tell order
        self.penalized = 0  # points of trials that failed for good
        self.cached = 0  # points whose accuracy came from the point cache
        self.stopped = 0  # raced points stopped before their last chunk
        self.forwards = 0  # validation images evaluated
        self.incumbent: tuple[float, np.ndarray] | None = None  # (accuracy, packed hits)

    def suggest(self, trial_id: str) -> dict | str:
        if self.suggested >= self.budget:
            return Searcher.FINISHED
        n = min(self.batch, self.budget - self.suggested)
        self.asked[trial_id] = [self.optimizer.ask() for _ in range(n)]
        self.suggested += n
        config = {
            "points": [c.kwargs["x"] for c in self.asked[trial_id]],
            "val_rows": self.val_rows,
        }
        if self.racing:
            config["incumbent"] = self.incumbent
        return config

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        candidates = self.asked.pop(trial_id)
        accuracies = None if error else told_accuracies(result)
        if accuracies is None:
            self.penalized += len(candidates)
            accuracies = [PENALTY] * len(candidates)
        else:
            self.cached += result.get("cached", 0)
            self.stopped += "accuracies" not in result  # a raced point stopped early
            self.forwards += result.get("seen", 0)
            if "hits" in result and (self.incumbent is None or accuracies[0] > self.incumbent[0]):
                self.incumbent = (accuracies[0], result["hits"])
        for candidate, accuracy in zip(candidates, accuracies):
            self.optimizer.tell(candidate, -accuracy)  # nevergrad minimises
            self.told.append((candidate.kwargs["x"], accuracy))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class RetryCounter(tune.Callback):
    """Counts Tune's retries of failed trials (a trial actor on a lost node, a timeout)."""

    def __init__(self):
        self.retried = 0

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.retried += 1


class PassProgress(tune.Callback):
    """Progress of one optimiser pass as plain log lines (a terminal and `ray job logs`
    show them alike): evaluations done of the budget, the best accuracy so far,
    evaluations per second and an ETA; every `interval_s` while the pass runs, and once at
    its end (a debug line: short passes stay quiet on the console, the run's log file
    keeps it)."""

    def __init__(self, name: str, budget: int, interval_s: float):
        self.name, self.budget, self.interval_s = name, budget, interval_s
        self.done, self.best = 0, float("nan")
        self.start = self.last = time.perf_counter()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if METRIC in result and not result[METRIC] <= self.best:  # NaN-safe max
            self.best = result[METRIC]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += len(trial.config["points"])
        now = time.perf_counter()
        if now - self.last >= self.interval_s or self.done == self.budget:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            line = (
                f"[tune] {self.name}: {self.done}/{self.budget} evaluations, best "
                f"{100 * self.best:.2f}, {rate:.1f} evals/s, ETA "
                f"{(self.budget - self.done) / rate:.0f} s"
            )
            logger.log(logging.DEBUG if self.done == self.budget else logging.INFO, line)

    on_trial_error = on_trial_complete


class TuneSearch:
    """The Search of raysoup.search on Ray: one Tune run per optimiser pass."""

    def __init__(
        self,
        actors: list,
        evaluators: EvaluatorSpec,
        num_workers: int,
        storage_path: Path,
        max_failures: int = 2,
        cache_root: str | None = None,
        val_key: str | None = None,
        callbacks: Callable[[str, dict], list] = lambda name, params: [],
        progress_interval_s: float = 10.0,
        racing: Racing | None = None,
    ):
        """`cache_root` and `val_key` (the validation set's judgement key): keep measured
        points in a PointCache there; None: measure every point. `callbacks` makes the
        extra Tune callbacks of a pass from its name and settings (tracking). `racing`:
        race every pass's points against the pass's best (num_workers = 1)."""
        if racing is not None and num_workers != 1:
            raise RaysoupError(f"racing scores one point at a time; num_workers is {num_workers}")
        self.callbacks, self.progress_interval_s = callbacks, progress_interval_s
        self.racing = racing
        rows = ray.get([a.val_rows.remote() for a in actors])
        self.val_rows = sum(rows) if evaluators.mode == "sharded" else rows[0]
        self.forwards = 0  # validation images evaluated, over every pass and promise test
        self.stopped_points = 0  # raced points stopped early, over every pass
        self.actors = actors
        self.evaluators = evaluators
        self.cache_root, self.val_key = cache_root, val_key
        self.cache: PointCache | None = None
        self.cached_points = 0  # evaluations answered by the point cache, over every pass
        self.num_workers = num_workers
        # Local (a URI `out` stages it too, raysoup.rundir): the run uploads it with each
        # step, so Tune's own periodic syncing to a URI adds nothing a resume uses.
        self.storage_path = Path(storage_path).resolve()
        self.storage_path.mkdir(parents=True, exist_ok=True)
        self.max_failures = max_failures
        quiet_tune()
        self.refs: list[ray.ObjectRef] = []  # the resident models, then the mixer
        # On the driver's node: it fails only with the driver, which a resume restarts.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.resident = ResidentModels.options(scheduling_strategy=here).remote()
        # Continue numbering after earlier (or pre-resume) passes: names never collide.
        self.passes = len([p for p in self.storage_path.iterdir() if p.is_dir()])

    def set_models(self, models: Sequence[StateDict], mixer: Mixer) -> None:
        # Once per step into the object store, shared by every trial and evaluator.
        self.refs = [*(ray.put(to_numpy(m)) for m in models), ray.put(mixer)]
        ray.get(self.resident.set.remote(self.refs))  # what the trials will evaluate
        if self.cache_root is not None and self.val_key is not None:
            e = self.evaluators
            # val_key holds the set, the model, the metric and the numeric domain;
            # racing scores a point in other batches than a full evaluation does.
            scope = [
                self.val_key,
                e.count,
                e.mode,
                e.gpus > 0,
                e.autocast_bf16,
                self.racing.chunks if self.racing else None,
                ray.cloudpickle.dumps(mixer).hex(),
                *map(state_dict_sha256, models),
            ]
            self.cache = PointCache(str(self.cache_root), json.dumps(scope))

    def accuracy(self, x: np.ndarray) -> float:
        with timeout_as_error(self.evaluators.timeout_s, "an evaluation (a promise test)"):
            (accuracy,), cached = evaluate_points(
                self.actors,
                self.evaluators.mode,
                self.refs,
                [np.asarray(x)],
                self.evaluators.timeout_s,
                self.cache,
            )
        self.cached_points += cached
        self.forwards += self.val_rows * (1 - cached)
        return accuracy

    def optimise(
        self, start: np.ndarray, lower: Bound, upper: Bound, budget: int, seed: int, name: str
    ) -> PassResult:
        optimizer = make_optimizer(name, start, lower, upper, budget, self.num_workers, seed)
        searcher = BatchNevergradSearch(
            optimizer, budget, self.num_workers, self.val_rows, racing=self.racing is not None
        )
        common = {
            "actors": self.actors,
            "mode": self.evaluators.mode,
            "resident": self.resident,
            "timeout_s": self.evaluators.timeout_s,
            "cache": self.cache,
        }
        if self.racing is None:
            trainable, scheduler = tune.with_parameters(mixing_trial, **common), None
        else:
            trainable = tune.with_parameters(racing_trial, chunks=self.racing.chunks, **common)
            scheduler = RacingScheduler(self.racing)
        self.passes += 1
        pass_name = f"pass-{self.passes:04d}"
        settings = {
            "optimizer": name,
            "budget": budget,
            "seed": seed,
            "num_workers": self.num_workers,
            "dimensions": len(start),
        }
        retries = RetryCounter()
        tuner = tune.Tuner(
            # Trials only dispatch to the evaluators: no CPU, a token bundle so Tune can place them.
            tune.with_resources(trainable, {"cpu": 0, "memory": 1}),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=-(-budget // self.num_workers),
                max_concurrent_trials=1,
                reuse_actors=True,
                scheduler=scheduler,
            ),
            run_config=tune.RunConfig(
                name=pass_name,
                storage_path=str(self.storage_path),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                callbacks=[
                    retries,
                    PassProgress(f"pass {self.passes}", budget, self.progress_interval_s),
                    *self.callbacks(pass_name, settings),
                ],
            ),
        )
        results = tuner.fit()
        if retries.retried:
            logger.info(f"[tune] pass {self.passes}: {retries.retried} retry(ies) of failed trials")
        if searcher.penalized and searcher.penalized == len(searcher.told):
            # Nothing was measured: a result built on penalties alone would be meaningless.
            first = str(results.errors[0]).strip().splitlines()[-1] if results.errors else "?"
            raise RaysoupError(
                f"every trial of optimiser pass {self.passes} failed "
                f"({searcher.penalized} point(s), max_failures = "
                f"{self.max_failures}); last line of the first error: {first}"
            )
        if searcher.penalized:
            logger.info(
                f"[tune] pass {self.passes}: {searcher.penalized} point(s) failed after "
                f"retries and were scored {PENALTY}"
            )
        self.cached_points += searcher.cached
        self.forwards += searcher.forwards
        self.stopped_points += searcher.stopped
        if self.racing is not None:
            logger.debug(
                f"[tune] pass {self.passes}: racing stopped {searcher.stopped} of "
                f"{budget} points early; {searcher.forwards} validation forwards"
            )
        accuracies = [float(acc) for _, acc in searcher.told]
        best = best_index(accuracies)
        points = [np.asarray(x) for x, _ in searcher.told]
        return PassResult(
            points[best],
            accuracies[best],
            len(accuracies),
            chosen_name(optimizer),
            accuracies,
            points,
        )
