"""Shared by the benchmarks: machine description, result tables, the default zoo."""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent.parent))  # run from a checkout without installing

from raysoup.report import append_rows, machine  # noqa: E402,F401  (machine: for the scripts)


def append_result(name: str, row: dict) -> None:
    """Append one row to benchmarks/results/NAME.parquet (columns may grow)."""
    append_rows(RESULTS / f"{name}.parquet", [row])


def default_zoo() -> Path:
    """The demo's zoo: the shipped one, installed into the cache on first use."""
    from raysoup.tools.demo import demo_zoo
    return demo_zoo()
