"""Optimiser budget benchmark: `raysoup bench` on the demo zoo, results committed.

    python benchmarks/optimizer_budget/optimizer_budget.py [--config GRID.toml] [--zoo DIR]
        [--out DIR] [--address auto]

Runs every cell of the grid (default grids/shipped_zoo.toml) not yet in OUT/bench.parquet
(default results/shipped_zoo/; resumable), then redraws the figures and summary.md next
to it. One zoo per folder. --smoke: grids/smoke.toml (one cell, budget 1) into a
temporary folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import default_zoo, parse_args

from raysoup.console import console_logging
from raysoup.tools.bench import load_grid, run_bench
from raysoup.tools.bench_plots import write_all

HERE = Path(__file__).resolve().parent


def main() -> None:
    console_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "grids" / "shipped_zoo.toml")
    parser.add_argument("--zoo", type=Path)
    parser.add_argument("--address")
    args = parse_args(
        parser, HERE / "results" / "shipped_zoo", smoke={"config": HERE / "grids" / "smoke.toml"}
    )
    table = run_bench(
        args.zoo or default_zoo(),
        args.out,
        load_grid(args.config, quick=False),
        address=args.address,
        allow_dirty=args.allow_dirty,
    )
    for path in write_all(table, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
