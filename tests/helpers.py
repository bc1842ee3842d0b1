"""Shared test helpers: a validation evaluator, small run configs, cluster/local.py."""

import dataclasses
import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from raysoup.components import partition
from raysoup.config import SearchConfig
from raysoup.evaluate import VAL, Evaluator, load_eval_sets
from raysoup.inputs.pool import IngredientPool, load_pretrained
from raysoup.inputs.tasks import eval_set_sources
from raysoup.methods import SoupContext, ValidationJudge
from raysoup.search import LocalSearch


def val_evaluator(zoo: Path) -> Evaluator:
    pool = IngredientPool.from_zoo(zoo)
    return Evaluator(
        pool.spec, load_eval_sets({VAL: eval_set_sources(zoo)[VAL]}, pool.spec.num_classes)
    )


def in_process_context(zoo: Path) -> SoupContext:
    """What a method gets on `zoo`, every forward and data pass in this process (on Ray
    they run on the evaluators): the ranking, per-layer components, a local search, the
    pretrained weights, and the learn and statistic hooks over the whole validation set."""
    pool = IngredientPool.from_zoo(zoo)
    evaluator = val_evaluator(zoo)
    judge = ValidationJudge(evaluator.accuracy)
    components = partition(list(pool.load(pool.names[0])), "granularity-1")

    def learn(fn, models, config):
        return fn(evaluator, VAL, models, components, config)

    def statistic(fn, state_dict, config):
        total, rows = fn(evaluator, VAL, state_dict, config, 0)
        return {k: v / rows for k, v in total.items()}

    return SoupContext.rank(
        pool,
        judge,
        components=components,
        search=LocalSearch(judge, components),
        pretrained=load_pretrained(str(zoo)),
        learn=learn,
        statistic=statistic,
    )


@contextmanager
def own_cache(path: Path):
    """RAYSOUP_CACHE = `path` while the block runs (a run started in this process uses it):
    a run that must measure, not read back points another run measured."""
    before = os.environ["RAYSOUP_CACHE"]  # conftest sets one for the session
    os.environ["RAYSOUP_CACHE"] = str(path)
    try:
        yield path
    finally:
        os.environ["RAYSOUP_CACHE"] = before


def assert_measured(row: dict, after_step: int = 0) -> int:
    """ManifoldMix's steps from `after_step` on were measured by the run that wrote `row`
    (its report row): within one run the point cache answers at most one point a pass (a
    pass starts where the run just measured: the promise point, or the previous pass's
    best), so a run fed by another run's cache (every point) fails. Returns how many
    evaluations were measured."""
    steps = row["history"][after_step:]
    evaluations = sum(s["evaluations"] for s in steps)
    passes = sum(len(s["passes"]) for s in steps)
    assert steps and passes, "nothing left to measure: the check would prove nothing"
    assert row["cached_evaluations"] <= passes, (
        f"{row['cached_evaluations']} of {evaluations} evaluations came from the point cache"
    )
    return evaluations - row["cached_evaluations"]


def write_config(
    path: Path, zoo: Path | str, out: str, resources: dict | None = None, **keys
) -> Path:
    """A small `raysoup run` config: 2 CPU evaluators, 3 evaluations per component; `keys`
    go to [search] (its keys) or [manifold_mix] (the rest)."""
    resources = {
        "evaluators": 2,
        "cpus_per_evaluator": 0.5,
        "gpus_per_evaluator": 0,
        **(resources or {}),
    }
    search_keys = {f.name for f in dataclasses.fields(SearchConfig)}
    lines = [
        f'out = "{out}"',
        "[pool]",
        f'zoo = "{zoo}"',
        "[search]",
        *(f"{k} = {json.dumps(v)}" for k, v in keys.items() if k in search_keys),
        "[manifold_mix]",
        "evals_per_component = 3",
        "tau = 0.9",
        *(f"{k} = {json.dumps(v)}" for k, v in keys.items() if k not in search_keys),
        "[resources]",
        *(f"{k} = {json.dumps(v)}" for k, v in resources.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def load_local_cluster():
    """cluster/local.py (a script, not part of the package) as a module."""
    spec = importlib.util.spec_from_file_location(
        "local_cluster", Path(__file__).parents[1] / "cluster" / "local.py"
    )
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses need it
    spec.loader.exec_module(module)
    return module


def cluster_client_env(cluster, cache: Path | None = None) -> dict:
    """The environment of a client process (`raysoup run --address`) of a cluster/local.py
    cluster: this one without its RAY_ variables, token auth, and its own RAYSOUP_CACHE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return (
        env
        | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": cluster.client_env["RAY_AUTH_TOKEN_PATH"],
            "HF_HUB_OFFLINE": "1",
        }
        | ({"RAYSOUP_CACHE": str(cache)} if cache else {})
    )


class MemoryPool:
    """An ingredient pool of hand-written state dicts, in the order given (for methods on
    tiny hand-worked examples; IngredientPool reads a zoo's files)."""

    def __init__(self, ingredients: dict):
        self.ingredients = ingredients
        self.names = list(ingredients)

    def __len__(self) -> int:
        return len(self.names)

    def load(self, name: str) -> dict:
        return {k: v.clone() for k, v in self.ingredients[name].items()}
