"""`raysoup bench`: the grid, its config, the best-so-far curve, and a real quick run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from raysoup.errors import RaysoupError
from raysoup.report import PRE_PROVENANCE, git_state, machine
from raysoup.tools.bench import QUICK_GRID, BenchGrid, best_so_far, load_grid

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
BENCH_RESULTS = BENCHMARKS / "optimizer_budget" / "results"  # one folder per zoo


def test_the_full_grid_skips_parallel_cells_for_sequential_optimisers():
    cells = BenchGrid().cells()
    keys = [c["cell"] for c in cells]
    assert len(keys) == len(set(keys))
    assert not [c for c in cells if c["optimizer"] == "Cobyla" and c["parallel"] > 1]
    grid = [c for c in cells if c["kind"] == "grid"]
    # 5 parallel-capable optimisers x 3 k + Cobyla x 1, each x 4 budgets x 3 seeds
    assert len(grid) == (5 * 3 + 1) * 4 * 3
    ablation = [c for c in cells if c["kind"] == "ablation"]
    assert len(ablation) == len(BenchGrid().granularities) + 1
    assert [c for c in ablation if c["drop_unused"]]
    assert not [c for c in BenchGrid(granularities=()).cells() if c["kind"] == "ablation"]


def test_a_grid_config_overrides_the_defaults_and_names_unknown_keys(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text('[grid]\noptimizers = ["CMA"]\nbudgets = [3]\n')
    grid = load_grid(path, quick=False)
    assert grid.optimizers == ("CMA",) and grid.budgets == (3,) and grid.seeds == (0, 1, 2)
    path.write_text("[grid]\nseeds = [0, 1, 2]\n")  # a default value still overrides --quick
    assert load_grid(path, quick=True).seeds == (0, 1, 2)
    path.write_text("[grid]\nbudget = [3]\n")
    with pytest.raises(RaysoupError, match="grid.budget"):
        load_grid(path, quick=False)
    path.write_text('[grid]\noptimizers = ["Cobylla"]\n')
    with pytest.raises(RaysoupError, match="did you mean 'Cobyla'"):
        load_grid(path, quick=False)


def test_best_so_far_is_a_running_max_over_every_evaluation():
    history = [
        {"promise_accuracy": 0.5, "passes": []},
        {"promise_accuracy": 0.7, "passes": [{"trace": [0.6, 0.8, 0.75]}]},
    ]
    assert best_so_far(0.6, history) == [0.6, 0.7, 0.7, 0.8, 0.8]


@pytest.mark.slow
def test_bench_quick_writes_table_figures_and_resumes(soup_zoo, tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "raysoup.cli",
        "bench",
        "--quick",
        "--zoo",
        str(soup_zoo),
        "--out",
        str(out),
        "--allow-dirty",
    ]  # a test may run from an edited tree
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The tree the bench starts from (it records it once, at its start; a commit made
    # while it runs must not fail the test).
    commit, dirty = git_state()
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = pq.read_table(out / "bench.parquet").to_pylist()
    assert sorted(r["cell"] for r in rows) == sorted(
        [c["cell"] for c in QUICK_GRID.cells()]
        + ["reference/uniform_soup", "reference/greedy_soup"]
    )
    for r in rows:
        assert (r["commit"], r["dirty"]) == (commit, dirty) and commit
        assert r["cpus"] >= 1 and 0 < r["val"] <= 1
        if r["kind"] != "reference":
            curve = r["best_so_far"]
            assert len(curve) == r["evaluations"] and curve == sorted(curve)
            assert max(curve) >= r["val"] - 1e-9  # the fused model was among those seen
    for name in (
        "accuracy_vs_budget",
        "best_so_far",
        "cost_quality",
        "parallel",
        "betas",
        "granularity",
    ):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    # TwoPointsDE at k = 2 against NGOpt (same budget and seed) and greedy soup, paired;
    # NGOpt is the reference itself: against greedy only.
    assert recheck_summary(out) == len(
        {
            (c["optimizer"], c["budget"], c["parallel"])
            for c in QUICK_GRID.cells()
            if c["kind"] == "grid"
        }
    )
    assert summary_cells(summary)[("TwoPointsDE", 2, 2)][6] != "-"
    assert summary_cells(summary)[("NGOpt", 2, 1)][6] == "-"
    assert len(pq.read_table(out / "correctness.parquet")) == len(rows) * 8  # 8 sets a cell
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and f"{len(rows)} cell(s) already" in again.stdout
    assert len(pq.read_table(out / "bench.parquet")) == len(rows)


def test_a_bench_table_of_another_zoo_is_refused_before_any_cell(tmp_path):
    from raysoup.report import append_rows
    from raysoup.tools.bench import run_bench

    append_rows(
        tmp_path / "bench.parquet", [{"cell": "reference/uniform_soup", "zoo": "/elsewhere/zoo"}]
    )
    with pytest.raises(
        RaysoupError,
        match=r"holds cells of zoo \['/elsewhere/zoo'\], not "
        r"/this/zoo: choose another --out",
    ):
        run_bench("/this/zoo", tmp_path, QUICK_GRID)
    assert not ray.is_initialized()


def test_a_bench_grid_value_of_the_wrong_type_names_it(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text("[grid]\nbudgets = [5, 2.5]\n")
    with pytest.raises(RaysoupError, match=r"grid.budgets = \[5, 2.5\]: expected tuple\[int"):
        load_grid(path, quick=False)


def summary_cells(summary: str) -> dict[tuple, list[str]]:
    """(optimiser, budget, k) -> the cells of its summary.md line."""
    cells = {}
    for line in summary.splitlines():
        parts = [p.strip() for p in line.strip("|").split("|")]
        if len(parts) == 12 and parts[1].isdigit():
            cells[(parts[0], int(parts[1]), int(parts[2]))] = parts
    return cells


def recheck_summary(folder: Path) -> int:
    """Recompute every grid line of folder/summary.md from bench.parquet and
    correctness.parquet: means and ranges over seeds, the paired differences (mean over
    seeds x sets of the accuracy differences; the interval must hold it), evals and wall
    time. Returns how many lines were checked."""
    rows = pq.read_table(folder / "bench.parquet").to_pylist()
    hits = {}
    for r in pq.read_table(folder / "correctness.parquet").to_pylist():
        hits.setdefault(r["cell"], {})[r["set"]] = np.array(r["correct"], dtype=float)
    grid = [r for r in rows if r["kind"] == "grid"]
    greedy = next(r for r in rows if r["cell"] == "reference/greedy_soup")
    lines = summary_cells((folder / "summary.md").read_text())
    assert len(lines) == len({(r["optimizer"], r["budget"], r["parallel"]) for r in grid})

    def difference(text: str, pairs: list[tuple[dict, dict]], metric: str) -> None:
        sets = (
            ["val"]
            if metric == "val"
            else [s for s in hits[pairs[0][0]["cell"]] if s not in ("val", "id")]
        )
        diff = 100 * np.mean(
            [hits[a["cell"]][s].mean() - hits[b["cell"]][s].mean() for a, b in pairs for s in sets]
        )
        value, lo, hi = map(
            float, re.match(r"([-+][\d.]+) \[([-+][\d.]+), ([-+][\d.]+)\]", text).groups()
        )
        # printed to 2 decimals: within half a unit (0.065 may print either way)
        assert abs(value - diff) <= 0.005 + 1e-9 and lo - 0.005 <= value <= hi + 0.005, text

    for (opt, budget, k), parts in lines.items():
        cell = [r for r in grid if (r["optimizer"], r["budget"], r["parallel"]) == (opt, budget, k)]
        assert int(parts[3]) == len(cell)
        for column, key in ((4, "val"), (5, "ood_avg")):
            values = [100 * r[key] for r in cell]
            assert parts[column].startswith(f"{np.mean(values):.2f}")
            if len(cell) > 1:
                assert f"({min(values):.2f}–{max(values):.2f})" in parts[column]
        reference = {
            r["seed"]: r
            for r in grid
            if (r["optimizer"], r["budget"], r["parallel"]) == ("NGOpt", budget, 1)
        }
        if opt == "NGOpt" and k == 1:
            assert parts[6] == parts[7] == "-"
        else:
            pairs = [(r, reference[r["seed"]]) for r in cell if r["seed"] in reference]
            difference(parts[6], pairs, "val")
            difference(parts[7], pairs, "ood_avg")
        difference(parts[8], [(r, greedy) for r in cell], "val")
        difference(parts[9], [(r, greedy) for r in cell], "ood_avg")
        assert parts[10] == f"{np.mean([r['evaluations'] for r in cell]):.0f}"
        assert parts[11] == f"{np.mean([r['wall_s'] for r in cell]):.0f}"
    return len(lines)


@pytest.mark.parametrize(
    "folder", sorted(p.parent.name for p in BENCH_RESULTS.glob("*/correctness.parquet"))
)
def test_a_committed_bench_summary_agrees_with_its_rows(folder):
    assert recheck_summary(BENCH_RESULTS / folder) > 0


def test_every_committed_result_row_names_its_commit_and_whether_the_tree_was_dirty():
    tables = sorted(
        p for p in BENCHMARKS.glob("*/results/**/*.parquet") if p.name != "correctness.parquet"
    )
    assert len(tables) >= 10
    for path in tables:
        table = pq.read_table(path)
        for row in table.to_pylist():
            assert row["commit"], f"{path}: a row without a commit ({row.get('when')})"
            if row["commit"] == PRE_PROVENANCE:  # re-labelled: PROVENANCE.md
                assert re.fullmatch(r"[0-9a-f]{7,}", row["committed_in"]), path
            else:
                assert row["dirty"] == row["commit"].endswith("-dirty"), path
    for summary in [
        *BENCH_RESULTS.glob("*/summary.md"),
        BENCHMARKS / "calibration" / "results" / "calibration.md",
    ]:
        assert "Commits of these rows:" in summary.read_text(), summary


def test_machine_refuses_code_that_is_not_a_clean_commit_unless_told(tmp_path):
    assert git_state(tmp_path) == ("unknown", True)  # not a git checkout
    with pytest.raises(RaysoupError, match="not a clean git commit.*--allow-dirty"):
        machine(checkout=tmp_path)
    assert (machine(True, tmp_path)["commit"], machine(True, tmp_path)["dirty"]) == (
        "unknown",
        True,
    )
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "a.py").write_text("x = 1\n")
    for cmd in (["init", "-q"], ["add", "a.py"], ["commit", "-qm", "a"]):
        subprocess.run(git + cmd, check=True)
    commit, dirty = git_state(tmp_path)
    assert not dirty and machine(checkout=tmp_path)["commit"] == commit
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == (f"{commit}-dirty", True)
    with pytest.raises(RaysoupError, match=f"git describe: {commit}-dirty"):
        machine(checkout=tmp_path)
    assert machine(True, tmp_path)["dirty"] is True
