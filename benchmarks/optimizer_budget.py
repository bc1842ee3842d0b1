"""Optimiser budget benchmark: `raysoup bench` on the demo zoo, results committed.

    python benchmarks/optimizer_budget.py [--config benchmarks/optimizer_budget.toml]
        [--zoo DIR] [--address auto]

Runs every cell of the grid not yet in benchmarks/results/optimizer_budget/bench.parquet
(resumable), then redraws the figures and summary.md next to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS, default_zoo, parse_args

from raysoup.console import console_logging
from raysoup.tools.bench import load_grid, run_bench
from raysoup.tools.bench_plots import write_all


def main() -> None:
    console_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path,
                        default=Path(__file__).with_name("optimizer_budget.toml"))
    parser.add_argument("--zoo", type=Path)
    parser.add_argument("--address")
    parser.add_argument("--out", default="optimizer_budget",
                        help="folder under benchmarks/results (one zoo per folder)")
    args = parse_args(parser)
    out = RESULTS / args.out
    table = run_bench(args.zoo or default_zoo(), out, load_grid(args.config, quick=False),
                      address=args.address, allow_dirty=args.allow_dirty)
    for path in write_all(table, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
