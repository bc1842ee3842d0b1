"""Racing against full evaluation: validation forwards spent and ManifoldMix's decisions.

ManifoldMix with the demo's settings (NGOpt, 10 evaluations per component, 2 sharded
evaluators) runs twice per optimiser seed on each zoo through the Tune path, without the
point cache: every point evaluated in full, and raced (search.racing). Records the
validation images forwarded (promise tests and passes) and whether every step's
accept/reject decision and the final ingredients are the same. Target: at least 2x fewer
forwards, same decisions.

The full run's traces also bound what any racing rule could save on its path: a point
that does not beat the pass's best so far could at best be stopped before its first
image, and a point that ties or beats it must be scored in full by a rule that keeps its
confidence (one that stopped a tie early would stop a one-image improvement as early).
`ceiling_oracle` (only improvements scored) and `ceiling_sound` (ties scored too) are the
full run's forwards over those least forwards.

    python benchmarks/racing/racing.py [--zoo DIR ...] [--seeds 0 ...] [--confidence 0.99] [--chunks 8]
Appends one row per zoo and seed to benchmarks/racing/results/racing.parquet and prints it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import append_result, default_zoo, machine, parse_args

from raysoup.components import partition
from raysoup.config import SearchConfig
from raysoup.distributed.evaluators import EvaluatorSpec, start_evaluators
from raysoup.distributed.racing import Racing
from raysoup.distributed.tune_search import TuneSearch
from raysoup.evaluate import VAL, Evaluator, load_eval_sets
from raysoup.inputs.pool import IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.methods import METHODS, SoupContext, ValidationJudge
from raysoup.methods.manifold_mix import ManifoldMixConfig
from raysoup.tools.demo import DEMO_EVALS_PER_COMPONENT, DEMO_RESOURCES


def least_forwards(history: list[dict], val_rows: int, ties_scored: bool) -> int:
    """Forwards if every promise test and every point that improves on (ties_scored: or
    ties) its pass's best so far were scored in full, and every other point cost nothing."""
    scored = len(history)  # promise tests
    for step in history:
        for trace in (p["trace"] for p in step["passes"]):
            best = -1.0
            for accuracy in trace:
                scored += accuracy > best or (ties_scored and accuracy == best)
                best = max(best, accuracy)
    return scored * val_rows


def manifold_mix(
    zoo: Path, ranked: SoupContext, racing: Racing | None, seed: int, evals_per_component: int
) -> dict:
    """One ManifoldMix run on fresh evaluators: its decisions, forwards and wall time."""
    config = ManifoldMixConfig(evals_per_component=evals_per_component, seed=seed)
    pool, ranking = ranked.pool, ranked.ranking
    components = partition(list(pool.load(ranking[0][0])), SearchConfig().components)
    spec = EvaluatorSpec(
        count=DEMO_RESOURCES.evaluators, mode="sharded", cpus=DEMO_RESOURCES.cpus_per_evaluator
    )
    actors = start_evaluators(pool.spec, eval_set_sources(zoo), components, spec)
    search = TuneSearch(
        actors, spec, 1, Path("/tmp/raysoup-bench-racing") / str(time.time()), racing=racing
    )
    t0 = time.perf_counter()
    result = METHODS["manifold_mix"](replace(ranked, components=components, search=search), config)
    seconds = time.perf_counter() - t0
    for actor in actors:
        ray.kill(actor)
    history = result.details.history
    accuracy = ranking[0][1]  # the fused model's val accuracy: the last accepted step's
    for step in history:
        accuracy = step["accuracy"] if step["accepted"] else accuracy
    return {
        "decisions": [step["accepted"] for step in history],
        "val": accuracy,
        "ingredients": result.ingredients,
        "forwards": search.forwards,
        "least_forwards_oracle": least_forwards(history, search.val_rows, False),
        "least_forwards_sound": least_forwards(history, search.val_rows, True),
        "stopped": search.stopped_points,
        "evaluations": result.evaluations,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, nargs="+")
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument("--chunks", type=int, default=8)
    # NGOpt picks Cobyla at the demo's budget, which draws no random numbers: its runs
    # differ by zoo, not by seed.
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="optimiser seeds: one full and one raced run each",
    )
    parser.add_argument("--evals-per-component", type=int, default=DEMO_EVALS_PER_COMPONENT)
    args = parse_args(
        parser,
        Path(__file__).resolve().parent / "results",
        smoke={"evals_per_component": 1, "chunks": 2},
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    racing = Racing(args.chunks, args.confidence)
    for zoo in args.zoo or [default_zoo()]:
        pool = IngredientPool.from_zoo(zoo)
        evaluator = Evaluator(
            pool.spec, load_eval_sets({VAL: eval_set_sources(zoo)[VAL]}, pool.spec.num_classes)
        )
        val_rows = len(evaluator.sets[VAL][1])
        ranked = SoupContext.rank(pool, ValidationJudge(evaluator.accuracy, rows=val_rows))
        for seed in args.seeds:
            race(zoo, ranked, racing, seed, args)
    ray.shutdown()


def race(zoo: Path, ranked: SoupContext, racing: Racing, seed: int, args) -> None:
    """One full and one raced run with an optimiser seed: one row of the table."""
    full = manifold_mix(zoo, ranked, None, seed, args.evals_per_component)
    raced = manifold_mix(zoo, ranked, racing, seed, args.evals_per_component)
    row = {
        **machine(args.allow_dirty),
        "zoo": str(zoo),
        "chunks": racing.chunks,
        "confidence": racing.confidence,
        "seed": seed,
        **{f"full_{k}": v for k, v in full.items()},
        **{f"raced_{k}": v for k, v in raced.items()},
        "forwards_ratio": full["forwards"] / raced["forwards"],
        "ceiling_oracle": full["forwards"] / full["least_forwards_oracle"],
        "ceiling_sound": full["forwards"] / full["least_forwards_sound"],
        "same_decisions": full["decisions"] == raced["decisions"]
        and full["ingredients"] == raced["ingredients"],
    }
    append_result(args.out, "racing", row)
    print(
        f"{zoo}, seed {seed}: forwards {full['forwards']} full, {raced['forwards']} raced "
        f"({row['forwards_ratio']:.2f}x fewer; {raced['stopped']} of "
        f"{raced['evaluations']} points stopped); decisions "
        f"{'the same' if row['same_decisions'] else 'DIFFER'} "
        f"({full['decisions']} vs {raced['decisions']}); "
        f"{full['seconds']:.0f} s vs {raced['seconds']:.0f} s; ceiling on the full "
        f"run's path {row['ceiling_sound']:.2f}x keeping the confidence, "
        f"{row['ceiling_oracle']:.2f}x for an oracle"
    )


if __name__ == "__main__":
    main()
