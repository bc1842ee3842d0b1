"""What runs in the cluster's worker processes: the Tune trials, the evaluator actor and
the holder of a step's models for the trials.

Kept apart, with light imports, on purpose: each Tune run starts a fresh trial actor,
and unpickling a trial's actor handles imports the module that defines the actor class.
Here that costs ray and numpy only; importing torch and open_clip as well would add 5 to
20 s to every optimiser pass on 2 cores. The evaluator imports its heavy parts lazily.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray
from ray import tune

from ..cache import PointCache

METRIC = "accuracy"
VAL = "val"  # the evaluation set every decision uses (raysoup.evaluate.VAL)


@ray.remote(max_restarts=3, max_task_retries=3)
class EvaluatorActor:
    """Holds the model and a shard of the validation set; mixes and scores points, and
    judges models on its share of the rows of every evaluation set.

    The resident models and the mixer arrive as object refs with each call and are
    fetched once per step; a restarted actor simply fetches them again, so it keeps no
    state that a crash would lose, and a call lost with it is safely run again (Ray
    retries it): promise tests, rankings and reports survive a crash as Tune trials do.
    Report sets are streamed from their Arrow files a batch at a time, never held whole.
    """

    def __init__(
        self,
        spec,
        sources: dict,
        val_shard: int,
        val_shards: int,
        shard: int,
        shards: int,
        components,
        threads: int,
        autocast_bf16: bool,
        numerics: str = "portable",
        metric=None,
    ):
        import torch

        from .. import numerics as numeric_domains
        from ..console import console_logging
        from ..evaluate import Evaluator
        from ..inputs.data import EvalSet, read_eval_set, shard_rows, take
        from ..inputs.model import allow_models_here

        allow_models_here()
        console_logging()  # learned soup's progress lines reach the driver's console
        from ..errors import RaysoupError

        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.domain = numeric_domains.enter(numerics, threads, device)
        except RaysoupError as e:  # ready() raises it: one line, not an actor's death
            self.domain = e
            return
        full = read_eval_set(sources[VAL], spec.num_classes)
        rows = shard_rows(len(full), val_shard, val_shards)
        part = EvalSet(VAL, take(full.inputs, rows), full.labels[rows], full.class_map)
        self.evaluator = Evaluator(
            spec,
            [part],
            device=device,
            autocast_bf16=autocast_bf16,
            domain=self.domain,
            metric=metric,
        )
        self.spec, self.sources, self.shard, self.shards = spec, sources, shard, shards
        self.components = components
        self.whole_val = None  # an evaluator with every validation row, for learned soup
        # Racing's chunks: a fixed random order of this shard's rows, split in parts.
        self.race_order = np.random.default_rng(val_shard).permutation(len(part.labels))
        self.model_ids: tuple = ()
        self.models: list = []
        self.mixer = None
        self.loaded: tuple = ((), None)  # (model ids, x) of the weights in the evaluator

    def ready(self) -> str:
        """The numeric domain this evaluator computes in (raysoup.numerics)."""
        if isinstance(self.domain, Exception):
            raise self.domain
        return self.domain

    def val_rows(self) -> int:
        return len(self.race_order)

    def _resident(self, refs: Sequence[ray.ObjectRef]) -> None:
        ids = tuple(r.hex() for r in refs)
        if ids != self.model_ids:
            from ..mixing import from_numpy

            *model_refs, mixer_ref = refs
            device = self.evaluator.device
            # CPU: zero-copy views of the read-only object-store buffers, never written.
            self.models = [
                {k: v.to(device) for k, v in from_numpy(ray.get(r)).items()} for r in model_refs
            ]
            self.mixer = ray.get(mixer_ref)
            self.model_ids = ids

    def _load(self, refs: Sequence[ray.ObjectRef], x: np.ndarray) -> None:
        """The mix at x in the evaluator; mixed once for consecutive calls at one point
        (racing's chunks)."""
        self._resident(refs)
        x = np.asarray(x)
        ids, loaded = self.loaded
        if ids != self.model_ids or loaded is None or not np.array_equal(loaded, x):
            self.evaluator.load(self.mixer(self.models, x, self.components))
            self.loaded = (self.model_ids, x.copy())

    def correct(self, refs: Sequence[ray.ObjectRef], x: np.ndarray) -> tuple[float, int]:
        self._load(refs, x)
        return self.evaluator.correct(VAL)

    def chunk_hits(
        self, refs: Sequence[ray.ObjectRef], x: np.ndarray, chunk: int, chunks: int
    ) -> np.ndarray:
        """Per-image correctness at x on part `chunk` of `chunks` of this shard's rows, in
        a fixed random order (racing: right or wrong only)."""
        from ..metrics import as_binary

        self._load(refs, x)
        rows = np.array_split(self.race_order, chunks)[chunk]
        hits = self.evaluator.hits(VAL, rows).cpu().numpy()
        return (
            hits if self.evaluator.metric is None else as_binary(hits, self.evaluator.metric.name)
        )

    def judge(self, refs: Sequence[ray.ObjectRef], x: np.ndarray, set_name: str) -> np.ndarray:
        """Per-image correctness (or metric scores) at x: on the resident validation
        shard, or on this actor's share of another set's rows, streamed."""
        from ..inputs.data import iter_shard

        self._load(refs, x)
        if set_name == VAL:
            return self.evaluator.hits(VAL).cpu().numpy()
        source = self.sources[set_name]
        batches = (
            (self.evaluator.encode(inputs), labels)
            for inputs, labels in iter_shard(
                source, self.spec.num_classes, self.shard, self.shards, self.evaluator.batch_size
            )
        )
        return self.evaluator.score(batches, source.class_map).cpu().numpy()

    def learn(self, fn, model_refs: Sequence[ray.ObjectRef], config):
        """fn(evaluator, "val", models, components, config) on every validation row (read
        again here: this actor may hold only its shard): learned soup, AdaMerging."""
        from ..evaluate import Evaluator
        from ..inputs.data import read_eval_set
        from ..mixing import from_numpy

        if self.whole_val is None:
            self.whole_val = Evaluator(
                self.spec,
                [read_eval_set(self.sources[VAL], self.spec.num_classes)],
                device=str(self.evaluator.device),
                domain=self.domain,
                metric=self.evaluator.metric,
            )
        models = [from_numpy(m) for m in ray.get(list(model_refs))]
        return fn(self.whole_val, VAL, models, self.components, config)

    def statistic(self, fn, model: dict, config) -> tuple[dict, int]:
        """fn(evaluator, "val", model, config, shard): a model's per-row sums (numpy
        arrays) over this actor's validation shard and its row count (Fisher, Gram
        matrices; the driver sums the shards). The model arrives resolved by Ray."""
        from ..mixing import from_numpy

        self.loaded = ((), None)  # the evaluator's weights change under the mixing cache
        return fn(self.evaluator, VAL, from_numpy(model), config, self.shard)


@ray.remote(num_cpus=0, max_restarts=0)
class ResidentModels:
    """The current step's resident models and mixer, as object refs, for the Tune trials.

    Trials ask this actor for them rather than receive them from Tune: Tune pickles a
    trainable's parameters out of band, and Ray pins every object such a pickle refers to
    for the driver's lifetime, so each step's models (0.9 GB at ViT-B/32) would never
    leave the object store. Passed here as a call's argument, the refs are counted, and
    the previous step's are released when the next step's arrive."""

    def __init__(self):
        self.refs: list = []

    def set(self, refs: list) -> None:
        self.refs = refs

    def get(self) -> list:
        return self.refs


def evaluate_points(
    actors: list,
    mode: str,
    models: list,
    points: Sequence[np.ndarray],
    timeout_s: float,
    cache: PointCache | None = None,
) -> tuple[list[float], int]:
    """(validation accuracy (or mean score) at each point, how many were read from the
    cache). Every point
    not in the cache is dispatched at once: summed over every evaluator's shard
    ("sharded"), or on the whole validation set of one evaluator each, point i on
    evaluator i mod N ("whole").

    `models` are object refs (the resident models and the mixer), passed through
    untouched: only the evaluators fetch them.
    """
    accuracies = [cache.get(x) if cache is not None else None for x in points]
    todo = [i for i, a in enumerate(accuracies) if a is None]
    calls = {
        i: [
            a.correct.remote(models, points[i])
            for a in (actors if mode == "sharded" else [actors[j % len(actors)]])
        ]
        for j, i in enumerate(todo)
    }
    # timeout_s bounds one evaluation; an evaluator may queue several of this batch's.
    queued = len(todo) if mode == "sharded" else -(-len(todo) // len(actors))
    counts = ray.get(
        [ref for refs in calls.values() for ref in refs], timeout=timeout_s * max(1, queued)
    )
    at = 0
    for i, refs in calls.items():
        part = counts[at : at + len(refs)]
        at += len(refs)
        accuracies[i] = sum(c for c, _ in part) / sum(t for _, t in part)
        if cache is not None:
            cache.put(points[i], accuracies[i])
    return accuracies, len(points) - len(todo)


def told_accuracies(result: dict | None) -> list[float] | None:
    """What a finished trial's last result tells the optimiser, one value per point: the
    accuracies, or a raced point's paired estimate when it was stopped early; None when it
    holds neither (the trial failed)."""
    if result and "accuracies" in result:
        return list(result["accuracies"])
    if result and "estimate" in result:
        return [result["estimate"]]
    return None


def mixing_trial(
    config: dict,
    actors: list,
    mode: str,
    resident: ray.actor.ActorHandle,
    timeout_s: float,
    cache: PointCache | None = None,
) -> None:
    """One Tune trial: a batch of points the optimiser asked together, evaluated at once."""
    models = ray.get(resident.get.remote(), timeout=timeout_s)
    accuracies, cached = evaluate_points(actors, mode, models, config["points"], timeout_s, cache)
    tune.report(
        {
            METRIC: max(accuracies),
            "accuracies": accuracies,
            "cached": cached,
            "seen": (len(accuracies) - cached) * config["val_rows"],
        }
    )


def racing_trial(
    config: dict,
    actors: list,
    mode: str,
    resident: ray.actor.ActorHandle,
    timeout_s: float,
    chunks: int,
    cache: PointCache | None = None,
) -> None:
    """One Tune trial that races one point against the pass's incumbent: the validation
    set in `chunks` chunks (each a random part of every evaluator's rows), and after each
    one the running accuracy and, on the images seen so far, how many the point gets right
    and the incumbent wrong (`favourable`) and the other way round (`unfavourable`). A
    scheduler may stop the trial after any chunk (raysoup.distributed.racing)."""
    x = config["points"][0]
    if cache is not None and (accuracy := cache.get(x)) is not None:
        tune.report({METRIC: accuracy, "accuracies": [accuracy], "cached": 1, "seen": 0})
        return
    incumbent = config.get("incumbent")  # (accuracy, packed per-image hits) or None
    models = ray.get(resident.get.remote(), timeout=timeout_s)
    chosen = actors if mode == "sharded" else actors[:1]
    seen: list[np.ndarray] = []
    for chunk in range(chunks):
        seen += ray.get(
            [a.chunk_hits.remote(models, x, chunk, chunks) for a in chosen], timeout=timeout_s
        )
        hits = np.concatenate(seen)
        accuracy = float(hits.mean())
        if chunk == chunks - 1:
            if cache is not None:
                cache.put(x, accuracy)
            tune.report(
                {
                    METRIC: accuracy,
                    "accuracies": [accuracy],
                    "cached": 0,
                    "seen": len(hits),
                    "hits": np.packbits(hits),
                }
            )
        elif incumbent is not None:
            best, packed = incumbent
            theirs = np.unpackbits(packed, count=len(hits)).astype(bool)
            favourable, unfavourable = int((hits & ~theirs).sum()), int((~hits & theirs).sum())
            tune.report(
                {
                    METRIC: accuracy,
                    "seen": len(hits),
                    "total": config["val_rows"],
                    "favourable": favourable,
                    "unfavourable": unfavourable,
                    # the paired estimate of its accuracy: what a stopped point is told
                    "estimate": best + (favourable - unfavourable) / len(hits),
                }
            )
        else:
            tune.report({METRIC: accuracy, "seen": len(hits)})
