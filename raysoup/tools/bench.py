"""`raysoup bench`: which optimiser, budget, parallelism and components buy what accuracy
at what cost.

A grid of ManifoldMix runs on one zoo (every cell a full run on Ray; the ranking and every
judgement of unchanged weights come from the judgement cache after the first cell),
the component-granularity ablation at a fixed optimiser and budget, and the uniform and
greedy soups as references. One Parquet row per cell (with the machine and git commit);
a cell already in the table is skipped, so an interrupted benchmark resumes. Plots are
drawn from the table (raysoup.tools.bench_plots).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field
from tqdm import tqdm

from ..config import PoolConfig, RunConfig, SearchConfig, section
from ..errors import RaysoupError
from ..methods.manifold_mix import ManifoldMixConfig
from ..report import append_rows, machine
from ..search import check_optimizer
from ..typed import Optimizer, Rule, known_optimizer, section_config
from .bench_plots import CORRECTNESS

logger = logging.getLogger(__name__)

REFERENCE_METHODS = ("uniform_soup", "greedy_soup")


def known_optimizers(names: tuple[str, ...]) -> tuple[str, ...]:
    """`names` if nevergrad knows each, else ValueError with the closest name."""
    for name in names:
        known_optimizer(name)
    return names


def each_at_least_one(values: tuple[int, ...]) -> tuple[int, ...]:
    if min(values, default=1) < 1:
        raise ValueError("every value must be >= 1")
    return values


Optimizers = Annotated[tuple[str, ...], Rule(known_optimizers, "nevergrad optimizer names")]
Counts = Annotated[tuple[int, ...], Rule(each_at_least_one, "each >= 1")]


@section_config
class BenchGrid:
    """The cells of a benchmark: the grid and the granularity ablation (a bench config's
    [grid])."""

    SECTION: ClassVar[str] = "grid"
    optimizers: Annotated[Optimizers, Field(description="the grid's optimisers")] = (
        "NGOpt",
        "Cobyla",
        "CMA",
        "TwoPointsDE",
        "OnePlusOne",
        "RandomSearch",
    )
    budgets: Annotated[
        Counts, Field(description="the grid's budgets: evaluations per component per pass")
    ] = (5, 10, 20, 30)
    parallel: Annotated[
        Counts, Field(description="the grid's points in flight (where the optimiser allows)")
    ] = (1, 2, 4)
    seeds: Annotated[
        tuple[int, ...],
        Field(min_length=1, description="the grid's seeds; the ablation runs the first"),
    ] = (0, 1, 2)
    components: Annotated[
        str, Field(description="the grid's components (the ablation's reference)")
    ] = "granularity-1"
    granularities: Annotated[
        tuple[str, ...],
        Field(
            description="the ablation: each partition at one optimiser and budget, plus unused "
            "weights left out (none: no ablation)"
        ),
    ] = (
        "whole-model",
        "granularity-0",
        "granularity-1",
        "granularity-2",
        "granularity-3",
        "per-block",
    )
    ablation_optimizer: Annotated[Optimizer, Field(description="the ablation's optimiser")] = (
        "NGOpt"
    )
    ablation_budget: Annotated[
        int, Field(ge=1, description="the ablation's evaluations per component per pass")
    ] = 10

    def cells(self) -> list[dict]:
        """Every cell's settings, each with a stable `cell` key (the resume key)."""
        cells = []
        for opt in self.optimizers:
            for k in self.parallel:
                try:
                    check_optimizer(opt, k)
                except RaysoupError:
                    continue  # strictly sequential: only k = 1
                for budget in self.budgets:
                    for seed in self.seeds:
                        cells.append(
                            {
                                "kind": "grid",
                                "optimizer": opt,
                                "budget": budget,
                                "parallel": k,
                                "seed": seed,
                                "components": self.components,
                                "drop_unused": False,
                            }
                        )
        ablation = [(g, False) for g in self.granularities] + [(self.components, True)] * bool(
            self.granularities
        )  # none: no ablation
        for components, drop_unused in ablation:
            cells.append(
                {
                    "kind": "ablation",
                    "optimizer": self.ablation_optimizer,
                    "budget": self.ablation_budget,
                    "parallel": 1,
                    "seed": self.seeds[0],
                    "components": components,
                    "drop_unused": drop_unused,
                }
            )
        for cell in cells:
            cell["cell"] = (
                f"{cell['kind']}/{cell['optimizer']}/b{cell['budget']}/"
                f"p{cell['parallel']}/s{cell['seed']}/{cell['components']}"
                + ("/drop-unused" if cell["drop_unused"] else "")
            )
        return cells


# Small enough for CI on 2 cores: still a grid (two optimisers, a parallel cell, ablation).
QUICK_GRID = BenchGrid(
    optimizers=("NGOpt", "TwoPointsDE"),
    budgets=(2,),
    parallel=(1, 2),
    seeds=(0,),
    granularities=("whole-model",),
    ablation_budget=2,
)


def load_grid(path: Path | None, quick: bool) -> BenchGrid:
    base = QUICK_GRID if quick else BenchGrid()
    if path is None:
        return base
    import tomllib

    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise RaysoupError(f"cannot read bench config {path}: {e}") from e
    table = raw.pop("grid", {})
    if raw:
        raise RaysoupError(f"{path}: unknown section(s) {sorted(raw)}; known: ['grid']")
    grid = section(BenchGrid, table, "grid", str(path))
    return replace(base, **{k: getattr(grid, k) for k in table})  # the keys the file sets


def best_so_far(start: float, history: list[dict]) -> list[float]:
    """Best validation accuracy seen after each evaluation (promise tests included)."""
    best, curve = start, []
    for step in history:
        for acc in [step["promise_accuracy"], *(a for p in step["passes"] for a in p["trace"])]:
            best = max(best, acc)
            curve.append(best)
    return curve


def run_cell(cell: dict, zoo: str, out: Path) -> tuple[dict, dict]:
    """One cell as a whole run (the run path of `raysoup run`, every forward pass on the
    evaluators, the ranking and the ingredients' judgements from the judgement cache):
    its table row and its per-image correctness per set."""
    from ..runner import execute

    cell_dir = out / "cells" / cell["cell"].replace("/", "_")
    shutil.rmtree(cell_dir, ignore_errors=True)  # an interrupted cell starts over
    reference = cell["kind"] == "reference"
    name = cell["optimizer"] if reference else "manifold_mix"
    config = (
        RunConfig(PoolConfig(zoo), cell_dir, methods=(name,))
        if reference
        else RunConfig(
            PoolConfig(zoo),
            cell_dir,
            methods=(name,),
            options={
                name: ManifoldMixConfig(
                    optimizer=cell["optimizer"],
                    evals_per_component=cell["budget"],
                    seed=cell["seed"],
                )
            },
            search=SearchConfig(
                components=cell["components"],
                drop_unused=cell["drop_unused"],
                num_workers=cell["parallel"],
            ),
        )
    )
    report = execute(config)
    r = report["methods"][name]
    row = {
        **cell,
        "val": r["val"],
        "id": r["id"],
        "ood_avg": r["ood_avg"],
        "ood": json.dumps(r["ood"]),
        "wall_s": r["wall_s"],
        "accepted": len(r["ingredients"]),
        "ingredients": r["ingredients"],
        # The method's own validation evaluations: the shared ranking is not counted.
        "evaluations": r["evaluations"] - (len(report["ranking"]) if r["ranked"] else 0),
    }
    if not reference:
        row.update(
            n_components=len(r["components"]),
            component_names=r["components"],
            betas=r["betas"],
            best_so_far=best_so_far(report["ranking"][0][1], r["history"]),
        )
    correct = {
        c["set"]: np.array(c["correct"], dtype=bool)
        for c in pq.read_table(cell_dir / CORRECTNESS).to_pylist()
        if c["name"] == name
    }
    return row, correct


def run_bench(
    zoo: Path | str,
    out: Path,
    grid: BenchGrid,
    address: str | None = None,
    allow_dirty: bool = False,
) -> Path:
    """Run every cell not yet in OUT/bench.parquet; returns the table's path. Refuses to
    start from a tree that is not a clean git commit unless `allow_dirty` (report.machine)."""
    from ..distributed.driver import connect

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / "bench.parquet"
    done = set()
    if table_path.exists():
        earlier = pq.read_table(table_path, columns=["cell", "zoo"])
        zoos = set(earlier.column("zoo").to_pylist())
        if zoos != {str(zoo)}:
            raise RaysoupError(
                f"{table_path} holds cells of zoo {sorted(zoos)}, not {zoo}: choose another --out"
            )
        done = set(earlier.column("cell").to_pylist())
    about = {**machine(allow_dirty), "zoo": str(zoo)}
    todo = [
        c
        for c in [
            {"kind": "reference", "cell": f"reference/{m}", "optimizer": m}
            for m in REFERENCE_METHODS
        ]
        + grid.cells()
        if c["cell"] not in done
    ]
    logger.info(f"[bench] {len(done)} cell(s) already in {table_path}, {len(todo)} to run")
    if todo:
        connect(address, log_to_driver=False)
    for cell in tqdm(todo, desc="bench", unit="cell"):
        row, correct = run_cell(cell, str(zoo), out)
        # Correctness first: a cell in the table always has its images' results.
        append_rows(
            out / CORRECTNESS,
            [
                {"cell": cell["cell"], "set": name, "correct": hits.tolist()}
                for name, hits in correct.items()
            ],
        )
        append_rows(table_path, [{**row, **about}])
        tqdm.write(
            f"[bench] {cell['cell']}: val {100 * row['val']:.2f}, "
            f"ood {100 * row['ood_avg']:.2f}, {row['evaluations']} evals, "
            f"{row['wall_s']:.0f} s"
        )
    return table_path
