"""Shared by the benchmarks: machine description, result tables, the default zoo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent.parent))  # run from a checkout without installing

from raysoup.errors import RaysoupError  # noqa: E402
from raysoup.report import append_rows, machine  # noqa: E402,F401  (machine: for the scripts)


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The script's arguments plus --allow-dirty. Code that is not a clean git commit is
    refused here, before any work, unless it is given (then rows say dirty = true)."""
    parser.add_argument("--allow-dirty", action="store_true", help="write rows from a tree "
                        "that is not a clean git commit (they are marked dirty = true)")
    args = parser.parse_args()
    try:
        machine(args.allow_dirty)
    except RaysoupError as e:
        parser.error(str(e))
    return args


def append_result(name: str, row: dict) -> None:
    """Append one row to benchmarks/results/NAME.parquet (columns may grow)."""
    append_rows(RESULTS / f"{name}.parquet", [row])


def default_zoo() -> Path:
    """The demo's zoo: the shipped one, installed into the cache on first use."""
    from raysoup.tools.demo import demo_zoo
    return demo_zoo()
