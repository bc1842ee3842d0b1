"""What the Tune path costs over a plain nevergrad loop, on one ManifoldMix step.

The same optimiser pass (A = best ingredient, C = the second, reference budget of
components x 30 evaluations, same seed) runs (a) as a plain in-process ask/tell loop on
one Evaluator, and (b) through raysoup's Tune path on a local Ray (evaluator actors,
sharded validation set, one Tune trial per point). Both see the same points (checked), so
the wall-time difference is the orchestration overhead.

    python benchmarks/overhead/overhead.py [--zoo DIR] [--budget-per-component 30]
Appends a row to benchmarks/overhead/results/overhead.parquet and prints it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import append_result, default_zoo, machine, parse_args

from raysoup.components import partition
from raysoup.distributed.evaluators import EvaluatorSpec, start_evaluators
from raysoup.distributed.tune_search import TuneSearch
from raysoup.evaluate import VAL, Evaluator, load_eval_sets
from raysoup.inputs.pool import IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.methods import SoupContext, ValidationJudge
from raysoup.search import LocalSearch, lerp_mixer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=None)
    parser.add_argument("--budget-per-component", type=int, default=30)
    parser.add_argument("--optimizer", default="NGOpt")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parse_args(
        parser,
        Path(__file__).resolve().parent / "results",
        smoke={"budget_per_component": 1, "cpus": 1},
    )
    zoo = args.zoo or default_zoo()

    pool = IngredientPool.from_zoo(zoo)
    val_file = eval_set_sources(zoo)[VAL]
    torch.set_num_threads(args.cpus)
    evaluator = Evaluator(pool.spec, load_eval_sets({VAL: val_file}, pool.spec.num_classes))
    judge = ValidationJudge(evaluator.accuracy)
    ranking = SoupContext.rank(pool, judge).ranking
    a, c = pool.load(ranking[0][0]), pool.load(ranking[1][0])
    components = partition(list(a), "granularity-1")
    m = len(components)
    budget = m * args.budget_per_component
    start = np.full(m, 0.5)

    local = LocalSearch(judge, components)
    local.set_models([a, c], lerp_mixer)
    local.accuracy(start)  # warm-up, like the Tune path's first evaluation below
    t0 = time.perf_counter()
    plain = local.optimise(start, 0.25, 0.75, budget, 0, args.optimizer)
    plain_s = time.perf_counter() - t0

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    spec = EvaluatorSpec(count=args.cpus, mode="sharded", cpus=1.0)
    actors = start_evaluators(pool.spec, {VAL: val_file}, components, spec)
    search = TuneSearch(actors, spec, 1, Path("/tmp/raysoup-bench-overhead") / str(time.time()))
    search.set_models([a, c], lerp_mixer)
    search.accuracy(start)  # evaluators fetch the models once per step, as in a run
    t0 = time.perf_counter()
    tuned = search.optimise(start, 0.25, 0.75, budget, 0, args.optimizer)
    tune_s = time.perf_counter() - t0
    # (c) the same evaluator actors called directly, one point at a time: what the Tune
    # path costs beyond the evaluations themselves.
    t0 = time.perf_counter()
    for x in tuned.points:
        search.accuracy(x)
    direct_s = time.perf_counter() - t0
    ray.shutdown()

    if plain.trace != tuned.trace:
        raise SystemExit("the two paths evaluated different points: not comparable")
    row = {
        **machine(args.allow_dirty),
        "zoo": str(zoo),
        "val_rows": len(evaluator.sets[VAL][1]),
        "optimizer": plain.optimizer,
        "evaluations": budget,
        "plain_s": plain_s,
        "tune_s": tune_s,
        "direct_s": direct_s,
        "ratio": tune_s / plain_s,
        "ratio_vs_direct": tune_s / direct_s,
        "overhead_ms_per_trial": 1000 * (tune_s - direct_s) / budget,
        "eval_ms": 1000 * plain_s / budget,
        "best_accuracy": tuned.accuracy,
    }
    append_result(args.out, "overhead", row)
    print(
        f"{budget} evaluations ({plain.optimizer}): plain loop {plain_s:.1f} s, Tune path "
        f"{tune_s:.1f} s -> ratio {row['ratio']:.3f}; same evaluator actors called "
        f"directly {direct_s:.1f} s -> Tune overhead {row['overhead_ms_per_trial']:.0f} "
        f"ms/trial (ratio {row['ratio_vs_direct']:.3f})"
    )


if __name__ == "__main__":
    main()
