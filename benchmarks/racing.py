"""Racing against full evaluation: validation forwards spent and ManifoldMix's decisions.

ManifoldMix with the demo's settings (NGOpt, 10 evaluations per component, 2 sharded
evaluators) runs twice on each zoo through the Tune path, without the point cache: every
point evaluated in full, and raced (method.racing). Records the validation images
forwarded (promise tests and passes) and whether every step's accept/reject decision and
the final ingredients are the same. Target: at least 2x fewer forwards, same decisions.

    python benchmarks/racing.py [--zoo DIR ...] [--confidence 0.99] [--chunks 8]
Appends one row per zoo to benchmarks/results/racing.parquet and prints it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ray

from common import append_result, default_zoo, machine
from raysoup.components import partition
from raysoup.distributed.evaluators import EvaluatorSpec, start_evaluators
from raysoup.distributed.racing import Racing
from raysoup.distributed.tune_search import TuneSearch
from raysoup.evaluate import VAL, Evaluator, load_eval_sets
from raysoup.inputs.pool import IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.methods import METHODS, SoupContext, ValidationJudge
from raysoup.methods.manifold_mix import ManifoldMixConfig
from raysoup.tools.demo import DEMO_EVALS_PER_COMPONENT, DEMO_RESOURCES


def manifold_mix(zoo: Path, pool, ranking, racing: Racing | None, seed: int) -> dict:
    """One ManifoldMix run on fresh evaluators: its decisions, forwards and wall time."""
    config = ManifoldMixConfig(evals_per_component=DEMO_EVALS_PER_COMPONENT, seed=seed)
    components = partition(list(pool.load(ranking[0][0])), config.components)
    spec = EvaluatorSpec(count=DEMO_RESOURCES.evaluators, mode="sharded",
                         cpus=DEMO_RESOURCES.cpus_per_evaluator)
    actors = start_evaluators(pool.spec, eval_set_sources(zoo), components, spec)
    search = TuneSearch(actors, spec, 1, Path("/tmp/raysoup-bench-racing") / str(time.time()),
                        racing=racing)
    t0 = time.perf_counter()
    result = METHODS["manifold_mix"](SoupContext(pool, None, ranking, components, search),
                                     config)
    seconds = time.perf_counter() - t0
    for actor in actors:
        ray.kill(actor)
    history = result.details.history
    accuracy = ranking[0][1]  # the fused model's val accuracy: the last accepted step's
    for step in history:
        accuracy = step["accuracy"] if step["accepted"] else accuracy
    return {"decisions": [step["accepted"] for step in history], "val": accuracy,
            "ingredients": result.ingredients, "forwards": search.forwards,
            "stopped": search.stopped_points, "evaluations": result.evaluations,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, nargs="+")
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    racing = Racing(args.chunks, args.confidence)
    for zoo in args.zoo or [default_zoo()]:
        pool = IngredientPool.from_zoo(zoo)
        evaluator = Evaluator(pool.spec, load_eval_sets({VAL: eval_set_sources(zoo)[VAL]},
                                                        pool.spec.num_classes))
        ranking = SoupContext.rank(pool, ValidationJudge(evaluator.accuracy)).ranking
        full = manifold_mix(zoo, pool, ranking, None, args.seed)
        raced = manifold_mix(zoo, pool, ranking, racing, args.seed)
        row = {**machine(), "zoo": str(zoo), "chunks": args.chunks,
               "confidence": args.confidence, "seed": args.seed,
               **{f"full_{k}": v for k, v in full.items()},
               **{f"raced_{k}": v for k, v in raced.items()},
               "forwards_ratio": full["forwards"] / raced["forwards"],
               "same_decisions": full["decisions"] == raced["decisions"] and
               full["ingredients"] == raced["ingredients"]}
        append_result("racing", row)
        print(f"{zoo}: forwards {full['forwards']} full, {raced['forwards']} raced "
              f"({row['forwards_ratio']:.2f}x fewer; {raced['stopped']} of "
              f"{raced['evaluations']} points stopped); decisions "
              f"{'the same' if row['same_decisions'] else 'DIFFER'} "
              f"({full['decisions']} vs {raced['decisions']}); "
              f"{full['seconds']:.0f} s vs {raced['seconds']:.0f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
