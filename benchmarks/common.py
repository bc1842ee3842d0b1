"""Shared by the benchmarks: arguments, where rows go, the default zoo.

Each benchmark lives in benchmarks/NAME/: NAME.py, README.md and results/. Every script
takes --out DIR (where its rows go; default its results/), --allow-dirty, and --smoke: the
benchmark's tiniest settings, run in seconds into a new temporary folder (never into
results/), from any tree (--smoke implies --allow-dirty). Explicit arguments override
the smoke settings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, not installed

from raysoup.errors import RaysoupError
from raysoup.report import append_rows, machine


def parse_args(
    parser: argparse.ArgumentParser,
    results: Path,
    smoke: dict | None = None,
    subparsers: tuple[argparse.ArgumentParser, ...] = (),
) -> argparse.Namespace:
    """The script's arguments plus --out, --smoke and --allow-dirty. `results`: the
    benchmark's committed results folder (the default --out); `smoke`: the defaults
    --smoke sets (on `subparsers` too: theirs would win over the parser's). Code that is
    not a clean git commit is refused here, before any work, unless --allow-dirty or
    --smoke is given (then rows say dirty = true)."""
    parser.add_argument(
        "--out",
        type=Path,
        help=f"folder for the rows (default: {results}; with --smoke a new temporary folder)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the tiniest settings, in seconds, into a temporary folder; implies --allow-dirty",
    )
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write rows from a tree that is not a clean git commit (they are marked dirty = true)",
    )
    if "--smoke" in sys.argv[1:]:
        for p in (parser, *subparsers):
            p.set_defaults(**(smoke or {}))
    args = parser.parse_args()
    if args.smoke:
        args.allow_dirty = True
        args.out = args.out or Path(tempfile.mkdtemp(prefix="raysoup-smoke-"))
    args.out = (args.out or results).resolve()
    try:
        machine(args.allow_dirty)
    except RaysoupError as e:
        parser.error(str(e))
    return args


def append_result(out: Path, name: str, row: dict) -> None:
    """Append one row to OUT/NAME.parquet (columns may grow)."""
    append_rows(out / f"{name}.parquet", [row])


def default_zoo() -> Path:
    """The demo's zoo: the shipped one, installed into the cache on first use."""
    from raysoup.tools.demo import demo_zoo

    return demo_zoo()
