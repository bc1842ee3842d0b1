"""How raysoup's evaluation scales with GPUs, on fake GPUs and a fixed synthetic cost.

Evaluator actors here cost a fixed time per validation row (a sleep), so the
measurement isolates raysoup's fan-out from model speed:
- sharded: one trial's evaluation split over N evaluators (one fake GPU each);
  speed-up of a single evaluation vs N = 1 (target >= 0.8 N).
- parallel: k points in flight (TwoPointsDE, num_workers = k), each whole on one of
  k evaluators, through the real Tune path; throughput vs k = 1 (target >= 0.8 k).
- null: what the Tune path itself costs per point, with evaluators that cost nothing
  (k = 1: NGOpt sharded over the largest N; k = N: TwoPointsDE, whole on N evaluators);
  target <= 40 ms per point at k = 8.

    python benchmarks/scaling/scaling.py [--eval-s 0.4] [--sizes 1 4 8] [--null-points 120]
Appends rows to benchmarks/scaling/results/scaling.parquet and prints them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import append_result, machine, parse_args

from raysoup.distributed.evaluators import EvaluatorSpec
from raysoup.distributed.tune_search import TuneSearch
from raysoup.distributed.workers import evaluate_points

HERE = Path(__file__).resolve().parent
ROWS = 6000  # validation rows of the demo zoo


@ray.remote(num_cpus=0.01, num_gpus=1)
class SyntheticEvaluator:
    """Costs `eval_s` for the whole validation set, proportionally less for a shard."""

    def __init__(self, rows: int, eval_s: float):
        self.rows, self.eval_s = rows, eval_s

    def ready(self) -> bool:
        return True

    def val_rows(self) -> int:
        return self.rows

    def correct(self, refs, x) -> tuple[int, int]:
        time.sleep(self.eval_s * self.rows / ROWS)
        return int(self.rows * 0.5), self.rows


def sharded(n: int, eval_s: float, repeats: int) -> float:
    actors = [SyntheticEvaluator.remote(ROWS // n, eval_s) for _ in range(n)]
    ray.get([a.ready.remote() for a in actors])
    t0 = time.perf_counter()
    for _ in range(repeats):
        evaluate_points(actors, "sharded", [], [np.zeros(3)], 60)
    seconds = (time.perf_counter() - t0) / repeats
    for a in actors:
        ray.kill(a)
    return seconds


def tune_pass(n: int, k: int, eval_s: float, points: int, optimizer: str) -> float:
    """Seconds per point of one Tune pass: k points in flight on n evaluators."""
    actors = [SyntheticEvaluator.remote(ROWS // n if k == 1 else ROWS, eval_s) for _ in range(n)]
    ray.get([a.ready.remote() for a in actors])
    spec = EvaluatorSpec(count=n, mode="sharded" if k == 1 else "whole", cpus=0.01, gpus=1.0)
    search = TuneSearch(actors, spec, k, Path("/tmp/raysoup-bench-scaling") / str(time.time()))
    t0 = time.perf_counter()
    result = search.optimise(np.full(3, 0.5), 0.25, 0.75, points, 0, optimizer)
    seconds = time.perf_counter() - t0
    assert result.evaluations == points
    for a in actors:
        ray.kill(a)
    return seconds / points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--eval-s", type=float, default=0.4, help="synthetic cost of one whole validation pass (s)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--trials-per-worker", type=int, default=8)
    parser.add_argument("--null-points", type=int, default=120)
    args = parse_args(
        parser,
        HERE / "results",
        smoke={"eval_s": 0.01, "sizes": [2], "trials_per_worker": 1, "null_points": 2},
    )
    ray.init(num_cpus=2, num_gpus=max(args.sizes), include_dashboard=False, log_to_driver=False)
    base = {**machine(args.allow_dirty), "eval_s": args.eval_s, "fake_gpus": True}

    largest = max(args.sizes)
    for k, optimizer in ((1, "NGOpt"), (largest, "TwoPointsDE")):
        ms = 1000 * tune_pass(largest, k, 0.0, args.null_points, optimizer)
        row = {
            **base,
            "eval_s": 0.0,
            "mode": "null",
            "n": largest,
            "k": k,
            "optimizer": optimizer,
            "ms_per_point": ms,
        }
        append_result(args.out, "scaling", row)
        print(f"null     k={k} on {largest} evaluators ({optimizer}): {ms:.1f} ms per point")

    one_eval = sharded(1, args.eval_s, 10)
    one_rate = 1 / tune_pass(1, 1, args.eval_s, args.trials_per_worker * 2, "TwoPointsDE")
    for n in args.sizes:
        seconds = sharded(n, args.eval_s, 10)
        rate = 1 / tune_pass(n, n, args.eval_s, args.trials_per_worker * n, "TwoPointsDE")
        rows = [
            {
                **base,
                "mode": "sharded",
                "n": n,
                "seconds_per_eval": seconds,
                "speedup": one_eval / seconds,
                "efficiency": one_eval / seconds / n,
            },
            {
                **base,
                "mode": "parallel",
                "n": n,
                "k": n,
                "trials_per_s": rate,
                "speedup": rate / one_rate,
                "efficiency": rate / one_rate / n,
            },
        ]
        for row in rows:
            append_result(args.out, "scaling", row)
            print(
                f"{row['mode']:8s} N={n}: speed-up {row['speedup']:.2f} "
                f"({100 * row['efficiency']:.0f} % of linear)"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
